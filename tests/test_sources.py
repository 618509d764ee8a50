"Real-image sources and robust loading (vlv.sources): odd modes, bad files, folder/JSONL/WebDataset, workers."
import contextlib
import io
import itertools
import json
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlv.core import get_config
from vlv.sources import (STREAM_COUNTERS, ImageFolder, ImageLoadError, ImageManifest, ManifestError, RecordStream,
                         SampleFilter, ShardError, SkippedImageWarning, WebDatasetSource, check_image, collate_items,
                         config_transform, expand_shards, image_transform, list_images, load_image, read_manifest,
                         resize_center_crop, source_from_config, to_rgb, write_shards)
from vlv.streams import StreamResumeError, StreamState

skdata = pytest.importorskip('skimage.data')
sklearn_datasets = pytest.importorskip('sklearn.datasets')


# ---------------------------------------------------------------- helpers
def photo(name: str = 'rocket', width: int | None = None) -> Image.Image:
    "A real photo from scikit-image, optionally downsized to `width`."
    image = Image.fromarray(getattr(skdata, name)())
    if width: image = image.resize((width, round(image.height * width / image.width)))
    return image


def encode(image: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
    buffer = io.BytesIO(); image.save(buffer, fmt, **kw); return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_rgb48(array: np.ndarray) -> bytes:
    "A 16-bit-per-channel RGB PNG (PIL cannot write these) from a uint16 HxWx3 array."
    height, width, _ = array.shape
    raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0))
            + png_chunk(b'IDAT', zlib.compress(raw)) + png_chunk(b'IEND', b''))


def png_bomb(width: int, height: int) -> bytes:
    "A tiny PNG whose header claims width x height pixels."
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + png_chunk(b'IEND', b''))


def mean_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.fixture(scope='module')
def jpeg_bytes() -> bytes:
    return encode(photo('chelsea', 200), 'JPEG', quality=90)


# ---------------------------------------------------------------- real photos
@pytest.mark.parametrize('name', ['astronaut', 'coffee', 'chelsea', 'rocket'])
def test_skimage_photos_roundtrip(tmp_path, name):
    image = photo(name)
    (tmp_path / f'{name}.png').write_bytes(encode(image))
    loaded = load_image(tmp_path / f'{name}.png')
    assert loaded.mode == 'RGB' and loaded.size == image.size
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_sklearn_sample_images_load_from_their_jpeg_files():
    samples = sklearn_datasets.load_sample_images()
    for path, array in zip(samples.filenames, samples.images):
        loaded = load_image(path)
        assert loaded.mode == 'RGB' and loaded.size == (array.shape[1], array.shape[0])
        assert mean_error(loaded, array) < 1


# ---------------------------------------------------------------- odd modes
def test_grayscale_and_palette_gif(tmp_path):
    image = photo('chelsea', 160)
    (tmp_path / 'gray.png').write_bytes(encode(image.convert('L')))
    gray = load_image(tmp_path / 'gray.png')
    assert gray.mode == 'RGB' and np.array_equal(np.asarray(gray)[..., 0], np.asarray(image.convert('L')))
    (tmp_path / 'palette.gif').write_bytes(encode(image.convert('P', palette=Image.Palette.ADAPTIVE), 'GIF'))
    assert Image.open(tmp_path / 'palette.gif').mode == 'P'
    assert mean_error(load_image(tmp_path / 'palette.gif'), image) < 12


@pytest.mark.parametrize('kind', ['RGBA', 'LA', 'P-PNG', 'P-GIF'])
def test_transparency_is_composited_on_white(tmp_path, kind):
    image = photo('coffee', 120)
    rgba = np.asarray(image.convert('RGBA')).copy()
    rgba[:, :60] = (0, 255, 0, 0)                         # fully transparent left half hiding pure green
    rgba[:, 60:, 3] = 255
    source = Image.fromarray(rgba)
    if kind == 'RGBA': data = encode(source)
    elif kind == 'LA': data = encode(source.convert('LA'))
    elif kind == 'P-PNG': data = encode(source.quantize(method=Image.Quantize.FASTOCTREE))
    else:                                                 # GIF: palette index 255 is transparent green
        paletted = image.quantize(colors=255)
        palette = paletted.getpalette()[:765]
        paletted.putpalette(palette + [0] * (765 - len(palette)) + [0, 255, 0])
        paletted.paste(255, (0, 0, 60, image.height))
        data = encode(paletted, 'GIF', transparency=255)
    loaded = np.asarray(load_image(data))
    assert loaded.shape == (image.height, 120, 3)
    assert (loaded[:, :60] == 255).all(), 'transparent pixels must be white, not the hidden green'
    reference = np.asarray(image.convert('L').convert('RGB') if kind == 'LA' else image)
    assert mean_error(loaded[:, 60:], reference[:, 60:]) < 12


