"""Stage 1 on every source (nbs/04_stage1): streams (the miniature's WebDataset shards, a streamed folder) with the VAE
in the step, resumed at their data position; map-style folders with a latent cache built by every process; bad files
skipped and counted; stop signals (nbs/00e_preemption); and the miniature's stage 1 under `accelerate launch` with 2 CPU
processes (gloo), stopped by a signal to one of them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import vlv.stage1 as S
from vlv.bottleneck import load_decoder
from vlv.checkpoints import unique_state
from vlv.preemption import EXIT_PREEMPTED, Preempted
from vlv.miniature import PHOTOS, miniature_config, photo, write_photo_shards
from vlv.worlds import train_images

QUIET = {'stage1.log_with': 'none', 'stage1.sample_every': 100, 'stage1.checkpoint_every': 100}


@pytest.fixture(scope='module')
def mini(miniature, tmp_path_factory):
    "(folder of the miniature, shard pattern of its 16 photos with photo 1 a truncated JPEG, the frozen decoder)."
    pattern = tmp_path_factory.mktemp('bad-shards') / 'photos-{00000..00001}.tar'
    write_photo_shards(pattern, corrupt=(1,))
    return miniature, str(pattern), load_decoder(miniature_config(miniature).bottleneck)


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory):
    "A folder of 6 of the miniature's photos (64 px JPEGs) with captions, and one truncated JPEG that passes the header check."
    folder = tmp_path_factory.mktemp('photos')
    for i, (package, name, caption) in enumerate(PHOTOS[:6]):
        image = photo(package, name); image.thumbnail((96, 96)); image.save(folder / f'{i}-{name}.jpg', quality=90)
        (folder / f'{i}-{name}.txt').write_text(caption)
    whole = sorted(folder.glob('*.jpg'))[0].read_bytes()
    (folder / '1b-broken.jpg').write_bytes(whole[:len(whole) // 3])
    return folder


def config(folder, **overrides):
    return miniature_config(folder, {**QUIET, 'run.device': 'cpu', **overrides})


def run(cfg, run_dir, decoder, **kwargs):
    images, keys = train_images(cfg)
    return S.train_stage1(cfg, run_dir, images, keys, decoder=decoder, progress=False, **kwargs)


def weights(encoder):
    return {k: v.detach().clone() for k, v in unique_state(encoder)[0].items()}


def log_lines(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / 'stage1' / 'log.jsonl').read_text().splitlines()]


def stopped_and_resumed(cfg, tmp_path, decoder, stop: int = 3, **kwargs):
    "An uninterrupted run and one stopped after `stop` steps then resumed: (full, first part, second part)."
    full = run(cfg, tmp_path / 'full', decoder, **kwargs)
    first = run(cfg, tmp_path / 'resumed', decoder, stop_after=stop, **kwargs)
    second = run(cfg, tmp_path / 'resumed', decoder, resume=True, **kwargs)
    return full, first, second


def test_shards_stream_and_resume_at_their_position(mini, tmp_path):
    "WebDataset shards with a corrupt sample: skipped and counted; stop at 3 + resume == 6 steps in one go (shuffle_buffer=1)."
    folder, pattern, decoder = mini
    cfg = config(folder, **{'data.path': pattern, 'stage1.steps': 6})
    full, first, second = stopped_and_resumed(cfg, tmp_path, decoder)
    assert [h['loss'] for h in full.history] == [h['loss'] for h in first.history + second.history]
    a, b = weights(full.encoder), weights(second.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 6 steps of 4 from 15 good photos: the stream wraps into epoch 1 once, so the corrupt photo is read twice
    assert log_lines(tmp_path / 'full')[-1]['data'] == log_lines(tmp_path / 'resumed')[-1]['data']
    data = log_lines(tmp_path / 'resumed')[-1]['data']
    assert (data['read'], data['bad_image'], sum(data.values()) - data['read']) == (6 * 4 + 2, 2, 2)
    state = json.loads((second.checkpoint / 'state.json').read_text())['stream']
    assert [(p['epoch'], p['consumed']) for p in state['positions']] == [(1, 6 * 4 + 2 - 16)]


def test_stop_signal_checkpoints_and_the_stream_resumes_there(mini, tmp_path):
    "SIGTERM during step 3 of 5: the run ends after step 3 with a checkpoint and a log line; resumed, it equals the run in one go."
    folder, pattern, decoder = mini
    cfg = config(folder, **{'data.path': pattern, 'stage1.steps': 5, 'stage1.log_every': 2})
    full = run(cfg, tmp_path / 'full', decoder)
    def sigterm_in_step_3(step, loss):
        if step == 2: os.kill(os.getpid(), signal.SIGTERM)
        return loss
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match='stopped by SIGTERM after step 3') as stopped:
        run(cfg, tmp_path / 'stopped', decoder, step_hook=sigterm_in_step_3)
    assert signal.getsignal(signal.SIGTERM) == handler   # the handler is ours only while training
    assert stopped.value.checkpoint.name == 'step-0000003'
    assert [r['step'] for r in log_lines(tmp_path / 'stopped')] == [2, 3]   # the window so far is written
    second = run(cfg, tmp_path / 'stopped', decoder, resume=True)
    assert [r['step'] for r in log_lines(tmp_path / 'stopped')] == [2, 3, 4, 5]
    assert [h['loss'] for h in second.history] == [h['loss'] for h in full.history[3:]]
    a, b = weights(full.encoder), weights(second.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(tmp_path / 'full')[-1]['data'] == log_lines(tmp_path / 'stopped')[-1]['data']


def test_folder_streams_when_asked(mini, photo_dir, tmp_path):
    "A folder under data.streaming=true: the same stream path (a RecordStream), resumed exactly; the broken file counted."
    folder, _, decoder = mini
    cfg = config(folder, **{'data.source': 'folder', 'data.path': str(photo_dir), 'data.streaming': True, 'stage1.steps': 4})
    images, keys = train_images(cfg)
    assert type(images).__name__ == 'RecordStream' and keys is None
    full, first, second = stopped_and_resumed(cfg, tmp_path, decoder, stop=2)
    assert [h['loss'] for h in full.history] == [h['loss'] for h in first.history + second.history]
    data = log_lines(tmp_path / 'resumed')[-1]['data']
    assert data == log_lines(tmp_path / 'full')[-1]['data']
    # 16 items of 6 good photos: epochs 0 and 1 whole, 4 of epoch 2 (a new order each epoch); the broken file once per pass
    assert data['read'] == 16 + data['bad_image'] and data['bad_image'] in (2, 3)


def test_map_style_folder_skips_a_bad_file_and_caches_in_parallel(mini, photo_dir, tmp_path):
    "data.streaming=false: the latent cache; every process encodes its share only, a file that fails to decode is left out."
    folder, _, decoder = mini
    cfg = config(folder, **{'data.source': 'folder', 'data.path': str(photo_dir), 'data.streaming': False, 'stage1.steps': 2})
    images, keys = train_images(cfg)
    assert len(images) == 7   # the broken JPEG passes the header check: it fails when decoded
    calls = []
    encode = decoder.latent_posterior
    decoder.latent_posterior = lambda x: (calls.append(len(x)), encode(x))[1]
    seen = []   # the gather of two processes, one after the other: rank 1 gets rank 0's skipped files too
    try:
        shares = [S.stage1_dataset(images, keys, decoder, 64, tmp_path / 'cache', rank=0, world=2, gather=lambda x: (seen.extend(x), x)[1]),
                  S.stage1_dataset(images, keys, decoder, 64, tmp_path / 'cache', rank=1, world=2, gather=lambda x: seen + x)]
    finally: del decoder.latent_posterior
    assert calls == [3, 3]   # items 0, 2, 4, 6 and 1, 3, 5; item 2 is the broken file; nothing is encoded twice
    assert [(d.skipped, len(d)) for d in shares] == [([2], 6)] * 2   # both read the whole cache but the broken file
    result = run(cfg, tmp_path / 'run', decoder, cache_dir=tmp_path / 'cache')
    assert len(result.history) == 2 and log_lines(tmp_path / 'run')[-1]['data'] == {'images': 6, 'skipped': 1}


def test_stream_settings_are_checked(mini, tmp_path):
    folder, pattern, decoder = mini
    cfg = config(folder, **{'data.path': pattern, 'stage1.cache_vision_features': True})
    with pytest.raises(ValueError, match='cache_vision_features'): run(cfg, tmp_path / 'a', decoder)
    cfg = config(folder, **{'data.path': pattern})
    run(cfg, tmp_path / 'b', decoder, stop_after=1)
    with pytest.raises(ValueError, match=r'read by 1 readers .* this run has 2'):   # a StreamResumeError
        run(config(folder, **{'data.path': pattern, 'run.num_workers': 2}), tmp_path / 'b', decoder, resume=True)


@pytest.mark.slow
def test_two_processes_stream_skip_and_resume(mini, tmp_path, run_process):
    """`accelerate launch` (2 CPU processes, gloo) of `vlv stage1 --preset mini` on shards with a corrupt photo, stopped
    after 2 of 4 steps and resumed: the corrupt photo is skipped and counted once, every sample is read once, and the
    TensorBoard events hold the loss and the reconstruction grid."""
    folder, pattern, _ = mini
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0']
    argv = [*launch, '-m', 'vlv.cli', 'stage1', '--preset', 'mini', '--run-dir', 'run', '--no-progress',
            '-o', f'data.path={pattern}', 'run.device=cpu']
    first = run_process([*argv, '--stop-after', '2'], tmp_path, VLV_MINIATURE=str(folder))
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'photos-00000.tar#000000001' in first.stderr   # warned
    stopped = json.loads((tmp_path / 'run' / 'stage1' / 'checkpoints' / 'step-0000002' / 'state.json').read_text())['stream']
    second = run_process([*argv, '--resume'], tmp_path, VLV_MINIATURE=str(folder))
    assert second.returncode == 0, second.stderr[-3000:]
    log = log_lines(tmp_path / 'run')
    assert [r['step'] for r in log] == [1, 2, 3, 4]
    assert (log[-1]['data']['read'], log[-1]['data']['bad_image']) == (4 * 4 + 1, 1)
    # readers: rank r reads shard r (8 photos); 2 per step each. Raw samples taken = epoch * 8 + consumed per reader.
    final = json.loads((tmp_path / 'run' / 'stage1' / 'checkpoints' / 'step-0000004' / 'state.json').read_text())['stream']
    taken = lambda state: {p['reader']: p['epoch'] * 8 + p['consumed'] for p in state['positions']}
    assert taken(stopped) == {0: 5, 1: 4}        # reader 0: photos 0, 2, 3, 4 (1 is corrupt); reader 1: photos 8-11
    assert taken(final) == {0: 9, 1: 8}          # then 5, 6, 7 and epoch 1's photo 0; 12-15: each sample read once
    events = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    acc = events.EventAccumulator(str(tmp_path / 'run' / 'stage1' / 'tensorboard'),
                                  size_guidance={events.SCALARS: 0, events.IMAGES: 0}).Reload()
    assert [e.step for e in acc.Scalars('train/loss')] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars('data/bad_image')][-1] == 1
    assert [g.step for g in acc.Images('validation/reconstructions')] == [2, 4]


def good_samples_taken(raw: int, bad: set[int], per_epoch: int) -> int:
    "Good samples among the first `raw` of a reader whose shard has `per_epoch` samples, those at `bad` corrupt."
    return sum(i % per_epoch not in bad for i in range(raw))


@pytest.mark.slow
def test_two_processes_stop_on_a_signal(mini, tmp_path, subprocess_env):
    """`accelerate launch` (2 CPU processes) of `vlv stage1 --preset mini --auto-resume`. SIGUSR1 to rank 1 only: both ranks
    stop after the same step with one checkpoint and exit 75. The same command resumes it at the recorded data position;
    SIGUSR1 to the launcher (told to pass it on, as in the README's SLURM script) stops both ranks again."""
    psutil = pytest.importorskip('psutil')
    folder, pattern, _ = mini
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0']
    argv = [*launch, '-m', 'vlv.cli', 'stage1', '--preset', 'mini', '--run-dir', 'run', '--no-progress', '--auto-resume',
            '-o', f'data.path={pattern}', 'run.device=cpu', 'stage1.steps=60', 'stage1.log_every=1',
            'stage1.checkpoint_every=100', 'stage1.sample_every=100']
    env = subprocess_env(VLV_MINIATURE=str(folder), PET_SIGNALS_TO_HANDLE='SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1')
    log, checkpoints = tmp_path / 'run' / 'stage1' / 'log.jsonl', tmp_path / 'run' / 'stage1' / 'checkpoints'

    def launch_and_signal(after_step: int, target: Callable) -> tuple[str, int]:
        "Start the command, wait for `after_step` log lines, send SIGUSR1 to `target(launcher)`: (stderr, last logged step)."
        launcher = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            while not (log.exists() and len(log.read_text().splitlines()) >= after_step):
                assert launcher.poll() is None and time.monotonic() < deadline, 'the run ended or stalled'
                time.sleep(0.2)
            target(psutil.Process(launcher.pid)).send_signal(signal.SIGUSR1)
            _, err = launcher.communicate(timeout=180)
        finally:
            if launcher.poll() is None: launcher.kill()
        assert launcher.returncode != 0, err[-3000:]
        steps = [r['step'] for r in log_lines(tmp_path / 'run')]
        assert steps == list(range(1, steps[-1] + 1)) and after_step <= steps[-1] < 60, err[-3000:]
        return err, steps[-1]

    def taken(step: int) -> dict[int, int]:
        "Raw samples each reader took by the checkpoint of `step` (epochs of 8 samples)."
        state = json.loads((checkpoints / f'step-{step:07d}' / 'state.json').read_text())['stream']
        return {p['reader']: p['epoch'] * 8 + p['consumed'] for p in state['positions']}

    rank_1 = lambda launcher: next(p for p in launcher.children() if p.environ().get('RANK') == '1')
    err, first = launch_and_signal(2, rank_1)
    assert 'vlv: got SIGUSR1' in err and 'stopped by a stop signal to another process after step' in err, err[-3000:]
    assert f'exitcode  : {EXIT_PREEMPTED}' in err, err[-3000:]
    assert sorted(p.name for p in checkpoints.glob('step-*')) == [f'step-{first:07d}']   # only the one the signal asked for
    err, second = launch_and_signal(first + 2, lambda launcher: launcher)   # --auto-resume: continues from `first`
    assert err.count('vlv: got SIGUSR1') == 2 and 'stopped by SIGUSR1 after step' in err, err[-3000:]
    # reader r reads shard r (8 photos, photo 1 of shard 0 corrupt), 2 good photos a step: nothing repeated or skipped
    for step in (first, second):
        assert taken(step) == {0: min(n for n in range(200) if good_samples_taken(n, {1}, 8) == 2 * step), 1: 2 * step}


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_exactly(mini, photo_dir, tmp_path, run_process, fsdp_launch):
    """Stage 1 under `accelerate launch` with the shipped fsdp.yaml (2 processes, FSDP2 over gloo: the Florence-2
    layers sharded) on a map-style folder: stopped after 2 of 4 steps and resumed, its losses, encoder and optimiser
    states (gathered from both ranks' shards, loaded back into them) equal those of one process in one go; the
    reconstruction grid is drawn."""
    from safetensors.torch import load_file
    folder = mini[0]
    args = ['stage1', '--preset', 'mini', '--no-progress', '-o', 'data.source=folder', f'data.path={photo_dir}', 'data.streaming=false',
            'run.device=cpu', 'stage1.log_with=none', 'stage1.sample_every=4', 'stage1.checkpoint_every=2', 'stage1.lr=1e-3']
    one = run_process([sys.executable, '-m', 'vlv.cli', *args, '-o', 'stage1.grad_accum=2', '--run-dir', 'one'], tmp_path,
                      VLV_MINIATURE=str(folder))   # micro-batches of 2 images seeded alike: 2 in one process, 1 on each of 2
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp = [*fsdp_launch(2), *args, '--run-dir', 'fsdp']
    first = run_process([*fsdp, '--stop-after', '2'], tmp_path, VLV_MINIATURE=str(folder))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_process([*fsdp, '--resume'], tmp_path, VLV_MINIATURE=str(folder))
    assert second.returncode == 0, second.stderr[-3000:]
    losses = [[r['loss'] for r in log_lines(tmp_path / run)] for run in ('one', 'fsdp')]
    assert len(losses[1]) == 4 and torch.allclose(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5)
    assert (tmp_path / 'fsdp' / 'stage1' / 'recon-step0000004.png').is_file()   # the grid: every process ran the encoder
    encoders = [load_file(tmp_path / run / 'stage1' / 'encoder' / 'model.safetensors') for run in ('one', 'fsdp')]
    assert encoders[0].keys() == encoders[1].keys()
    for k in encoders[0]: torch.testing.assert_close(encoders[1][k], encoders[0][k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f'{k}: {m}')
    for step in (2, 4):
        states = [torch.load(tmp_path / run / 'stage1' / 'checkpoints' / f'step-{step:07d}' / 'optimizer.pt', weights_only=True)
                  ['optimizer']['state'] for run in ('one', 'fsdp')]
        assert states[0].keys() == states[1].keys() and len(states[0]) > 0
        for k in states[0]: torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f'{k}: {m}')
