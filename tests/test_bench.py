"""Tests of vlv.bench at tiny size on the CPU: `vlv bench` for each benchmark prints and writes its fields, failures are rows,
compiled configurations run. No timing assertions. (nbs/92_bench checks the stage-1 losses against the fp32 reference.)"""
import json
import sys
from functools import partial

import pytest
import torch

import vlv.bench as B
from vlv.cli import main


# --- the command -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('benchmark', ['stage1', 'caption', 'reconstruct'])
def test_command_prints_and_writes_every_field(benchmark, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert main(['bench', benchmark, '--size', 'tiny', '--warmup', '1', '--steps', '1', '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    for column in ('config', 'img/s', 'x ref', 'peak GiB'): assert column in printed
    report = json.loads(out.read_text())[benchmark]
    _, _, default = B.BENCHMARKS[benchmark]
    rows = {r['name']: r for r in report['rows']}
    assert list(rows) == list(default)
    for r in rows.values():
        assert r['error'] is None
        assert r['img_per_s'] > 0 and r['ratio'] > 0 and r['peak_memory_gib'] > 0 and r['settings']
    assert rows['reference']['ratio'] == 1.0
    assert report['size'] == 'tiny' and report['device'] == 'cpu'
    if benchmark == 'stage1':
        assert report['matmul_peak']['tflops'] > 0 and report['flop_per_image'] > report['vision_flop_per_image'] > 0
        assert 'MFU' in printed and all(0 < r['mfu'] for r in rows.values())
        assert rows['ours']['settings']['precision'] == 'bf16' and rows['reference']['settings']['unet_checkpointing']
    if benchmark == 'caption':
        same = report['identical_to_hf']
        assert same['identical'] == same['cases'] and same['greedy'] and same['beam']
        assert rows['reference']['timing'].startswith('extrapolated') and rows['greedy']['timing'] == 'measured'
        assert (rows['reference']['beams'], rows['greedy']['beams'], rows['beam']['beams']) == (4, 1, 4)
    if benchmark == 'reconstruct':
        assert [(rows[n]['sampler'], rows[n]['sample_steps']) for n in rows] == [('ddpm', 10), ('dpmpp', 10), ('dpmpp', 4)]


@pytest.mark.slow
def test_module_entry_point_runs_all(tmp_path, run_process):
    "`python -m vlv.bench all` (what scripts/bench_gpu.sh runs, at paper size) in a fresh process."
    out = tmp_path / 'all.json'
    proc = run_process([sys.executable, '-m', 'vlv.bench', 'all', '--size', 'tiny', '--warmup', '0', '--steps', '1', '--no-check',
                        '--configs', 'stage1:reference,stage1:ours,caption:greedy,reconstruct:ours-few', '--json', out],
                       tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert [[r['name'] for r in reports[b]['rows']] for b in ('stage1', 'caption', 'reconstruct')] == \
        [['reference', 'ours'], ['greedy'], ['ours-few']]
    assert reports['caption']['rows'][0]['ratio'] is None   # no reference row in this run: no ratio


def test_command_refuses_unknown_configurations(capsys):
    assert main(['bench', 'stage1', '--configs', 'fastest']) == 2
    assert 'stage1 has reference' in capsys.readouterr().err
    assert main(['bench', 'all', '--configs', 'ours']) == 2
    with pytest.raises(SystemExit): main(['bench', 'stage1', '--size', 'huge'])


def test_a_failing_configuration_is_a_row_with_its_error(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs): raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(B, '_time_reconstruct', broken)
    out = tmp_path / 'r.json'
    assert main(['bench', 'reconstruct', '--steps', '1', '--warmup', '0', '--json', str(out)]) == 1
    rows = json.loads(out.read_text())['reconstruct']['rows']
    assert [r['error'] for r in rows] == ['out of memory: CUDA out of memory. Tried to allocate 80.00 GiB'] * 3
    assert 'error: out of memory' in capsys.readouterr().out


# --- compiled configurations -------------------------------------------------------------------------------------

def test_compiled_configurations_restore_the_decoder(monkeypatch):
    "The `*-compile` rows (paper size: Inductor) run the same code: checked here with TorchDynamo's eager backend."
    monkeypatch.setattr(torch, 'compile', partial(torch.compile, backend='eager'))
    report = B.bench_stage1('tiny', configs=('ours-compile-features',), warmup=1, steps=1, log=lambda s: None)
    assert report['rows'][0]['error'] is None and report['rows'][0]['ratio'] is None
    report = B.bench_reconstruct('tiny', configs=('reference', 'ours-compile-few'), warmup=0, steps=1, log=lambda s: None)
    assert [r['error'] for r in report['rows']] == [None, None]