def test_half_transparent_is_blended():
    assert to_rgb(Image.new('RGBA', (2, 2), (0, 0, 0, 128))).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new('RGBA', (2, 2), (0, 0, 0, 0)), background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path):
    image = photo('astronaut', 128)
    (tmp_path / 'cmyk.jpg').write_bytes(encode(image.convert('CMYK'), 'JPEG', quality=95))
    assert Image.open(tmp_path / 'cmyk.jpg').mode == 'CMYK'
    loaded = load_image(tmp_path / 'cmyk.jpg')
    assert loaded.mode == 'RGB' and mean_error(loaded, image) < 6
    red = load_image(encode(Image.new('RGB', (16, 16), (200, 30, 40)).convert('CMYK'), 'JPEG', quality=95))
    assert np.abs(np.asarray(red, int)[8, 8] - (200, 30, 40)).max() <= 8


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    gray8 = np.asarray(photo('coffee', 100).convert('L'))
    (tmp_path / 'g16.png').write_bytes(encode(Image.fromarray(gray8.astype(np.uint16) * 257)))
    assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
    loaded = np.asarray(load_image(tmp_path / 'g16.png'))
    assert np.array_equal(loaded[..., 0], gray8) and np.array_equal(loaded[..., 1], gray8)
    dark = Image.fromarray(np.full((4, 4), 1000, np.uint16))   # dark, not white: 1000/65535*255 = 3.9
    assert to_rgb(dark).getpixel((0, 0)) == (4, 4, 4)


def test_16bit_big_endian_and_32bit_int_and_float_modes(tmp_path):
    values = np.array([[0, 65535], [32768, 257]], np.uint16)
    big = Image.frombytes('I;16B', (2, 2), values.astype('>u2').tobytes())
    assert big.mode == 'I;16B'
    assert np.array_equal(np.asarray(to_rgb(big))[..., 0], [[0, 255], [128, 1]])
    int32 = Image.fromarray(values.astype(np.int32))
    assert int32.mode == 'I'
    (tmp_path / 'i32.tif').write_bytes(encode(int32, 'TIFF'))
    assert np.array_equal(np.asarray(load_image(tmp_path / 'i32.tif'))[..., 0], [[0, 255], [128, 1]])
    floats = Image.fromarray(np.array([[0, 1], [0.5, 0.25]], np.float32))
    (tmp_path / 'f.tif').write_bytes(encode(floats, 'TIFF'))
    assert np.array_equal(np.asarray(load_image(tmp_path / 'f.tif'))[..., 0], [[0, 255], [128, 64]])
    wide = Image.fromarray(np.array([[-5, 5]], np.float32))     # outside [0,1]: min-max scaled
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 255]


def test_48bit_rgb_png():
    array = np.zeros((3, 4, 3), np.uint16)
    array[..., 0], array[..., 1], array[..., 2] = 65535, 32896, 257 * 7
    loaded = np.asarray(load_image(png_rgb48(array)))
    assert loaded.shape == (3, 4, 3)
    assert np.abs(loaded[0, 0].astype(int) - (255, 128, 7)).max() <= 1


@pytest.mark.parametrize('orientation,stored', [(3, lambda im: im.rotate(180)),
                                                (6, lambda im: im.rotate(90, expand=True)),
                                                (8, lambda im: im.rotate(270, expand=True))])
def test_exif_rotated_jpeg(tmp_path, orientation, stored):
    quadrants = np.zeros((40, 60, 3), np.uint8)             # top-left red, top-right green, bottom-left blue, bottom-right white
    quadrants[:20, :30] = (255, 0, 0); quadrants[:20, 30:] = (0, 255, 0)
    quadrants[20:, :30] = (0, 0, 255); quadrants[20:, 30:] = (255, 255, 255)
    true = Image.fromarray(quadrants)
    exif = Image.Exif(); exif[0x0112] = orientation
    (tmp_path / 'rotated.jpg').write_bytes(encode(stored(true), 'JPEG', quality=95, exif=exif))
    loaded = load_image(tmp_path / 'rotated.jpg')
    assert loaded.size == (60, 40)
    pixels = np.asarray(loaded, int)
    for (y, x), colour in {(10, 15): (255, 0, 0), (10, 45): (0, 255, 0), (30, 15): (0, 0, 255), (30, 45): (255, 255, 255)}.items():
        assert np.abs(pixels[y, x] - colour).max() < 30, (orientation, (y, x), pixels[y, x])
    real = photo('rocket', 96)
    (tmp_path / 'photo.jpg').write_bytes(encode(stored(real), 'JPEG', quality=95, exif=exif))
    assert mean_error(load_image(tmp_path / 'photo.jpg'), real) < 6


# ---------------------------------------------------------------- bad files
@pytest.mark.parametrize('fname,data,why', [
    ('empty.jpg', b'', 'empty file (0 bytes)'),
    ('random.jpg', bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), 'not a recognised image'),
    ('text.png', b'hello, I am not a picture\n', 'not a recognised image'),
    ('bomb.png', png_bomb(100_000, 100_000), 'decompression bomb'),
    ('medium-bomb.png', png_bomb(10_000, 9_500), 'exceeds max_pixels=89,478,485'),  # between PIL's warning and error
])
def test_bad_files_raise_clear_error_naming_the_file(tmp_path, fname, data, why):
    (tmp_path / fname).write_bytes(data)
    with pytest.raises(ImageLoadError, match=re.escape(why)) as info:
        load_image(tmp_path / fname)
    assert fname in str(info.value) and info.value.reason
    with pytest.raises(ImageLoadError, match=re.escape(why)):
        check_image(tmp_path / fname)


