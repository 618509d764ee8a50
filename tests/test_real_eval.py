"The paper's evaluation on real images (vlv.real_eval): the COCO 30K selection, Table 1 on a tiny SD3 pipeline, bad inputs."
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlv.cli import main
from vlv.core import CommandError
from vlv.real_eval import (COCO_CAPTIONS, COCO_IMAGES, coco_subset, image_records, read_captions_jsonl, select_coco, table1,
                           write_fake_coco, write_tiny_sd3)

N_IMAGES = 7


@pytest.fixture(scope='module')
def coco(tmp_path_factory) -> Path:
    "A fake COCO 2014 folder: 7 small images of plain colours and noise, 1 to 3 captions each."
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(N_IMAGES)]
    captions = [[f'picture {i}, caption {k}' for k in range(1 + i % 3)] for i in range(N_IMAGES)]
    return write_fake_coco(tmp_path_factory.mktemp('coco') / 'coco2014', images, captions)


@pytest.fixture(scope='module')
def sd3(tmp_path_factory) -> Path:
    "The tiny random-init StableDiffusion3Pipeline as a diffusers folder."
    return write_tiny_sd3(tmp_path_factory.mktemp('sd3') / 'sd3')


@pytest.fixture
def manifest(coco, tmp_path) -> Path:
    coco_subset(coco, tmp_path / 'coco5.jsonl', n=5)
    return tmp_path / 'coco5.jsonl'


def test_selection_is_seeded_nested_and_one_caption_each(coco, tmp_path):
    records = coco_subset(coco, tmp_path / 'm.jsonl', n=5, seed=0)
    lines = [json.loads(line) for line in (tmp_path / 'm.jsonl').read_text().splitlines()]
    assert [line['key'] for line in lines] == [r['key'] for r in records] and len({r['id'] for r in records}) == 5
    assert all(line['caption'] in line['references'] for line in lines)
    all_captions = json.loads((coco / COCO_CAPTIONS).read_text())['annotations']
    for line in lines:   # the references are all of that image's captions
        assert sorted(line['references']) == sorted(a['caption'] for a in all_captions if a['image_id'] == line['id'])
    assert [r['key'] for r in select_coco(coco, 3, seed=0)] == [r['key'] for r in records[:3]]   # a prefix of the larger draw
    assert select_coco(coco, 5, seed=0) == select_coco(coco, 5, seed=0)
    assert [r['key'] for r in select_coco(coco, N_IMAGES, seed=1)] != [r['key'] for r in select_coco(coco, N_IMAGES, seed=0)]
    read = image_records(tmp_path / 'm.jsonl')   # relative image paths resolve against the manifest
    assert all(Path(r['image']).is_file() for r in read) and [r['references'] for r in read] == [line['references'] for line in lines]


def test_selection_bad_inputs(coco, tmp_path):
    with pytest.raises(CommandError, match='no such folder'): select_coco(tmp_path / 'nowhere', 3)
    with pytest.raises(CommandError, match='lists 7 images'): select_coco(coco, 8)
    data = json.loads((coco / COCO_CAPTIONS).read_text())
    (tmp_path / 'bad.json').write_text(json.dumps(data | {'annotations': [a for a in data['annotations'] if a['image_id'] != 3]}))
    with pytest.raises(CommandError, match='1 of 7 images have no caption.*COCO_val2014_000000000003'):
        select_coco(coco, 3, captions=tmp_path / 'bad.json')
    (tmp_path / 'notjson.json').write_text('{"images": [')
    with pytest.raises(CommandError, match='not valid JSON'): select_coco(coco, 3, captions=tmp_path / 'notjson.json')
    broken = tmp_path / 'broken'; shutil.copytree(coco, broken)
    victim = broken / COCO_IMAGES / select_coco(coco, 1)[0]['key']
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CommandError, match=f'1 unreadable image.*{victim.name}'): coco_subset(broken, tmp_path / 'x.jsonl', n=3)
    victim.unlink()
    with pytest.raises(CommandError, match='1 of the 3 drawn images are not in'): coco_subset(broken, tmp_path / 'x.jsonl', n=3)
    assert not (tmp_path / 'x.jsonl').exists()   # nothing written on error


def test_table1_writes_resumes_and_measures(manifest, sd3, tmp_path):
    kw = dict(rows=['coco'], pipeline=sd3, steps=2, batch_size=2, features='tiny', device='cpu')
    first = table1(manifest, tmp_path / 'out', **kw)
    folder = tmp_path / 'out' / 'coco_g2'
    assert sorted(p.name for p in folder.glob('*.png')) == [f'{i:06d}.png' for i in range(5)]
    assert first['rows']['COCO captions']['drawn_now'] == 5 and first['paper'] == {'COCO captions': 9.90}
    fid = first['rows']['COCO captions']['fid']
    assert np.isfinite(fid) and fid >= 0
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob('*.png')}
    (folder / '000003.png').unlink()                                # as if the run had stopped before it
    again = table1(manifest, tmp_path / 'out', **kw)
    assert again['rows']['COCO captions']['drawn_now'] == 1 and again['rows']['COCO captions']['kept'] == 4
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob('*.png') if p.name != '000003.png'} == \
           {k: v for k, v in stamps.items() if k != '000003.png'}    # the others were not drawn again
    assert again['rows']['COCO captions']['fid'] == pytest.approx(fid, abs=1e-3)   # image 3 drawn again from its own seed
    assert json.loads((tmp_path / 'out' / 'table1_g2.json').read_text())['rows'] == again['rows']
    with pytest.raises(CommandError, match='other settings'): table1(manifest, tmp_path / 'out', **kw | dict(steps=3))


