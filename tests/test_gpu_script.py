"""scripts/gpu_stage1.py, the paper-size stage-1 check for one GPU, run the same way at the `mini` preset's sizes on the CPU."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch


@pytest.fixture(scope='module')
def script(repo):
    "The script as a module (scripts/ is no package)."
    spec = importlib.util.spec_from_file_location('gpu_stage1', repo / 'scripts' / 'gpu_stage1.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    "Each run is one process's whole life: Accelerate's process-wide state (its mixed precision) is reset around every test."
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_tiny_run(script, tmp_path):
    out = tmp_path / 'out'
    assert script.main(['--tiny', '--out', str(out), '--work', str(tmp_path / 'work')]) == 0
    report = json.loads((out / 'gpu_stage1.json').read_text())
    assert report['status'] == 'ok', report
    assert list(report['phases']) == ['write_florence', 'build_decoder', 'data', 'train', 'checkpoint_round_trip', 'grid', 'stage2']
    train, size = report['train'], script.SIZES['tiny']
    assert train['steps'] == size['warmup'] + size['steps'] and train['timed_steps'] == size['steps']
    assert train['batch_size'] == size['batch_size'] and train['images_per_s'] > 0 and train['peak_memory_gib'] > 0
    assert all(map(torch.isfinite, torch.tensor(train['losses'])))
    ckpt = report['checkpoint']
    assert ckpt['equal'] and ckpt['differed_before_load'] > 0 and ckpt['step'] == train['steps']
    assert ckpt['optimizer_states'] == ckpt['trainable_tensors'] > 0 and 'encoder/model.safetensors' in ckpt['files']
    # the vocabulary arithmetic that gives Florence-2-large's 51,289 rows at full size
    assert report['parameters']['florence_vocab'] == size['florence_tokens'] + script.FLORENCE_SPECIALS
    assert script.SIZES['full']['florence_tokens'] + script.FLORENCE_SPECIALS == script.FLORENCE2_LARGE_VOCAB
    assert report['grid']['finite'] and (out / 'recon.png').stat().st_size > 0
    assert len((out / 'log.jsonl').read_text().splitlines()) == train['steps']
    stage2 = report['stage2']   # a few stage-2 steps on the shards' captions: the LM over the Qwen2.5 tokenizer's vocabulary
    assert stage2['steps'] == train['steps'] and stage2['tokens_per_s'] > 0 and stage2['peak_memory_gib'] > 0
    assert stage2['vocabulary'] == size['qwen_tokens'] + 3 and all(map(torch.isfinite, torch.tensor(stage2['losses'])))
    assert len((out / 'stage2_log.jsonl').read_text().splitlines()) == stage2['steps']


def test_out_of_memory_halves_the_batch(script, tmp_path, monkeypatch):
    "Out of memory: the batch is halved and the run goes on (here in bf16 with bf16 decoder weights, as on a GPU)."

    real, calls = script.train_stage1, []
    def train_stage1(cfg, *args, **kwargs):
        calls.append(cfg.stage1.batch_size)
        if len(calls) == 1: raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(cfg, *args, **kwargs)
    monkeypatch.setattr(script, 'train_stage1', train_stage1)
    out = tmp_path / 'out'
    assert script.main(['--tiny', '--batch-size', '16', '--steps', '1', '--data', 'synthetic', '-o', 'stage1.mixed_precision=bf16',
                        '--out', str(out), '--work', str(tmp_path / 'work')]) == 0
    report = json.loads((out / 'gpu_stage1.json').read_text())
    assert calls == [16, 8] and report['status'] == 'ok'
    assert report['train_attempts'][0]['batch_size'] == 16 and 'out of memory' in report['train_attempts'][0]['error']
    assert report['train']['batch_size'] == 8 and report['checkpoint']['equal']   # the round trip checks against batch 8's config
    assert 'synthetic' in report['data']['source'] and report['config']['mixed_precision'] == 'bf16' and report['grid']['finite']


def test_no_grid(script, tmp_path):
    out = tmp_path / 'out'
    assert script.main(['--tiny', '--steps', '1', '--no-grid', '--out', str(out), '--work', str(tmp_path / 'work')]) == 0
    report = json.loads((out / 'gpu_stage1.json').read_text())
    assert report['status'] == 'ok' and 'grid' not in report['phases'] and not (out / 'recon.png').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is here')
def test_full_size_needs_a_gpu(script, tmp_path):
    out = tmp_path / 'out'
    assert script.main(['--out', str(out), '--work', str(tmp_path / 'work')]) == 1
    report = json.loads((out / 'gpu_stage1.json').read_text())
    assert report['status'] == 'failed' and 'no CUDA device' in report['error'] and report['phases'] == {}


def test_arguments(script):
    args = script.parse_args([])
    assert (args.batch_size, args.warmup, args.steps) == (64, 3, 5) and args.size['preset'] == 'paper'
    for bad in (['--batch-size', '6', '--grad-accum', '4'], ['--steps', '0'], ['--workers', '-1']):
        with pytest.raises(SystemExit): script.parse_args(bad)


def test_gpu_studies_fill_the_notebooks_caches(repo, tmp_path, run_process):
    "scripts/gpu_studies.sh trains nbs/06's stage-2 studies of a seed (tracker off) and brings back the summaries under the cache keys nbs/06 looks up."
    from vlv.core import get_config
    from vlv.encoder import build_encoder, save_encoder
    from vlv.experiments import spec_name, stage2_study_jobs, study_spec
    from vlv.worlds import load_bottleneck
    cfg = get_config('smoke', 'run.seed=3')
    encoder = save_encoder(build_encoder(cfg.encoder, load_bottleneck(cfg).text_width, seed=3), tmp_path / 'enc' / 'seed-3')
    done = run_process(['bash', repo / 'scripts' / 'gpu_studies.sh', '--preset', 'smoke', '--seeds', '3', '--workers', '2', '--only', '2',
                        '--encoders', tmp_path / 'enc'], repo, OUT=str(tmp_path / 'back'), WHEEL_DIR=str(tmp_path / 'no-wheels'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from vlv.seeds import seed_overrides   # what `vlv seeds` passes: the script writes its own copy (no papermill on the GPU machine)
    wanted = {spec_name(study_spec(2, c, e)) for c, e in stage2_study_jobs('smoke', seed_overrides('', 3), encoder).values()}
    back = {p.stem.split('_')[-1]: json.loads(p.read_text()) for p in (tmp_path / 'back').glob('seed-3_studies_*.json')}
    assert set(back) == wanted and all(s['device'] == 'cpu' and s['steps'] == cfg.experiments.study_steps for s in back.values())