def test_truncated_png_fails_the_cheap_check(tmp_path):
    data = encode(photo('chelsea', 100))
    (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageLoadError, match='cut.png'):
        check_image(tmp_path / 'cut.png')


def test_missing_file_directory_and_bytes_naming(tmp_path):
    with pytest.raises(ImageLoadError, match='nothere.jpg.*No such file'): load_image(tmp_path / 'nothere.jpg')
    with pytest.raises(ImageLoadError, match='is a directory'): load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="'<bytes>': empty"): load_image(b'')
    with pytest.raises(ImageLoadError, match="'shard#7': empty"): load_image(b'', name='shard#7')


def test_real_large_image_refused_with_lowered_max_pixels():
    data = encode(photo('astronaut'))                  # 512 x 512 = 262,144 pixels
    with pytest.raises(ImageLoadError, match='512x512 = 262,144 pixels exceeds max_pixels=100,000'):
        load_image(data, max_pixels=100_000)
    assert load_image(data, max_pixels=262_144).size == (512, 512)


def test_error_pickles_and_keeps_type():
    error = pickle.loads(pickle.dumps(ImageLoadError('a.jpg', 'broken')))
    assert isinstance(error, ImageLoadError) and 'a.jpg' in str(error)


# ---------------------------------------------------------------- transform
def test_image_transform_shape_range_and_centre():
    image = Image.new('RGB', (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    tensor = image_transform(32)(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert 0 <= tensor.min() and tensor.max() <= 1
    assert tensor[:, 2:-2, 2:-2].min() > 0.99                   # crop keeps the centre square only
    assert resize_center_crop(Image.new('L', (5, 700)), 16).size == (16, 16)
    assert image_transform(8)(Image.new('RGB', (2, 3))).shape == (3, 8, 8)   # upscales small images
    with pytest.raises(ValueError, match='positive'): image_transform(0)


def test_transform_pickles_and_follows_the_config():
    transform = pickle.loads(pickle.dumps(image_transform(24)))
    assert transform(photo('coffee')).shape == (3, 24, 24)
    assert config_transform(get_config('smoke', 'data.image_size=48'))(photo('coffee')).shape == (3, 48, 48)


# ---------------------------------------------------------------- folder source
@pytest.fixture
def photo_folder(tmp_path, jpeg_bytes):
    root = tmp_path / 'images'
    (root / 'b' / 'deep').mkdir(parents=True); (root / 'a').mkdir()
    photo('astronaut', 64).save(root / 'a' / 'astronaut.PNG')
    photo('coffee', 64).save(root / 'b' / 'coffee.jpg')
    photo('rocket', 64).save(root / 'b' / 'deep' / 'rocket.webp')
    (root / 'b' / 'coffee.txt').write_text('a cup of coffee\n')
    (root / 'b' / 'readme.md').write_text('not an image extension: ignored')
    return root


def test_list_images_recursive_sorted_case_insensitive(photo_folder):
    names = [p.relative_to(photo_folder).as_posix() for p in list_images(photo_folder)]
    assert names == ['a/astronaut.PNG', 'b/coffee.jpg', 'b/deep/rocket.webp']
    with pytest.raises(NotADirectoryError, match='missing'): list_images(photo_folder / 'missing')


def test_folder_items(photo_folder):
    folder = ImageFolder(photo_folder, size=32)
    assert len(folder) == 3 and folder.n_skipped == 0
    items = [folder[i] for i in range(3)]
    assert [item['key'] for item in items] == ['a/astronaut.PNG', 'b/coffee.jpg', 'b/deep/rocket.webp']
    assert [item['caption'] for item in items] == [None, 'a cup of coffee', None]
    assert all(item['image'].shape == (3, 32, 32) for item in items)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match='no images'): ImageFolder(tmp_path)


def test_folder_skip_and_raise(photo_folder, jpeg_bytes):
    (photo_folder / 'b' / 'zero.png').write_bytes(b'')
    (photo_folder / 'b' / 'text.png').write_text('not an image')
    (photo_folder / 'b' / 'cut.jpg').write_bytes(jpeg_bytes[:len(jpeg_bytes) // 2])
    with pytest.raises(ImageLoadError, match=r'2 of 6 images failed the header check(.|\n)*text\.png(.|\n)*zero\.png'):
        ImageFolder(photo_folder, on_error='raise')
    with pytest.warns(SkippedImageWarning) as record:
        folder = ImageFolder(photo_folder, size=16)
    messages = [str(w.message) for w in record]
    assert any('zero.png' in m and 'empty' in m for m in messages) and any('text.png' in m for m in messages)
    assert any('skipped 2 of 6' in m for m in messages)
    assert len(folder) == 4 and folder.n_skipped == 2
    with pytest.warns(SkippedImageWarning, match=r'cut\.jpg.*truncated'):
        batches = list(DataLoader(folder, batch_size=4, collate_fn=collate_items))
    assert len(batches) == 1 and batches[0]['image'].shape == (3, 3, 16, 16)   # cut.jpg dropped, nothing else lost
    assert set(batches[0]['key']) == {'a/astronaut.PNG', 'b/coffee.jpg', 'b/deep/rocket.webp'}
    assert folder.n_skipped == 3 and folder.skipped[-1][0].endswith('cut.jpg')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SkippedImageWarning)
        list(DataLoader(folder, batch_size=4, collate_fn=collate_items))
    assert folder.n_skipped == 3                                                 # counted once per file, not per epoch
    strict = ImageFolder(photo_folder, on_error='raise', check=False)
    with pytest.raises(ImageLoadError, match='cut.jpg'):
        [strict[i] for i in range(len(strict))]


def test_error_type_survives_dataloader_workers(photo_folder, jpeg_bytes):
    (photo_folder / 'cut.jpg').write_bytes(jpeg_bytes[:len(jpeg_bytes) // 2])
    strict = ImageFolder(photo_folder, on_error='raise')
    batches, error = iter(DataLoader(strict, batch_size=2, num_workers=1, collate_fn=collate_items)), None
    try:
        for _ in batches: pass
    except Exception as e:
        error = e; error.__traceback__ = None   # drop the frames so the worker shuts down now, not at a later GC
    del batches
    assert isinstance(error, ImageLoadError) and 'cut.jpg' in str(error)


def test_on_error_is_validated(photo_folder):
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'raise'"): ImageFolder(photo_folder, on_error='ignore')


def test_collate_items():
    item = lambda key, caption: {'image': torch.zeros(3, 4, 4), 'caption': caption, 'key': key}
    batch = collate_items([item('a', None), None, item('b', 'text')])
    assert batch['image'].shape == (2, 3, 4, 4) and batch['caption'] == [None, 'text'] and batch['key'] == ['a', 'b']
    assert collate_items([None, None]) is None


# ---------------------------------------------------------------- JSONL manifest
def test_manifest_paths_and_captions(photo_folder, tmp_path):
    lines = [{'image': 'images/b/coffee.jpg', 'caption': 'coffee'},
             {'image': str(photo_folder / 'a' / 'astronaut.PNG'), 'caption': None, 'width': 64},
             {'image': 'images/b/deep/rocket.webp', 'key': 'rocket-1'}]
    (tmp_path / 'm.jsonl').write_text('\n'.join(map(json.dumps, lines)) + '\n\n')
    manifest = ImageManifest(tmp_path / 'm.jsonl', size=16)
    items = [manifest[i] for i in range(len(manifest))]
    assert [i['caption'] for i in items] == ['coffee', None, None]
    assert [i['key'] for i in items] == ['images/b/coffee.jpg', str(photo_folder / 'a' / 'astronaut.PNG'), 'rocket-1']
    assert items[0]['image'].shape == (3, 16, 16)
    # relative paths follow the manifest, not the working directory
    assert read_manifest(tmp_path / 'm.jsonl')[0]['image'] == tmp_path / 'images/b/coffee.jpg'


@pytest.mark.parametrize('text,why', [
    ('{"image": "a.jpg"}\n{"image": "b.jpg", }\n', 'line 2: invalid JSON'),
    ('{"image": "a.jpg"}\n\n["b.jpg"]\n', 'line 3: expected a JSON object'),
    ('{"caption": "no image"}\n', "line 1: needs a non-empty string field 'image'"),
    ('{"image": ""}\n', "line 1: needs a non-empty string field 'image'"),
    ('{"image": "a.jpg", "caption": 3}\n', "line 1: 'caption' must be a string or null"),
    ('{"image": "a.jpg", "key": 3}\n', "line 1: 'key' must be a string"),
    ('\n\n', 'has no records'),
])
def test_bad_manifest_lines(tmp_path, text, why):
    (tmp_path / 'bad.jsonl').write_text(text)
    with pytest.raises(ManifestError, match=re.escape(why)) as info:
        ImageManifest(tmp_path / 'bad.jsonl')
    assert 'bad.jsonl' in str(info.value)


def test_manifest_missing_file_and_missing_images(tmp_path, photo_folder):
    with pytest.raises(ManifestError, match='cannot read manifest'): read_manifest(tmp_path / 'nope.jsonl')
    (tmp_path / 'm.jsonl').write_text('{"image": "images/b/coffee.jpg"}\n{"image": "images/gone.jpg"}\n')
    with pytest.raises(ImageLoadError, match='gone.jpg: No such file'): ImageManifest(tmp_path / 'm.jsonl', on_error='raise')
    with pytest.warns(SkippedImageWarning) as record:
        manifest = ImageManifest(tmp_path / 'm.jsonl')
    assert any('gone.jpg' in str(w.message) for w in record)
    assert len(manifest) == 1 and manifest.n_skipped == 1


# ---------------------------------------------------------------- WebDataset shards
def numbered_shards(folder: Path, n_shards: int, per_shard: int, bad: dict | None = None) -> list[str]:
    "LAION-style shards shard-000.tar ...: key.jpg/key.png (+ key.txt for odd indices); `bad` maps key -> raw bytes."
    small = [photo(name, 40) for name in ('astronaut', 'coffee', 'chelsea', 'rocket')]
    paths = []
    for s in range(n_shards):
        paths.append(str(folder / f'shard-{s:03d}.tar'))
        with wds.TarWriter(paths[-1]) as sink:
            for j in range(per_shard):
                key = f'{s:03d}{j:03d}'
                ext = 'jpg' if j % 2 else 'png'
                data = bad[key] if key in (bad or {}) else encode(small[(s + j) % 4], 'JPEG' if ext == 'jpg' else 'PNG')
                sink.write({'__key__': key, ext: data, **({'txt': f'caption {key}'} if j % 2 else {})})
    return paths


def all_keys(n_shards, per_shard):
    return [f'{s:03d}{j:03d}' for s in range(n_shards) for j in range(per_shard)]


def test_webdataset_stream_and_brace_expansion(tmp_path):
    shards = numbered_shards(tmp_path, 3, 4)
    assert expand_shards(str(tmp_path / 'shard-{000..002}.tar')) == shards
    assert expand_shards([str(tmp_path / 'shard-{000..001}.tar'), shards[2]]) == shards
    stream = WebDatasetSource(str(tmp_path / 'shard-{000..002}.tar'), size=16)
    items = list(stream)
    assert [i['key'] for i in items] == all_keys(3, 4)
    assert items[0]['caption'] is None and items[1]['caption'] == 'caption 000001'
    assert items[0]['image'].shape == (3, 16, 16) and stream.n_skipped == 0
    assert len(list(stream)) == 12                                # a second pass works too


def test_webdataset_uppercase_extension_and_sample_without_image(tmp_path):
    path = str(tmp_path / 'odd.tar')
    with wds.TarWriter(path) as sink:
        sink.write({'__key__': 'upper', 'JPG': encode(photo('coffee', 32), 'JPEG'), 'TXT': 'shouting'})
        sink.write({'__key__': 'textonly', 'txt': 'no picture here'})
    with pytest.warns(SkippedImageWarning) as record:
        items = list(WebDatasetSource(path, size=8))
    assert any('odd.tar#textonly: sample has no image' in str(w.message) for w in record)
    assert [(i['key'], i['caption']) for i in items] == [('upper', 'shouting')]
    with pytest.raises(ImageLoadError, match='textonly'):
        list(WebDatasetSource(path, on_error='raise'))


def test_webdataset_bad_samples_skip_or_raise(tmp_path, jpeg_bytes):
    bad = {'000001': jpeg_bytes[:len(jpeg_bytes) // 2], '001002': b'', '001003': png_bomb(50_000, 50_000)}
    shards = numbered_shards(tmp_path, 2, 4, bad=bad)
    with pytest.warns(SkippedImageWarning) as record:
        stream = WebDatasetSource(shards, size=8)
        keys = [i['key'] for i in stream]
    assert keys == [k for k in all_keys(2, 4) if k not in bad]
    assert [name.rsplit('#', 1)[1] for name, _ in stream.skipped] == list(bad)
    assert any('skipped 3 bad samples' in str(w.message) for w in record)
    with pytest.raises(ImageLoadError, match=r'shard-000\.tar#000001'):
        list(WebDatasetSource(shards, on_error='raise'))


def test_webdataset_missing_and_truncated_shards(tmp_path):
    shards = numbered_shards(tmp_path, 2, 3)
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[:1600])                      # cut inside the first member
    missing = str(tmp_path / 'missing.tar')
    with pytest.warns(SkippedImageWarning) as record:
        stream = WebDatasetSource([shards[0], missing, shards[1]], size=8)
        keys = [i['key'] for i in stream]
    assert keys == all_keys(1, 3)
    assert {name for name, _ in stream.skipped} == {missing, shards[1]}
    assert any('missing.tar' in str(w.message) and 'No such file' in str(w.message) for w in record)
    with pytest.raises(ShardError, match='missing.tar'):
        list(WebDatasetSource([missing], on_error='raise'))
    with pytest.raises(ShardError, match=r'shard-001\.tar.*unexpected end'):
        list(WebDatasetSource([shards[1]], on_error='raise'))


@pytest.mark.parametrize('n_shards', [3, 1])   # by shard (3 shards >= 2 workers) and by sample (1 shard)
def test_webdataset_dataloader_two_workers_every_item_once(tmp_path, n_shards):
    numbered_shards(tmp_path, n_shards, 5)
    stream = WebDatasetSource(str(tmp_path / f'shard-{{000..{n_shards - 1:03d}}}.tar'), size=8)
    loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate_items)
    keys = [key for batch in loader for key in batch['key']]
    assert sorted(keys) == all_keys(n_shards, 5) and len(keys) == len(set(keys))


def test_webdataset_splits_over_ranks_and_workers(tmp_path, monkeypatch):
    shards = numbered_shards(tmp_path, 3, 2)
    seen = []
    for rank in range(2):
        for worker in range(2):                                     # 4 readers > 3 shards: split by sample
            for name, value in dict(RANK=rank, WORLD_SIZE=2, WORKER=worker, NUM_WORKERS=2).items():
                monkeypatch.setenv(name, str(value))
            seen += [i['key'] for i in WebDatasetSource(shards, size=8)]
    assert sorted(seen) == all_keys(3, 2) and len(seen) == 6
    stream = WebDatasetSource(shards, size=8)
    assert [stream.assignment(i, 2)[0] for i in range(2)] == [[shards[0], shards[2]], [shards[1]]]


def test_webdataset_shard_shuffle_is_seeded_per_epoch(tmp_path):
    shards = numbered_shards(tmp_path, 6, 1)
    stream = WebDatasetSource(shards, shuffle_shards=True, seed=3)
    first = stream.assignment(0, 1)[0]
    assert sorted(first) == shards and first == WebDatasetSource(shards, shuffle_shards=True, seed=3).assignment(0, 1)[0]
    stream.set_epoch(1)
    assert stream.assignment(0, 1)[0] != first


# ---------------------------------------------------------------- from the config
def test_source_from_config(photo_folder, tmp_path):
    folder = source_from_config(get_config('smoke', {'data.source': 'folder', 'data.path': str(photo_folder)}))
    assert isinstance(folder, ImageFolder) and folder[0]['image'].shape == (3, 64, 64)
    numbered_shards(tmp_path, 1, 2)
    stream = source_from_config(get_config('smoke', {'data.source': 'webdataset', 'data.path': str(tmp_path / 'shard-000.tar'),
                                                     'data.image_size': 32}))
    assert isinstance(stream, WebDatasetSource) and next(iter(stream))['image'].shape == (3, 32, 32)


# ---------------------------------------------------------------- streaming at scale: real photos in shards
PAPER_FILTERS = SampleFilter(min_aspect=0.5, max_aspect=2, max_watermark=0.5)


@pytest.fixture
def laion_shards(tmp_path, photo_records, jpeg_bytes):
    "Five shards of 14 samples: 11 real photos, a truncated JPEG, a 448x172 photo (aspect 2.6), one flagged as watermarked."
    wide = Image.fromarray(skdata.text())
    odd = [{'key': 'corrupt', 'image': jpeg_bytes[:len(jpeg_bytes) // 2], 'caption': 'a truncated download'},
           {'key': 'wide', 'image': wide, 'caption': 'a wide page of text', 'meta': {'pwatermark': 0.1}},
           {**photo_records[0], 'key': 'watermarked', 'meta': {'pwatermark': 0.9, 'aesthetic': 6.0}}]
    r = photo_records
    records = [*r[:3], odd[0], *r[3:5], odd[1], *r[5:8], odd[2], *r[8:]]  # no dropped sample ends a reader's share
    shards = write_shards(records, tmp_path / 'shards', per_shard=3)
    return shards, sorted(x['key'] for x in r)


def read_ranks(monkeypatch, make_source, world=2, workers=2, batches=None, state=None, collate=collate_items):
    "Keys that `world` simulated ranks read (a real DataLoader, `workers` workers each; `batches` per rank), and their merged StreamState."
    keys, states = [], []
    for rank in range(world):
        monkeypatch.setenv('RANK', str(rank)); monkeypatch.setenv('WORLD_SIZE', str(world))
        source = make_source().resume(state)
        rank_state = StreamState().load_state_dict(state) if state else StreamState()   # as a resumed loop starts
        try:
            for batch in itertools.islice(DataLoader(source, batch_size=2, num_workers=workers, collate_fn=collate), batches):
                keys += batch['key']; rank_state.update(batch)
        except StreamResumeError as error:
            error.__traceback__ = None   # drop the loader's frames so its workers shut down now, not at a later GC
            raise error
        states.append(rank_state.state_dict())
    return keys, StreamState().load_state_dict(states)


def test_write_shards_members_and_keys(tmp_path, photo_records):
    records = [*photo_records[:2], {'key': 'a/b.c d', 'image': photo_records[2]['image'], 'caption': None}]
    shards = write_shards(records, tmp_path, per_shard=2, image_format='png')
    assert [Path(s).name for s in shards] == ['shard-00000.tar', 'shard-00001.tar']
    samples = [s for shard in shards for s in wds.WebDataset(shard, shardshuffle=False)]
    assert [s['__key__'] for s in samples] == ['000-astronaut', '001-coffee', 'a/b_c_d']
    assert json.loads(samples[0]['json']) == {'pwatermark': 0.05, 'aesthetic': 5.5} and 'txt' not in samples[2]
    assert json.loads(samples[2]['json']) == {'key': 'a/b.c d'}                      # the original key is kept
    assert np.array_equal(np.asarray(load_image(samples[1]['png'])), np.asarray(photo_records[1]['image']))
    with pytest.raises(ValueError, match="two records have the key '000-astronaut'"):
        write_shards([photo_records[0], photo_records[0]], tmp_path / 'twice')
    with pytest.raises(ValueError, match='per_shard'): write_shards(records, tmp_path, per_shard=0)


def test_two_ranks_two_workers_read_every_sample_once_and_count_drops(monkeypatch, laion_shards):
    shards, good = laion_shards
    keys, state = read_ranks(monkeypatch, lambda: WebDatasetSource(shards, size=16, filters=PAPER_FILTERS))  # warnings stay in the workers
    assert sorted(keys) == good and len(keys) == len(set(keys))
    assert state.counts() == {**dict.fromkeys(STREAM_COUNTERS, 0), 'bad_image': 1, 'aspect': 1, 'watermark': 1}
    assert state.state_dict()['readers'] == 4 and [p['reader'] for p in state.state_dict()['positions']] == [0, 1, 2, 3]


def test_fewer_shards_than_readers_split_by_sample(monkeypatch, tmp_path, photo_records):
    shards = write_shards(photo_records, tmp_path, per_shard=6)                     # 2 shards, 4 readers
    keys, _ = read_ranks(monkeypatch, lambda: WebDatasetSource(shards, size=16, shuffle_buffer=3))
    assert sorted(keys) == sorted(r['key'] for r in photo_records) and len(keys) == len(set(keys))


def test_default_collate_carries_the_position_records(laion_shards):
    shards, _ = laion_shards
    source = WebDatasetSource(shards[:1], size=16)                                  # all captioned, none bad
    batch = next(iter(DataLoader(source, batch_size=3)))                            # torch's default collate
    assert batch['image'].shape == (3, 3, 16, 16) and batch['stream']['consumed'].tolist() == [1, 2, 3]
    assert set(batch['stream']['counts']) == set(STREAM_COUNTERS)
    state = StreamState().update(batch)
    assert state.state_dict()['positions'][0]['consumed'] == 3 and state.state_dict()['positions'][0]['readers'] == 1
    collated = next(iter(DataLoader(source, batch_size=3, collate_fn=collate_items)))
    assert torch.equal(collated['stream']['offset'], batch['stream']['offset'])


@pytest.mark.parametrize('buffer', [1, 3])
def test_resume_after_k_batches(monkeypatch, laion_shards, buffer):
    shards, good = laion_shards
    make = lambda: WebDatasetSource(shards, size=16, shuffle_buffer=buffer, seed=5, filters=PAPER_FILTERS)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SkippedImageWarning)
        first, state = read_ranks(monkeypatch, make, batches=2)
        saved = json.loads(json.dumps(state.state_dict()))                          # as a checkpoint holds it
        rest, after = read_ranks(monkeypatch, make, state=saved)
    assert len(first) == 8 and len(first + rest) == len(set(first + rest))          # nothing repeated
    missing = set(good) - set(first + rest)
    assert missing == set() if buffer == 1 else len(missing) <= 4 * (buffer - 1)   # at most one buffer per reader
    if buffer == 1: assert after.counts()['bad_image'] == 1 and after.counts()['watermark'] == 1


def test_resume_when_split_by_sample(monkeypatch, tmp_path, photo_records):
    shards = write_shards(photo_records, tmp_path, per_shard=6)                     # 2 shards, 4 readers: every 4th sample
    make = lambda: WebDatasetSource(shards, size=16)
    first, state = read_ranks(monkeypatch, make, batches=1)
    rest, _ = read_ranks(monkeypatch, make, state=state.state_dict())
    assert sorted(first + rest) == sorted(r['key'] for r in photo_records) and len(first) == 4


def test_resume_skips_without_decoding(monkeypatch, tmp_path, photo_records):
    shards = write_shards(photo_records, tmp_path, per_shard=4)
    items = iter(WebDatasetSource(shards, size=16))
    state = StreamState().update({'stream': [next(items)['stream'] for _ in range(6)]})
    decoded = []
    monkeypatch.setattr('vlv.sources.load_image', lambda data, *a, **k: decoded.append(1) or load_image(data, *a, **k))
    rest = [item['key'] for item in WebDatasetSource(shards, size=16).resume(state)]
    assert rest == [r['key'] for r in photo_records[6:]] and len(decoded) == len(rest)


@pytest.mark.filterwarnings('ignore:This DataLoader will create 3 worker processes')
def test_changed_reader_count_on_resume_is_an_error(monkeypatch, laion_shards):
    shards, _ = laion_shards
    make = lambda: WebDatasetSource(shards, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SkippedImageWarning)
        _, state = read_ranks(monkeypatch, make, batches=1)
    with pytest.raises(StreamResumeError, match='saved by 4 readers but this run has 6'):
        read_ranks(monkeypatch, make, workers=3, state=state.state_dict())
    with pytest.raises(StreamResumeError, match='saved by 4 readers but this run has 2'):
        read_ranks(monkeypatch, make, world=1, state=state.state_dict())
    with pytest.raises(StreamResumeError, match='saved for 5 shards'):
        read_ranks(monkeypatch, lambda: WebDatasetSource(shards[:4], size=16), state=state.state_dict())


def test_metadata_filters_and_bad_metadata(tmp_path, photo_records):
    scores = [{'pwatermark': 0.7}, {'aesthetic': 4.0}, {'AESTHETIC_SCORE': 7.0}, {}, {'pwatermark': None}]
    records = [{**r, 'meta': m} for r, m in zip(photo_records, scores)]
    shards = write_shards(records, tmp_path, per_shard=10)
    replace_member(shards[0], '004-camera.json', b'{not json')
    assert [i['key'] for i in WebDatasetSource(shards, size=8)] == [r['key'] for r in records]  # metadata unread without its filters
    with pytest.warns(SkippedImageWarning, match='004-camera: metadata is not JSON'):
        items = list(WebDatasetSource(shards, size=8, filters=SampleFilter(max_watermark=0.5, min_aesthetic=5)))
    assert [i['key'] for i in items] == ['002-chelsea', '003-rocket']
    assert {k: v for k, v in items[-1]['stream']['counts'].items() if v} == {'watermark': 1, 'aesthetic': 1}  # 004 comes after


def replace_member(path, name, data):
    "Rewrite the tar at `path` with member `name` holding `data` (e.g. corrupt metadata)."
    import tarfile
    with tarfile.open(path) as tar: members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, 'w') as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content); tar.addfile(member, io.BytesIO(content))


def test_size_filters_on_real_photos(tmp_path, photo_records):
    shards = write_shards([{**r, 'image': r['image'].resize((r['image'].width * 2, r['image'].height * 2)) if i % 2 else r['image']}
                           for i, r in enumerate(photo_records)], tmp_path)
    items = list(WebDatasetSource(shards, size=8, filters=SampleFilter(min_size=100)))   # odd ones are 192 wide
    assert [i['key'] for i in items] == [r['key'] for i, r in enumerate(photo_records) if i % 2]
    assert items[-1]['stream']['counts']['too_small'] == 5                         # 0, 2, ..., 8 (10 comes after the last item)


def test_record_stream_manifest_two_ranks_two_workers(monkeypatch, tmp_path, photo_records):
    (tmp_path / 'img').mkdir()
    lines = []
    for i, r in enumerate(photo_records):
        r['image'].save(tmp_path / 'img' / f'{i}.png')
        lines.append({'image': f'img/{i}.png', 'caption': r['caption'], 'pwatermark': 0.9 if i == 4 else 0.1})
    lines.insert(2, {'image': 'img/missing.png', 'caption': 'gone'})
    (tmp_path / 'm.jsonl').write_text('\n'.join(map(json.dumps, lines)))
    make = lambda: RecordStream.from_manifest(tmp_path / 'm.jsonl', size=16, shuffle=False, filters=PAPER_FILTERS)
    keys, state = read_ranks(monkeypatch, make)                                     # reader i reads lines i, i + 4, i + 8
    assert sorted(keys) == sorted(f'img/{i}.png' for i in range(len(photo_records)) if i != 4) and len(set(keys)) == len(keys)
    assert {k: v for k, v in state.counts().items() if v} == {'bad_image': 1, 'watermark': 1}
    first, state = read_ranks(monkeypatch, make, batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SkippedImageWarning)
        rest, _ = read_ranks(monkeypatch, make, state=state.state_dict())
    assert sorted(first + rest) == sorted(keys)                                     # exact resume


def test_record_stream_folder_order_and_captions(tmp_path, photo_records):
    for r in photo_records[:5]:
        r['image'].save(tmp_path / f"{r['key']}.jpg"); (tmp_path / f"{r['key']}.txt").write_text(r['caption'])
    (tmp_path / '000-astronaut.txt').write_bytes(b'\xff\xfe not utf-8')
    make = lambda: RecordStream.from_folder(tmp_path, size=16, seed=1)
    stream = make()
    with pytest.warns(SkippedImageWarning, match='bad caption file'):
        epoch0 = [(i['key'], i['caption']) for i in stream]
        again = [i['key'] for i in make()]
        stream.set_epoch(1)
        epoch1 = [i['key'] for i in stream]
    assert sorted(epoch0) == [(f"{r['key']}.jpg", r['caption']) for r in photo_records[1:5]]
    assert again == [k for k, _ in epoch0]                                          # seed + epoch fix the order ...
    assert sorted(epoch1) == sorted(again) and epoch1 != again                      # ... and it changes each epoch
    assert stream.skipped[0][0].endswith('000-astronaut.jpg')


def test_repeat_streams_on_into_the_next_epoch(tmp_path, photo_records):
    shards = write_shards(photo_records[:4], tmp_path, per_shard=2)
    items = list(itertools.islice(WebDatasetSource(shards, size=8, repeat=True, shuffle_buffer=2), 10))
    assert [i['stream']['epoch'] for i in items] == [0] * 4 + [1] * 4 + [2] * 2
    assert sorted(i['key'] for i in items[4:8]) == sorted(r['key'] for r in photo_records[:4])


def test_config_fields_reach_the_stream(tmp_path, photo_records):
    shards = write_shards(photo_records, tmp_path)
    cfg = get_config('smoke', {'data.source': 'webdataset', 'data.path': shards[0], 'data.min_size': 512, 'data.min_aspect': 0.5,
                               'data.max_aspect': 2.0, 'data.max_watermark': 0.5, 'data.min_aesthetic': 5.0,
                               'data.shuffle_buffer': 8, 'run.seed': 4})
    source = source_from_config(cfg, repeat=True)
    assert (source.shuffle_buffer, source.seed, source.repeat) == (8, 4, True)
    assert source.filters == SampleFilter(512, 0.5, 2.0, 0.5, 5.0)
    assert get_config('smoke').data.shuffle_buffer == 1 and WebDatasetSource(shards).filters == SampleFilter()
    for bad, why in [({'data.min_aspect': 2, 'data.max_aspect': 1}, 'exceeds'), ({'data.shuffle_buffer': 0}, 'shuffle_buffer'),
                     ({'data.min_size': -1}, 'min_size'), ({'data.max_watermark': 1.5}, 'max_watermark')]:
        with pytest.raises(ValueError, match=why): get_config('smoke', bad)
    with pytest.raises(ValueError, match='exceeds'): SampleFilter(min_aspect=3, max_aspect=2)
