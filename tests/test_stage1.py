"""Tests of vlv.stage1: resume, multi-process equivalence, NaN handling, checkpoints, CLI (tiny models, CPU)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import vlv.stage1 as S
from vlv.checkpoints import CheckpointMismatch, read_safetensors, unique_state
from vlv.encoder import load_encoder
from vlv.worlds import test_images as shapes_test_images, train_images

@pytest.fixture(scope='module')
def decoder(tiny_decoder):
    return tiny_decoder


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('latents')


def train(cfg, run_dir, decoder, cache, **kwargs):
    "`train_stage1` on the Shapes training images of `cfg`, with the shared latent cache, without a progress bar."
    images, keys = train_images(cfg)   # API: train_stage1 takes the training images (and their cache keys) from outside
    return S.train_stage1(cfg, run_dir, images, keys, decoder=decoder, cache_dir=cache, progress=False, **kwargs)


def weights(encoder):
    return {k: v.detach().clone() for k, v in unique_state(encoder)[0].items()}


def test_outputs_of_a_run(decoder, cache, tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    result = train(cfg, tmp_path, decoder, cache, sample_images=shapes_test_images(cfg, cfg.stage1.sample_images))
    folder = tmp_path / 'stage1'
    assert {'checkpoints', 'encoder', 'log.jsonl'} <= {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in folder.glob('recon-step*.png')) == ['recon-step0000002.png', 'recon-step0000004.png']
    log = [json.loads(l) for l in (folder / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == [1, 2, 3, 4]
    assert {'loss', 'lr', 'grad_norm', 'images_per_s', 'seconds'} <= set(log[0])
    assert log[-1]['lr'] == 0.0                     # cosine horizon = the run length
    ckpts = sorted(p.name for p in (folder / 'checkpoints').glob('step-*'))
    assert ckpts == ['step-0000002', 'step-0000004']
    assert sorted(p.name for p in result.checkpoint.iterdir()) == ['encoder', 'optimizer.pt', 'rng.safetensors', 'state.json']
    assert json.loads((folder / 'checkpoints' / 'latest.json').read_text())['path'] == 'step-0000004'
    assert not list((folder / 'checkpoints').glob('.*tmp*'))
    loaded = load_encoder(folder / 'encoder')
    for k, v in weights(result.encoder).items(): assert torch.equal(v, unique_state(loaded)[0][k]), k


def test_resume_is_exact(decoder, cache, tmp_path, tiny_cfg):
    "N steps, then resume for N more, gives the same weights as 2N steps in one go (CPU, bit for bit)."
    cfg = tiny_cfg('stage1.steps=6 stage1.checkpoint_every=3 stage1.sample_every=100 encoder.dropout=0.1 encoder.drop_path_rate=0.1')
    full = train(cfg, tmp_path / 'full', decoder, cache)
    first = train(cfg, tmp_path / 'resumed', decoder, cache, stop_after=3)
    assert first.checkpoint.name == 'step-0000003'
    second = train(cfg, tmp_path / 'resumed', decoder, cache, resume=True)
    a, b = weights(full.encoder), weights(second.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h['loss'] for h in full.history] == [h['loss'] for h in first.history + second.history]
    log = [json.loads(l)['step'] for l in (tmp_path / 'resumed' / 'stage1' / 'log.jsonl').read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


def test_a_resumed_result_reports_the_whole_run(decoder, cache, tmp_path, tiny_cfg):
    "After a resume, and after resuming a finished run (nothing to train), the result's steps, final loss and curve are the whole run's."
    cfg = tiny_cfg('stage1.steps=6 stage1.checkpoint_every=2 stage1.log_every=2 stage1.sample_every=100')
    full = train(cfg, tmp_path / 'full', decoder, cache)
    train(cfg, tmp_path / 'resumed', decoder, cache, stop_after=4)
    rest = train(cfg, tmp_path / 'resumed', decoder, cache, resume=True)
    assert (rest.start, len(rest.history), rest.steps) == (4, 2, 6)
    assert [h['step'] for h in rest.curve] == [2, 4, 5, 6]   # two log lines of 2 steps each, then every step
    assert rest.final_loss == pytest.approx(full.final_loss, rel=1e-6)   # the mean of all 6 steps either way
    assert rest.run_seconds > rest.seconds > 0
    again = train(cfg, tmp_path / 'full', decoder, cache, resume=True)   # finished: nothing to train
    assert (again.history, again.steps) == ([], 6)
    assert again.final_loss == pytest.approx(full.final_loss, rel=1e-6)
    a, b = weights(full.encoder), weights(again.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_refused(decoder, cache, tmp_path, tiny_cfg):
    "(nbs/04_stage1 checks the other way round: a second run into a folder with checkpoints needs resume=True.)"
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        train(tiny_cfg(), tmp_path, decoder, cache, resume=True)


def test_resume_with_another_config_is_refused(decoder, cache, tmp_path, tiny_cfg):
    train(tiny_cfg(), tmp_path, decoder, cache, stop_after=2)
    with pytest.raises(ValueError, match=r'encoder.num_queries: checkpoint 4 vs now 8'):
        train(tiny_cfg('encoder.num_queries=8'), tmp_path, decoder, cache, resume=True)
    # the weights themselves are checked strictly too: a checkpoint of another shape names keys and shapes
    with pytest.raises(CheckpointMismatch, match=r'queries: checkpoint \[1, 4, 32\] vs model \[1, 8, 32\]'):
        load_encoder(tmp_path / 'stage1' / 'checkpoints' / 'step-0000002' / 'encoder', cfg=tiny_cfg('encoder.num_queries=8').encoder)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(decoder, cache, tmp_path, tiny_cfg):
    cfg = tiny_cfg('stage1.steps=6 stage1.checkpoint_every=2')
    hook = lambda step, loss: loss * float('nan') if step == 3 else loss   # the 4th step goes bad
    with pytest.raises(S.NonFiniteLoss, match=r'step 4.*last good checkpoint is .*step-0000002'):
        train(cfg, tmp_path, decoder, cache, step_hook=hook)
    ckpts = tmp_path / 'stage1' / 'checkpoints'
    assert json.loads((ckpts / 'latest.json').read_text())['step'] == 2
    assert sorted(p.name for p in ckpts.glob('step-*')) == ['step-0000002']
    w, _ = read_safetensors(ckpts / 'step-0000002' / 'encoder' / 'model.safetensors')
    assert all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point())
    resumed = train(cfg, tmp_path, decoder, cache, resume=True)
    assert resumed.history[0]['step'] == 3 and all(torch.isfinite(torch.tensor(h['loss'])) for h in resumed.history)


def test_crash_while_checkpointing_keeps_the_previous_one(decoder, cache, tmp_path, monkeypatch, tiny_cfg):
    cfg = tiny_cfg('stage1.checkpoint_every=2')
    real, calls = S.save_encoder, []
    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2: raise OSError("disk full")
        return real(*args, **kwargs)
    monkeypatch.setattr(S, 'save_encoder', flaky)
    with pytest.raises(OSError, match='disk full'):
        train(cfg, tmp_path, decoder, cache)
    ckpts = tmp_path / 'stage1' / 'checkpoints'
    assert json.loads((ckpts / 'latest.json').read_text())['path'] == 'step-0000002'
    assert [p.name for p in ckpts.iterdir() if p.name.startswith('.')] == []


def test_step_batches_shard_the_global_batch():
    one = S.StepBatches(20, 8, 1, 1, 0, seed=1, start_step=0, steps=4)
    two = [S.StepBatches(20, 8, 2, 2, r, seed=1, start_step=0, steps=4) for r in (0, 1)]
    for step in range(4):
        parts = [two[r].indices(step, m) for m in (0, 1) for r in (0, 1)]
        assert [i for p in parts for i in p] == one.indices(step, 0)
    with pytest.raises(ValueError, match='divisible'): S.StepBatches(20, 6, 1, 4, 0, 0, 0, 1)


@pytest.fixture(scope='module')
def vlv_stage1_argv(tiny_overrides):
    "`vlv stage1` (as `python -m vlv.cli stage1`, smoke preset) with the tiny config's overrides in one `-o`; add another `-o`."
    # API: `python -m vlv.cli stage1` replaces `python -m vlv.stage1`; repeated -o accumulate
    return ['-m', 'vlv.cli', 'stage1', '--preset', 'smoke', '-o', *tiny_overrides.split()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, run_process, vlv_stage1_argv):
    """2 CPU processes (torchrun, gloo), 1 micro-batch each == 1 process with 2 micro-batches (same global batch,
    same samples, same noise): weights agree to 1e-6 (measured: exactly equal)."""
    overrides = ['stage1.steps=3', 'stage1.sample_every=100']
    one = run_process([sys.executable, *vlv_stage1_argv, '-o', *overrides, 'stage1.grad_accum=2', '--run-dir', 'one',
                       '--no-progress'], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which('torchrun') or str(Path(sys.executable).parent / 'torchrun')
    two = run_process([torchrun, '--standalone', '--nproc_per_node', '2', *vlv_stage1_argv, '-o', *overrides,
                       '--run-dir', 'two', '--no-progress'], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = read_safetensors(tmp_path / 'one' / 'stage1' / 'encoder' / 'model.safetensors')
    b, _ = read_safetensors(tmp_path / 'two' / 'stage1' / 'encoder' / 'model.safetensors')
    assert set(a) == set(b)
    for k in a: torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    la = [json.loads(l)['loss'] for l in (tmp_path / 'one' / 'stage1' / 'log.jsonl').read_text().splitlines()]
    lb = [json.loads(l)['loss'] for l in (tmp_path / 'two' / 'stage1' / 'log.jsonl').read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


@pytest.mark.slow
def test_command_line(tmp_path, run_process, vlv_stage1_argv):
    bad = run_process([sys.executable, *vlv_stage1_argv, '-o', 'stage1.stepz=3', '--run-dir', 'x'], tmp_path)
    assert bad.returncode == 1 and "unknown config key 'stage1.stepz'" in bad.stderr and 'stage1.steps' in bad.stderr
    ok = run_process([sys.executable, *vlv_stage1_argv, '-o', 'stage1.steps=2', '--run-dir', 'r', '--no-progress'], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert 'vlv stage1: 2 steps' in ok.stdout and (tmp_path / 'r' / 'stage1' / 'encoder' / 'model.safetensors').exists()
    again = run_process([sys.executable, *vlv_stage1_argv, '-o', 'stage1.steps=2', '--run-dir', 'r'], tmp_path)
    assert again.returncode == 1 and 'resume' in again.stderr
    finished = run_process([sys.executable, *vlv_stage1_argv, '-o', 'stage1.steps=2', '--run-dir', 'r', '--resume', '--no-progress'], tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert 'vlv stage1: 2 steps (0 in this call)' in finished.stdout   # a finished run resumed: the whole run's summary


def test_shipped_accelerate_configs():
    import yaml
    from vlv.launch import accelerate_config
    kinds = {'ddp': 'MULTI_GPU', 'fsdp': 'FSDP', 'deepspeed-zero2': 'DEEPSPEED'}
    for kind, distributed in kinds.items():
        config = yaml.safe_load(accelerate_config(kind).read_text())
        assert config['distributed_type'] == distributed and config['mixed_precision'] == 'bf16'
    assert yaml.safe_load(accelerate_config('deepspeed-zero2').read_text())['deepspeed_config']['zero_stage'] == 2
    with pytest.raises(FileNotFoundError, match='shipped'): accelerate_config('zero3')


def test_cached_vision_features_give_the_same_run(decoder, cache, tmp_path, tiny_cfg):
    "With a frozen vision tower, caching its outputs changes nothing but the speed."
    base = 'encoder.train_vision=false stage1.steps=10 stage1.sample_every=100 stage1.checkpoint_every=100'   # 40 > 32 items: hits
    plain = train(tiny_cfg(base), tmp_path / 'plain', decoder, cache)
    cached = train(tiny_cfg(base + ' stage1.cache_vision_features=true'), tmp_path / 'cached', decoder, cache)
    # The two runs differ only in the rounding of the vision features; AdamW divides each gradient by its own running
    # size, which turns rounding noise in near-zero gradients (attention key biases get exactly zero gradient in exact
    # arithmetic) into lr-sized steps. So compare the losses, the other weights (measured: at most 9e-6 apart after
    # 10 steps), and what the encoders compute (8e-7).
    torch.testing.assert_close([h['loss'] for h in plain.history], [h['loss'] for h in cached.history], atol=1e-6, rtol=0)
    a, b = weights(plain.encoder), weights(cached.encoder)
    for k in a:
        if not k.endswith('k_proj.bias'): torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): torch.testing.assert_close(plain.encoder.eval()(images), cached.encoder.eval()(images), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in cached.encoder.parts()['vision'])


def test_gradient_checkpointing_recomputes_and_changes_nothing(decoder, cache, tmp_path, tiny_cfg):
    """stage1.gradient_checkpointing (Florence-2's BART layers) and stage1.unet_checkpointing (the frozen UNet): each layer
    runs again in backward, and the run is the same, loss for loss and weight for weight (dropout on: its draws are replayed)."""
    base = 'stage1.steps=3 stage1.sample_every=100 stage1.checkpoint_every=100 encoder.dropout=0.1'
    runs, calls = {}, {}
    for name, flags in {'plain': '', 'checkpointed': 'stage1.gradient_checkpointing=true stage1.unet_checkpointing=true'}.items():
        count = {'bart': 0, 'unet': 0}
        resnets = {id(m) for m in decoder.unet.modules() if type(m).__name__ == 'ResnetBlock2D'}
        def hook(module, args):   # every module call, recomputations in backward included (they run inside the layers)
            if type(module).__name__ == 'BartAttention': count['bart'] += 1
            if id(module) in resnets: count['unet'] += 1
        handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        try: runs[name] = train(tiny_cfg(f'{base} {flags}'), tmp_path / name, decoder, cache)
        finally: handle.remove(); decoder.unet.disable_gradient_checkpointing()
        calls[name] = count
    # without checkpointing the forward only; with it the layers that need gradients run again in backward
    assert 0 < calls['plain']['bart'] < calls['checkpointed']['bart'] and 0 < calls['plain']['unet'] < calls['checkpointed']['unet'], calls
    assert [h['loss'] for h in runs['plain'].history] == [h['loss'] for h in runs['checkpointed'].history]
    a, b = weights(runs['plain'].encoder), weights(runs['checkpointed'].encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
