"""Tests of vlv.bench at tiny size on the CPU: `vlv bench` for each benchmark prints and writes its fields; our decoder
gives HF generate's tokens; our stage-1 step's loss equals the fp32 reference's. No timing assertions."""
import json
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

import vlv.bench as B
from vlv.cli import main
from vlv.core import DecodeConfig
from vlv.decode import CaptionDecoder, hf_generate, load_lm

REPO = Path(B.__file__).resolve().parent.parent


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_module_entry_point_runs_all(tmp_path):
    "`python -m vlv.bench all` (what scripts/bench_gpu.sh runs, at paper size) in a fresh process."
    out = tmp_path / 'all.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    proc = subprocess.run([sys.executable, '-m', 'vlv.bench', 'all', '--size', 'tiny', '--warmup', '0', '--steps', '1', '--no-check',
                           '--configs', 'stage1:reference,stage1:ours,caption:greedy,reconstruct:ours-few', '--json', str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
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


# --- fast decoding -----------------------------------------------------------------------------------------------

def test_fast_generate_gives_hf_generate_tokens():
    check = B.check_fast_generate(seeds=(0, 1, 2, 3), vocabularies=(12, 40, 256))
    assert check['identical'] == check['cases'] == 48 and check['greedy'] and check['beam']
    assert check['early_eos'] >= 12   # EOS ended rows early in many cases


def test_compiled_step_is_one_graph_traced_once():
    graphs = []
    def counting_backend(gm, example_inputs):
        graphs.append(gm); return gm.forward
    check = B.check_fast_generate(compile=counting_backend, seeds=(0,), vocabularies=(12,), max_new_tokens=12)
    assert check['identical'] == check['cases'] == 4
    assert len(graphs) == 2   # the greedy step and the beam step, each traced once for all tokens
    assert B.check_fast_generate(compile='aot_eager', seeds=(2,), vocabularies=(40,))['identical'] == 4


def test_a_step_that_cannot_compile_falls_back_to_eager():
    def failing_backend(gm, example_inputs): raise RuntimeError("no compiler here")
    with pytest.warns(UserWarning, match='failed.*using the eager step'):
        check = B.check_fast_generate(compile=failing_backend, seeds=(0,), vocabularies=(12,))
    assert check['identical'] == check['cases']


def test_switch_in_caption_decoder():
    "The one-line switch for `vlv caption`: CaptionDecoder.generate(..., generate_fn=fast_generate) gives the same captions."
    lm, tokenizer = load_lm(DecodeConfig(lm='random', lm_width=32, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=64))
    captioner = CaptionDecoder(lm, tokenizer, text_width=24).eval()
    conditioning = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    for beams in (1, 3):
        ours = captioner.generate(conditioning, max_new_tokens=20, num_beams=beams, generate_fn=B.fast_generate)
        theirs = captioner.generate(conditioning, max_new_tokens=20, num_beams=beams)
        assert ours.token_ids == theirs.token_ids and ours.texts == theirs.texts


def test_fast_generate_refuses_padded_prefixes():
    lm = B.build_bench_lm(B.TINY_QWEN)
    embeds, mask = torch.randn(2, 4, 32), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(NotImplementedError, match='unpadded'): B.fast_generate(lm, embeds, mask, 4)
    assert hf_generate(lm, embeds, mask, 4).shape[0] == 2


def test_sessions_are_reused_and_freed():
    lm = B.build_bench_lm(B.TINY_QWEN)
    embeds, mask = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.long)
    a = B.fast_generate(lm, embeds, mask, 6)
    session = B.decode_session(lm, 2, 10, None)
    assert B.fast_generate(lm, embeds, mask, 6).tolist() == a.tolist() and B.decode_session(lm, 2, 10, None) is session
    B.clear_sessions(lm)
    assert B.decode_session(lm, 2, 10, None) is not session


# --- stage 1 -----------------------------------------------------------------------------------------------------

def test_our_stage1_loss_equals_the_fp32_reference():
    "Same weights, batch and noise: ours (bf16 autocast, cached fp16 latents, cached features) tracks the fp32 reference."
    report = B.bench_stage1('tiny', configs=('reference', 'ours', 'ours-features'), warmup=0, steps=3, log=lambda s: None)
    losses = {r['name']: r['losses'] for r in report['rows']}
    for name in ('ours', 'ours-features'):
        for mine, theirs in zip(losses[name], losses['reference']):
            assert abs(mine - theirs) <= 2e-2 * abs(theirs), (name, losses)
    assert report['rows'][1]['loss_rel_diff'] < 2e-2


def test_compiled_configurations_restore_the_decoder(monkeypatch):
    "The `*-compile` rows (paper size: Inductor) run the same code: checked here with TorchDynamo's eager backend."
    monkeypatch.setattr(torch, 'compile', partial(torch.compile, backend='eager'))
    report = B.bench_stage1('tiny', configs=('ours-compile-features',), warmup=1, steps=1, log=lambda s: None)
    assert report['rows'][0]['error'] is None and report['rows'][0]['ratio'] is None
    report = B.bench_reconstruct('tiny', configs=('reference', 'ours-compile-few'), warmup=0, steps=1, log=lambda s: None)
    assert [r['error'] for r in report['rows']] == [None, None]
