"`vlv caption` and `vlv reconstruct` (vlv.apps) end to end through `vlv.cli.main`, on a tiny untrained model."
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlv.cli import main

skdata = pytest.importorskip('skimage.data')
sklearn_datasets = pytest.importorskip('sklearn.datasets')


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def models(tmp_path_factory, tiny_cfg, tiny_decoder, make_captioner) -> dict[str, Path]:
    "A tiny untrained captioner (on the tiny decoder) saved like `vlv run` does (runs/NAME/model), and a stage-1-only copy."
    from transformers.utils import logging as hf_logging
    from vlv.decode import Stage2Model, save_vlv
    from vlv.encoder import build_encoder
    root = tmp_path_factory.mktemp('models')
    cfg = tiny_cfg()
    hf_logging.disable_progress_bar()
    encoder = build_encoder(cfg.encoder, tiny_decoder.text_width)
    captioner = Stage2Model(encoder, tiny_decoder, make_captioner(tiny_decoder.text_width, cfg))
    model = save_vlv(captioner, cfg, root / 'run' / 'model')
    stage1 = root / 'stage1'
    shutil.copytree(model, stage1); shutil.rmtree(stage1 / 'caption_decoder')
    return dict(run=root / 'run', model=model, stage1=stage1)


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> Path:
    "Real photos in odd modes, one in a sub-folder, plus a truncated JPEG and a text file named .png."
    folder = tmp_path_factory.mktemp('photos')
    small = lambda a: Image.fromarray(a).resize((96, round(96 * a.shape[0] / a.shape[1])))
    small(skdata.astronaut()).save(folder / 'astronaut.png')
    exif = Image.Exif(); exif[0x0112] = 6                                    # EXIF-rotated JPEG
    small(skdata.coffee()).save(folder / 'coffee.jpg', quality=90, exif=exif)
    small(skdata.camera()).save(folder / 'camera.png')                        # grayscale (L)
    Image.fromarray(skdata.camera()[::4, ::4].astype(np.uint16) * 257).save(folder / 'camera16.png')  # 16-bit (I;16)
    small(skdata.astronaut()).convert('RGBA').save(folder / 'astronaut_rgba.png')
    (folder / 'sub').mkdir()
    china = sklearn_datasets.load_sample_images().images[0]
    small(china).save(folder / 'sub' / 'china.jpg')
    (folder / 'broken.jpg').write_bytes((folder / 'coffee.jpg').read_bytes()[:1500])   # truncated download
    (folder / 'notes.png').write_text('not an image')
    return folder


READABLE = ['astronaut.png', 'astronaut_rgba.png', 'camera.png', 'camera16.png', 'coffee.jpg', 'sub/china.jpg']


def run(capsys, *argv) -> tuple[int, str, str]:
    "Exit code, stdout and stderr of `vlv ARGV...`."
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- caption
def test_caption_folder_skips_bad_files(models, photos, tmp_path, capsys):
    out = tmp_path / 'captions.json'
    code, stdout, stderr = run(capsys, 'caption', photos, '--ckpt', models['run'], '--out', out, '--batch-size', 4,
                               '--max-new-tokens', 4)
    assert code == 0, stderr
    captions = json.loads(out.read_text())
    assert list(captions) == READABLE and all(isinstance(c, str) for c in captions.values())
    for bad in ('broken.jpg', 'notes.png'):
        assert any(line.startswith('vlv caption: warning: skipping') and bad in line for line in stderr.splitlines()), stderr
    assert 'captions of 6 images' in stdout and 'skipped 2 unreadable files' in stdout


def test_caption_manifest_and_files(models, photos, tmp_path, capsys):
    manifest = tmp_path / 'list.jsonl'
    manifest.write_text(json.dumps({'image': str(photos / 'camera16.png'), 'key': 'gray16'}) + '\n'
                        + json.dumps({'image': str(photos / 'missing.jpg')}) + '\n')
    out = tmp_path / 'caps.json'
    code, stdout, stderr = run(capsys, 'caption', manifest, photos / 'coffee.jpg', '--ckpt', models['model'], '--out', out,
                               '--beams', 2, '--max-new-tokens', 4, '--no-progress')
    assert code == 0, stderr
    assert list(json.loads(out.read_text())) == ['gray16', 'coffee.jpg']
    assert 'missing.jpg' in stderr and 'skipped 1 unreadable file ' in stdout