def test_table1_resumes_after_an_interruption(manifest, sd3, tmp_path):
    from vlv.metrics import load_pipeline
    class Pipeline:   # the tiny pipeline, interrupted (Ctrl-C) after `batches` calls
        def __init__(self, batches): self.pipe, self.batches = load_pipeline(sd3, 'cpu'), batches
        def __call__(self, **kwargs):
            if self.batches == 0: raise KeyboardInterrupt
            self.batches -= 1; return self.pipe(**kwargs)
    kw = dict(rows=['coco'], steps=2, batch_size=2, features='tiny', device='cpu')
    with pytest.raises(KeyboardInterrupt): table1(manifest, tmp_path / 'out', pipeline=Pipeline(1), **kw)
    assert len(list((tmp_path / 'out' / 'coco_g2').glob('*.png'))) == 2
    done = table1(manifest, tmp_path / 'out', pipeline=Pipeline(99), **kw)
    assert (done['rows']['COCO captions']['drawn_now'], done['rows']['COCO captions']['kept']) == (3, 2)


def test_table1_bad_inputs(coco, manifest, sd3, tmp_path):
    kw = dict(pipeline=sd3, features='tiny', device='cpu')
    with pytest.raises(CommandError, match='no such file'): table1(tmp_path / 'none.jsonl', tmp_path / 'o', **kw)
    with pytest.raises(CommandError, match='needs --ckpt'): table1(manifest, tmp_path / 'o', rows=['vlv'], **kw)
    image = coco / COCO_IMAGES / 'COCO_val2014_000000000001.jpg'
    (tmp_path / 'nocap.jsonl').write_text(json.dumps({'image': str(image)}) + '\n')
    with pytest.raises(CommandError, match='1 images have no caption'): table1(tmp_path / 'nocap.jsonl', tmp_path / 'o', **kw)
    (tmp_path / 'broken.jpg').write_bytes(image.read_bytes()[:150])
    (tmp_path / 'corrupt.jsonl').write_text(json.dumps({'image': 'broken.jpg', 'caption': 'a picture'}) + '\n')
    with pytest.raises(CommandError, match='broken.jpg'): table1(tmp_path / 'corrupt.jsonl', tmp_path / 'o2', **kw)


def test_commands(coco, sd3, tmp_path, capsys):
    out = tmp_path / 'c4.jsonl'
    assert main(['coco-subset', '--coco', str(coco), '--n', '4', '--out', str(out), '--no-progress']) == 0
    assert 'wrote 4 images' in capsys.readouterr().out
    assert main(['coco-subset', '--coco', str(coco), '--n', '4', '--out', str(out)]) == 1   # exists
    assert 'already exist' in capsys.readouterr().err
    assert main(['coco-subset', '--coco', str(tmp_path / 'none'), '--out', str(tmp_path / 'x.jsonl')]) == 1
    assert 'no such folder' in capsys.readouterr().err
    cmd = ['table1', '--manifest', str(out), '--out', str(tmp_path / 't'), '--pipeline', str(sd3), '--steps', '2',
           '--features', 'tiny', '--device', 'cpu', '--no-progress']
    assert main(cmd) == 0
    assert 'COCO captions' in capsys.readouterr().out and len(list((tmp_path / 't' / 'coco_g2').glob('*.png'))) == 4
    assert main(cmd + ['--rows', 'vlv']) == 1 and 'needs --ckpt' in capsys.readouterr().err


@pytest.mark.slow
def test_table1_vlv_row_with_a_miniature_model(miniature, manifest, sd3, tmp_path):
    "The VLV row: captions of an untrained miniature model, written as they come and reused on a rerun."
    from vlv.miniature import miniature_config
    from vlv.real_eval import untrained_model
    ckpt = untrained_model(miniature_config(miniature, 'run.device=cpu'), tmp_path / 'model')
    kw = dict(ckpt=ckpt, pipeline=sd3, steps=2, batch_size=3, features='tiny', device='cpu', limit=3)
    first = table1(manifest, tmp_path / 'out', **kw)
    assert list(first['rows']) == ['VLV', 'COCO captions'] and 'CIDEr' in first['caption_metrics']
    captions = read_captions_jsonl(tmp_path / 'out' / 'vlv_captions.jsonl')
    assert len(captions) == 3
    again = table1(manifest, tmp_path / 'out', **kw)
    assert read_captions_jsonl(tmp_path / 'out' / 'vlv_captions.jsonl') == captions
    assert [r['drawn_now'] for r in again['rows'].values()] == [0, 0]
