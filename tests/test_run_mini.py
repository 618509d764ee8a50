"""`vlv run --preset mini` through 04_stage1: the paper's code path (Florence-2, SD 2.1-base's classes, WebDataset
shards of real photos) executed notebook by notebook, as CI runs it. About 4 minutes on 2 shared CPU cores."""
from __future__ import annotations

import json
import re
import sys

import pytest


@pytest.mark.slow
def test_mini_run_goes_through_stage1(repo, tmp_path, run_process):
    runs = tmp_path / 'runs'
    done = run_process([sys.executable, '-m', 'vlv.cli', 'run', '--preset', 'mini', '--name', 'mini', '--to', '04',
                        '--runs-dir', runs, '--no-progress'], cwd=repo, timeout=1500,
                       VLV_MINIATURE=str(tmp_path / 'miniature'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = runs / 'mini'
    manifest = json.loads((run / 'manifest.json').read_text())
    expected = sorted(p.name for p in (repo / 'nbs').glob('*.ipynb') if re.match(r'0[0-4][a-z]?_', p.name))
    assert sorted(manifest['notebooks']) == expected and expected[-1] == '04_stage1.ipynb'
    assert {n: r['status'] for n, r in manifest['notebooks'].items()} == dict.fromkeys(expected, 'ok')
    assert (manifest['preset'], manifest['status']) == ('mini', 'ok')
    assert (tmp_path / 'miniature' / 'florence-2' / 'config.json').exists()   # written where VLV_MINIATURE points
    assert (run / 'source_samples.png').exists() and not (run / 'shapes_samples.png').exists()   # 01: the stream's images
    log = [json.loads(line) for line in (run / 'stage1' / 'log.jsonl').read_text().splitlines()]
    assert log[-1]['step'] == 4 and log[-1]['data']['read'] > 0                # 04: trained on the stream
    assert sorted(p.name for p in (run / 'stage1').glob('recon-step*.png')) == ['recon-step0000002.png', 'recon-step0000004.png']
    assert json.loads((run / 'stage1_metrics.json').read_text())['reconstructions'] is None   # no oracle on real images