def test_caption_does_not_overwrite(models, photos, tmp_path, capsys):
    out = tmp_path / 'captions.json'
    out.write_text('keep me')
    code, stdout, stderr = run(capsys, 'caption', photos / 'camera.png', '--ckpt', models['run'], '--out', out,
                               '--max-new-tokens', 2)
    assert code == 1 and out.read_text() == 'keep me'
    assert stderr.strip().count('\n') == 0 and stderr.startswith('vlv caption: error: ')
    assert str(out) in stderr and '--overwrite' in stderr
    code, _, stderr = run(capsys, 'caption', photos / 'camera.png', '--ckpt', models['run'], '--out', out,
                          '--max-new-tokens', 2, '--overwrite')
    assert code == 0, stderr
    assert list(json.loads(out.read_text())) == ['camera.png']


@pytest.mark.parametrize('ckpt, message', [('nowhere', 'no such folder'), ('stage1', 'stage-1 model')])
def test_caption_errors(models, photos, tmp_path, capsys, ckpt, message):
    out = tmp_path / 'captions.json'
    code, stdout, stderr = run(capsys, 'caption', photos, '--ckpt', models.get(ckpt, tmp_path / ckpt), '--out', out)
    assert code == 1 and not out.exists()
    assert stderr.startswith('vlv caption: error: ') and message in stderr and stderr.strip().count('\n') == 0, stderr


def test_caption_bad_inputs(models, photos, tmp_path, capsys):
    code, _, stderr = run(capsys, 'caption', tmp_path / 'nope.jpg', '--ckpt', models['run'], '--out', tmp_path / 'c.json')
    assert code == 1 and 'nope.jpg: no such file or folder' in stderr
    code, _, stderr = run(capsys, 'caption', photos / 'notes.png', '--ckpt', models['run'], '--out', tmp_path / 'c.json')
    assert code == 1 and 'none of the 1 input files is a readable image' in stderr and not (tmp_path / 'c.json').exists()


# ---------------------------------------------------------------- reconstruct
def test_reconstruct_writes_pairs(models, photos, tmp_path, capsys):
    out = tmp_path / 'recon'
    args = ['reconstruct', photos, '--ckpt', models['run'], '--out', out, '--steps', 2, '--batch-size', 4, '--seed', 3]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    expected = sorted(f"{name.rsplit('.', 1)[0]}_{kind}.png" for name in READABLE for kind in ('reconstruction', 'side_by_side'))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*.png')) == expected
    assert Image.open(out / 'coffee_reconstruction.png').size == (64, 64)
    assert Image.open(out / 'sub' / 'china_side_by_side.png').size == (130, 64)
    assert 'broken.jpg' in stderr and 'skipped 2 unreadable files' in stdout
    first = np.asarray(Image.open(out / 'coffee_reconstruction.png'))
    # nothing is overwritten without --overwrite; with it, the same seed gives the same image whatever the batch
    code, _, stderr = run(capsys, *args)
    assert code == 1 and 'already exist' in stderr and 'pass --overwrite' in stderr
    code, _, stderr = run(capsys, 'reconstruct', photos / 'coffee.jpg', '--ckpt', models['run'], '--out', out,
                          '--steps', 2, '--seed', 3, '--overwrite', '--no-progress')
    assert code == 0, stderr
    assert np.abs(np.asarray(Image.open(out / 'coffee_reconstruction.png'), np.int16) - first).max() <= 1


def test_reconstruct_with_stage1_model(models, photos, tmp_path, capsys):
    out = tmp_path / 'recon'
    code, stdout, stderr = run(capsys, 'reconstruct', photos / 'camera16.png', photos / 'sub', '--ckpt', models['stage1'],
                               '--out', out, '--steps', 2, '--guidance', 1, '--sampler', 'dpmpp')
    assert code == 0, stderr
    assert sorted(p.name for p in out.rglob('*.png')) == ['camera16_reconstruction.png', 'camera16_side_by_side.png',
                                                           'china_reconstruction.png', 'china_side_by_side.png']


def test_reconstruct_errors(models, photos, tmp_path, capsys):
    code, _, stderr = run(capsys, 'reconstruct', photos, '--ckpt', tmp_path, '--out', tmp_path / 'r')
    assert code == 1 and 'is not a saved VLV model' in stderr and stderr.startswith('vlv reconstruct: error: ')
    (tmp_path / 'file').write_text('x')
    code, _, stderr = run(capsys, 'reconstruct', photos, '--ckpt', models['run'], '--out', tmp_path / 'file')
    assert code == 1 and 'is a file' in stderr
    with pytest.raises(SystemExit) as e:   # malformed command line: argparse's usage error
        main(['reconstruct', str(photos), '--ckpt', str(models['run']), '--out', str(tmp_path / 'r'), '--steps', '0'])
    assert e.value.code == 2 and not (tmp_path / 'r').exists()
