"""`vlv run --preset mini` through every pipeline notebook, and the `paper` preset's own branches on the miniature: the
paper's code path (Florence-2, SD 2.1-base's classes, Qwen2, WebDataset shards of real photos) executed notebook by
notebook, as CI runs it (`scripts/test.sh` runs the slow tests). The full run: 5.8 minutes on 2 CPU cores shared with
other jobs (load average about 4.5; 9.0 minutes at load 6; about 4 CPU-minutes); the paper branches 1.2 minutes (2026-12-04)."""
from __future__ import annotations

import json
import re
import sys

import pytest


@pytest.mark.slow
def test_mini_run_goes_through_every_notebook(repo, tmp_path, run_process):
    runs = tmp_path / 'runs'
    done = run_process([sys.executable, '-m', 'vlv.cli', 'run', '--preset', 'mini', '--name', 'mini',
                        '--runs-dir', runs, '--no-progress'], cwd=repo, timeout=3000,
                       VLV_MINIATURE=str(tmp_path / 'miniature'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = runs / 'mini'
    manifest = json.loads((run / 'manifest.json').read_text())
    expected = sorted(p.name for p in (repo / 'nbs').glob('*.ipynb') if re.match(r'[0-8]\d[a-z]?_', p.name))
    assert sorted(manifest['notebooks']) == expected and expected[-1] == '06d_real_eval.ipynb'
    assert {n: r['status'] for n, r in manifest['notebooks'].items()} == dict.fromkeys(expected, 'ok')
    assert (manifest['preset'], manifest['status']) == ('mini', 'ok')
    assert (tmp_path / 'miniature' / 'florence-2' / 'config.json').exists()   # written where VLV_MINIATURE points
    assert (run / 'source_samples.png').exists() and not (run / 'shapes_samples.png').exists()   # 01: the stream's images
    log = [json.loads(line) for line in (run / 'stage1' / 'log.jsonl').read_text().splitlines()]
    assert log[-1]['step'] == 4 and log[-1]['data']['read'] > 0                # 04: trained on the stream
    assert sorted(p.name for p in (run / 'stage1').glob('recon-step*.png')) == ['recon-step0000002.png', 'recon-step0000004.png']
    assert json.loads((run / 'stage1_metrics.json').read_text())['reconstructions'] is None   # no oracle on real images
    # 05: stage 2 on the shards' captions, a checkpoint, the saved captioner and captions of the first images
    log2 = [json.loads(line) for line in (run / 'stage2' / 'log.jsonl').read_text().splitlines()]
    assert log2[-1]['step'] == 4 and log2[-1]['data']['read'] > 0 and log2[-1]['tokens_per_s'] > 0
    assert (run / 'stage2' / 'checkpoints' / 'latest.json').exists()
    assert {p.name for p in (run / 'model').iterdir()} >= {'config.json', 'encoder', 'caption_decoder'}
    captions = json.loads((run / 'captions.json').read_text())
    assert len(captions) == 8 and all(c['reference'] and isinstance(c['caption'], str) for c in captions)
    decode = json.loads((run / 'decode_metrics.json').read_text())
    assert (decode['steps'], decode['captions']) == (4, captions)
    assert not (run / 'lm_metrics.json').exists()                               # 05a: the toy LM is skipped
    # 06: the run's model on the source's first images, in metrics.json and the report; no Shapes measurement
    metrics = json.loads((run / 'metrics.json').read_text())
    real = metrics['eval']['real']
    assert real['n_images'] == 8 and 0 <= real['caption_metrics']['BLEU-4'] <= 1 and len(real['captions']) == 8
    assert not {'round_trip', 'composition', 'main', 'table1_oracle_fid'} & set(metrics['eval'])
    summary = list(metrics['summary'])
    assert summary[0] == "captions of the source's first 8 images, against their references" and len(summary) == 3
    assert summary[1].startswith('held-out images') and summary[2].startswith('Table 1')   # 06's at-scale section (06d)
    at_scale = json.loads((run / 'real_eval_metrics.json').read_text())
    assert at_scale['heldout']['fid'] >= 0 and at_scale['heldout']['n_images'] > 0
    assert set(at_scale['table1']['rows']) == {'VLV', 'COCO captions'} and all(r['fid'] >= 0 for r in at_scale['table1']['rows'].values())
    assert (run / 'report.md').exists() and json.loads((run / 'figures.json').read_text())
    printed = lambda nb: ''.join(t for c in json.loads((run / f'{nb}.ipynb').read_text())['cells']
                                 for o in c.get('outputs', []) for t in o.get('text', []))
    assert printed('05a_lm').count('skipped:') >= 2 and printed('06_eval').count('skipped:') >= 8   # toy-only cells say why


@pytest.mark.slow
def test_paper_cells_run_on_the_miniature(repo, tmp_path, run_process):
    """The `paper` preset's own branches (02 loads `encoder.pretrained`; 02, 04 and 05 skip the checks that would build a
    second full-size model) with the miniature's sizes, weights and shards passed as overrides: nothing downloads."""
    from vlv.core import PRESETS
    from vlv.miniature import ensure_miniature, miniature_config
    cfg = miniature_config(tmp_path / 'miniature')
    ensure_miniature(cfg)
    value = lambda v: '[' + ','.join(map(str, v)) + ']' if isinstance(v, tuple) else str(v)
    overrides = ' '.join(f'{section}.{key}={value(getattr(getattr(cfg, section), key))}'
                         for section, values in PRESETS['mini'].items() for key in values
                         if PRESETS['paper'].get(section, {}).get(key) != values[key])
    runs = tmp_path / 'runs'
    done = run_process([sys.executable, '-m', 'vlv.cli', 'run', '--preset', 'paper', '--name', 'paper', '--only', '02', '04', '05',
                        '06', '--runs-dir', runs, '--no-progress', '-p', 'cfg_overrides', overrides], cwd=repo, timeout=1500,
                       HF_HUB_OFFLINE='1')
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = runs / 'paper'
    printed = lambda nb: ''.join(t for c in json.loads((run / f'{nb}.ipynb').read_text())['cells']
                                 for o in c.get('outputs', []) for t in o.get('text', []))
    assert f"Florence-2 from {tmp_path / 'miniature' / 'florence-2'}" in printed('02_encoder')
    assert printed('02_encoder').count('not built at full size') == 2 and 'second Florence-2-large' in printed('02_encoder')
    assert 'skipped: the step check would build a second Florence-2-large' in printed('04_stage1')
    assert 'skipped: loading it back would hold a second full-size captioner' in printed('05_decode')
    assert json.loads((run / 'metrics.json').read_text())['eval']['real']['n_images'] == 8
