"""`vlv eval` (vlv.eval) end to end through `vlv.cli.main`: captions -> tiny pipeline -> FID (+ caption metrics), its errors.

nbs/06_eval checks the Shapes evaluation itself (oracle round trips, composition, the oracle's features).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlv.cli import main
from vlv.data import caption, render_batch, sample_scenes
from vlv.metrics import tiny_pipeline


@pytest.fixture(scope='module')
def eval_inputs(tmp_path_factory) -> dict[str, Path]:
    "A folder of 5 rendered scenes (one in a sub-folder, plus a broken file), captions.json, references, a tiny pipeline folder."
    root = tmp_path_factory.mktemp('eval')
    folder = root / 'images'; (folder / 'sub').mkdir(parents=True)
    scenes = sample_scenes(np.random.default_rng(5), 5)
    names = ['a.png', 'b.png', 'c.jpg', 'd.png', 'sub/e.png']
    for name, image in zip(names, render_batch(scenes)): Image.fromarray(image).save(folder / name)
    (folder / 'broken.png').write_text('not an image')
    captions = {n: caption(s, np.random.default_rng(i)) for i, (n, s) in enumerate(zip(names, scenes))}
    (root / 'captions.json').write_text(json.dumps(captions))
    (root / 'refs.json').write_text(json.dumps({n: [c, c.upper()] for n, c in captions.items()}))
    tiny_pipeline(seed=0).save_pretrained(root / 'pipeline')
    return dict(root=root, images=folder, captions=root / 'captions.json', refs=root / 'refs.json', pipeline=root / 'pipeline')


def eval_args(inputs, out, *extra):
    return ['eval', str(inputs['captions']), str(inputs['images']), '--pipeline', str(inputs['pipeline']), '--features', 'tiny',
            '--image-size', '32', '--guidance', '1', '3', '--steps', '2', '--batch-size', '2', '--device', 'cpu',
            '--no-progress', '--out', str(out), *extra]


@pytest.mark.slow   # with java on the PATH the reference captions are scored with the PTB tokenizer and METEOR
def test_vlv_eval_end_to_end(eval_inputs, capsys):
    out = eval_inputs['root'] / 'metrics.json'
    assert main(eval_args(eval_inputs, out, '--reference-captions', str(eval_inputs['refs']))) == 0
    printed = capsys.readouterr()
    assert 'vlv eval: 5 captions against 5 images' in printed.out and 'g=3: ' in printed.out
    assert 'broken.png' in printed.err                                   # skipped with a warning line
    m = json.loads(out.read_text())
    assert sorted(m['fid']) == ['1.0', '3.0'] and all(v >= 0 for v in m['fid'].values())
    assert (m['n_captions'], m['n_reference'], m['features'], m['steps']) == (5, 5, 'tiny', 2)
    assert m['caption_metrics']['BLEU-4'] > 0.99 and m['semantic_similarity'] > 0.99
    assert [Path(p).name for p, _ in m['reference_skipped']] == ['broken.png']
    # never overwrite without --overwrite; the file is left as it was
    before = out.read_bytes()
    assert main(eval_args(eval_inputs, out)) == 1
    assert '--overwrite' in capsys.readouterr().err and out.read_bytes() == before
    assert main(eval_args(eval_inputs, out, '--overwrite', '--max-captions', '2')) == 0
    assert json.loads(out.read_text())['n_captions'] == 2 and 'caption_metrics' not in json.loads(out.read_text())


def test_vlv_eval_errors(eval_inputs, capsys):
    root = eval_inputs['root']
    (root / 'mismatch.json').write_text(json.dumps({'a.png': 'x', 'e.png': 'y', 'zzz.png': 'z'}))
    (root / 'notjson.json').write_text('{nope')
    (root / 'list.json').write_text(json.dumps(['a caption']))
    cases = [(['eval', str(root / 'mismatch.json'), str(eval_inputs['images'])], "2 of 3 captions name images that are not in"),
             (['eval', str(root / 'nothing.json'), str(eval_inputs['images'])], 'CAPTIONS_JSON'),
             (['eval', str(root / 'notjson.json'), str(eval_inputs['images'])], 'is not valid JSON'),
             (['eval', str(root / 'list.json'), str(eval_inputs['images'])], 'expected a non-empty JSON object'),
             (['eval', str(eval_inputs['captions']), str(root / 'nowhere')], 'IMAGE_FOLDER'),
             (['eval', str(eval_inputs['captions']), str(eval_inputs['images']), '--reference-captions', str(root / 'mismatch.json')],
              'no reference for 4 of 5 captions'),
             (['eval', str(eval_inputs['captions']), str(eval_inputs['images']), '--features', 'tiny', '--pipeline', str(root / 'nope')],
              'cannot load it')]
    for args, message in cases:
        assert main(args + ['--out', str(root / 'never.json'), '--device', 'cpu']) == 1, args
        assert message in capsys.readouterr().err, message
    assert not (root / 'never.json').exists()


def test_eval_help_lists_its_options(capsys):
    with pytest.raises(SystemExit): main(['eval', '--help'])
    assert '--reference-captions' in capsys.readouterr().out
