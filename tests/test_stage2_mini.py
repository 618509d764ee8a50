"""Stage 2 on real (image, caption) pairs (nbs/05c_stage2, vlv.worlds.caption_pairs): the miniature's WebDataset shards
(captions from `.txt` or the `.json` field), a JSONL manifest read map-style and a folder with sidecar `.txt` files
streamed; samples without a caption skipped and counted; stop + resume equal to a run in one go; micro-batches; and
`vlv stage2 --preset mini` under `accelerate launch` with 2 CPU processes (gloo), resumed."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlv.bottleneck import load_decoder
from vlv.decode import CaptionDecoder, Stage2Model, load_lm
from vlv.encoder import build_encoder, save_encoder
from vlv.miniature import PHOTOS, miniature_config, photo, photo_records, write_photo_shards
from vlv.preemption import Preempted
from vlv.sources import write_shard
from vlv.stage2 import train_stage2
from vlv.worlds import caption_pairs

QUIET = {'decode.log_with': 'none', 'decode.checkpoint_every': 100, 'run.device': 'cpu', 'decode.log_every': 1}
NO_CAPTION = 2   # the photo stored without a caption


@pytest.fixture(scope='module')
def mini(miniature, tmp_path_factory):
    "(folder of the miniature, shard pattern of its 16 photos with photo 2 uncaptioned, the frozen decoder, a stage-1 encoder)."
    pattern = tmp_path_factory.mktemp('shards') / 'photos-{00000..00001}.tar'
    write_photo_shards(pattern, [(p, n, None if i == NO_CAPTION else c) for i, (p, n, c) in enumerate(PHOTOS)])
    cfg = miniature_config(miniature)
    decoder = load_decoder(cfg.bottleneck)
    return miniature, str(pattern), decoder, build_encoder(cfg.encoder, decoder.text_width, seed=0)


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory):
    "Six of the miniature's photos as JPEGs in a folder, five with a sidecar caption, and a JSONL manifest of them."
    folder = tmp_path_factory.mktemp('photos')
    lines = []
    for i, (package, name, caption) in enumerate(PHOTOS[:6]):
        image = photo(package, name); image.thumbnail((96, 96)); image.save(folder / f'{i}-{name}.jpg', quality=90)
        if i != NO_CAPTION: (folder / f'{i}-{name}.txt').write_text(caption)
        lines.append(json.dumps({'image': f'{i}-{name}.jpg', 'caption': None if i == NO_CAPTION else caption}))
    (folder / 'photos.jsonl').write_text('\n'.join(lines) + '\n')
    return folder


def config(folder, **overrides):
    return miniature_config(folder, {**QUIET, **overrides})


def captioner(cfg, decoder):
    "A fresh captioner of the miniature: the same encoder, psi and LM every time (the frozen decoder is shared)."
    lm, tokenizer = load_lm(cfg.decode, seed=cfg.run.seed)
    return Stage2Model(build_encoder(cfg.encoder, decoder.text_width, seed=0), decoder,
                       CaptionDecoder(lm, tokenizer, decoder.text_width, cfg.decode.psi_hidden, seed=cfg.run.seed))


def run(cfg, out, mini, **kwargs):
    "Stage 2 of `cfg` into `out` on a fresh captioner: (history, trained weights)."
    model = captioner(cfg, mini[2])
    history = train_stage2(model, caption_pairs(cfg), cfg, out, progress=False, **kwargs)
    return history, {k: v.detach().clone() for k, v in model.trainable_state().items()}


def log_lines(out):
    return [json.loads(l) for l in (Path(out) / 'log.jsonl').read_text().splitlines()]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_give_their_captions_and_uncaptioned_samples_are_counted(mini, tmp_path, monkeypatch):
    """The shards' captions reach the loss; photo 2 (no caption) is read once per pass, never trained on, and counted.
    The miniature trains what the paper trains: psi, the LM and the encoder's language model."""
    folder, pattern, *_ = mini
    cfg = config(folder, **{'data.path': pattern, 'decode.steps': 3})
    assert cfg.decode.train == 'psi+lm+encoder'
    seen, loss = [], CaptionDecoder.loss
    monkeypatch.setattr(CaptionDecoder, 'loss', lambda self, c, captions: seen.append(list(captions)) or loss(self, c, captions))
    history, weights = run(cfg, tmp_path / 'a', mini)
    assert any(k.startswith('encoder.') for k in weights) and any(k.startswith('caption_decoder.lm.') for k in weights)
    assert len(history) == 3 and all(np.isfinite(h['loss']) and h['tokens'] > 0 for h in history)
    known = {c for _, _, c in PHOTOS}
    assert [len(s) for s in seen] == [4] * 3 and all(c in known for s in seen for c in s)
    assert PHOTOS[NO_CAPTION][2] not in {c for s in seen for c in s}
    data = log_lines(tmp_path / 'a')[-1]['data']   # 12 captioned samples used; photo 2 dropped on the way
    assert (data['read'], data['no_caption'], sum(v for k, v in data.items() if k != 'read')) == (13, 1, 1)
    assert log_lines(tmp_path / 'a')[-1]['tokens_per_s'] > 0


def test_a_json_caption_is_read_when_a_sample_has_no_txt(mini, tmp_path):
    "WebDataset: with `.txt` absent, the caption comes from the `.json` field `caption` (stage 2 only reads it then)."
    records = list(photo_records(PHOTOS[:2], max_side=64))
    for r in records: r['meta'] = {**r['meta'], 'caption': r.pop('caption')}   # json only
    write_shard(tmp_path / 'json-0.tar', records)
    cfg = config(mini[0], **{'data.path': str(tmp_path / 'json-0.tar')})
    items = iter(caption_pairs(cfg))
    assert [next(items)['caption'] for _ in range(2)] == [PHOTOS[0][2], PHOTOS[1][2]]


def stop_in_step(k: int):
    "A step hook that sends this process SIGTERM in step `k` (0-based), as SLURM would."
    def hook(step):
        if step == k: os.kill(os.getpid(), signal.SIGTERM)
    return hook


@pytest.mark.parametrize('source', ['webdataset', 'jsonl'])
def test_stop_and_resume_equal_one_run(mini, photo_dir, tmp_path, source):
    """A stream (the shards) and a map-style JSONL manifest: SIGTERM in step 2 of 4 ends the run with a checkpoint and
    `Preempted`; resumed, the losses and trained weights are bit-identical to a run in one go."""
    folder, pattern, *_ = mini
    data = {'data.path': pattern} if source == 'webdataset' else \
        {'data.source': 'jsonl', 'data.path': str(photo_dir / 'photos.jsonl'), 'data.streaming': False}
    cfg = config(folder, **data, **{'decode.steps': 4})
    full, weights = run(cfg, tmp_path / 'full', mini)
    with pytest.raises(Preempted, match='stopped by SIGTERM after step 2') as stopped:
        run(cfg, tmp_path / 'resumed', mini, step_hook=stop_in_step(1))
    assert stopped.value.checkpoint.name == 'step-0000002'
    resumed, resumed_weights = run(cfg, tmp_path / 'resumed', mini)
    assert [h['loss'] for h in resumed] == [h['loss'] for h in full]
    assert same_weights(weights, resumed_weights)
    assert [r['step'] for r in log_lines(tmp_path / 'resumed')] == [1, 2, 3, 4]
    last = log_lines(tmp_path / 'resumed')[-1]['data']
    assert last == log_lines(tmp_path / 'full')[-1]['data']
    if source == 'jsonl': assert last == {'captioned': 5, 'no_caption': 1}


def test_micro_batches_train_like_one_batch(mini, photo_dir, tmp_path):
    """A folder with sidecar captions, streamed: 4 micro-batches of 1 give the losses and weights of one batch of 4 (the
    loss is the token mean over the whole batch). psi + LM: the miniature's encoder has dropout, drawn per micro-batch."""
    folder, *_ = mini
    data = {'data.source': 'folder', 'data.path': str(photo_dir), 'data.streaming': True, 'decode.steps': 2,
            'decode.train': 'psi+lm'}
    one, w_one = run(config(folder, **data), tmp_path / 'one', mini)
    four, w_four = run(config(folder, **data, **{'decode.grad_accum': 4}), tmp_path / 'four', mini)
    np.testing.assert_allclose([h['loss'] for h in four], [h['loss'] for h in one], rtol=1e-5)
    assert [h['tokens'] for h in four] == [h['tokens'] for h in one]
    for k in w_one: torch.testing.assert_close(w_four[k], w_one[k], rtol=1e-4, atol=1e-6)
    assert log_lines(tmp_path / 'four')[-1]['data']['no_caption'] >= 1


@pytest.mark.slow
def test_two_processes_run_and_resume(mini, tmp_path, run_process):
    """`accelerate launch` (2 CPU processes, gloo) of `vlv stage2 --preset mini` on the shards (photo 2 uncaptioned), on
    a stage-1 encoder in RUN_DIR/stage1/encoder: stopped after 2 of 4 steps, resumed, it writes the model; every rank
    reads its own shard, and photo 2 is counted once."""
    folder, pattern, _, encoder = mini
    save_encoder(encoder, tmp_path / 'run' / 'stage1' / 'encoder')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0']
    argv = [*launch, '-m', 'vlv.cli', 'stage2', '--preset', 'mini', '--run-dir', 'run', '--no-progress',
            '-o', f'data.path={pattern}', 'run.device=cpu', 'decode.log_every=1', 'decode.grad_accum=2']
    first = run_process([*argv, '--stop-after', '2'], tmp_path, VLV_MINIATURE=str(folder))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_process([*argv, '--stop-after', '3'], tmp_path, VLV_MINIATURE=str(folder))
    assert again.returncode == 1 and 'already holds checkpoints' in again.stderr, again.stderr[-3000:]
    second = run_process([*argv, '--resume'], tmp_path, VLV_MINIATURE=str(folder))
    assert second.returncode == 0, second.stderr[-3000:]
    log = log_lines(tmp_path / 'run' / 'stage2')
    assert [r['step'] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in log)
    assert (log[-1]['data']['read'], log[-1]['data']['no_caption']) == (4 * 4 + 1, 1)
    state = json.loads((tmp_path / 'run' / 'stage2' / 'checkpoints' / 'step-0000004' / 'state.json').read_text())['stream']
    # rank r reads shard r (8 photos; photo 2 of shard 0 has no caption), 2 captioned photos a step
    assert {p['reader']: p['epoch'] * 8 + p['consumed'] for p in state['positions']} == {0: 9, 1: 8}
    assert (tmp_path / 'run' / 'model' / 'caption_decoder' / 'psi.safetensors').is_file()
    events = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    acc = events.EventAccumulator(str(tmp_path / 'run' / 'stage2' / 'tensorboard'), size_guidance={events.SCALARS: 0}).Reload()
    assert [e.step for e in acc.Scalars('train/loss')] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in acc.Scalars('train/tokens_per_s')) and acc.Scalars('train/lr')
    assert acc.Scalars('data/no_caption')[-1].value == 1


def test_gradient_checkpointing_recomputes_the_same(mini, tmp_path, monkeypatch):
    "decode.gradient_checkpointing: the LM's layers run under non-reentrant checkpoints, and training is unchanged."
    folder, pattern, *_ = mini
    data = {'data.path': pattern, 'decode.steps': 2, 'decode.train': 'psi+lm'}
    plain, w_plain = run(config(folder, **data), tmp_path / 'plain', mini)
    modeling = pytest.importorskip('transformers.modeling_utils')   # where the LM's layers find `checkpoint`
    calls, checkpoint = [], modeling.checkpoint
    monkeypatch.setattr(modeling, 'checkpoint', lambda *a, **k: calls.append(k.get('use_reentrant')) or checkpoint(*a, **k))
    saved, w_saved = run(config(folder, **data, **{'decode.gradient_checkpointing': True}), tmp_path / 'saved', mini)
    assert calls and set(calls) == {False}
    assert [h['loss'] for h in saved] == [h['loss'] for h in plain] and same_weights(w_plain, w_saved)


def saved_model(run_dir: Path) -> dict:
    "Every tensor of the captioner `vlv stage2` saved in RUN_DIR/model."
    from safetensors.torch import load_file
    return {f'{p.relative_to(run_dir)}:{k}': v for p in sorted((run_dir / 'model').rglob('*.safetensors')) for k, v in load_file(p).items()}


def optimizer_file(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / 'stage2' / 'checkpoints' / f'step-{step:07d}' / 'optimizer.pt', weights_only=True)['optimizer']['state']


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_exactly(mini, photo_dir, tmp_path, run_process, fsdp_launch):
    """`accelerate launch` with the shipped fsdp.yaml (2 processes, FSDP2 over gloo: the Qwen2 and Florence-2 layers
    sharded, the frozen decoder replicated) on the JSONL pairs: stopped after 2 of 4 steps and resumed, its losses, saved
    model, optimiser states (gathered from both ranks' shards) and validation captions equal those of one process in one go."""
    folder, _, _, encoder = mini
    for run in ('one', 'fsdp'): save_encoder(encoder, tmp_path / run / 'stage1' / 'encoder')
    args = ['stage2', '--preset', 'mini', '--no-progress', '-o', 'data.source=jsonl', f'data.path={photo_dir / "photos.jsonl"}',
            'data.streaming=false', 'run.device=cpu', 'decode.log_every=1', 'decode.lr=1e-3', 'decode.psi_lr=1e-3',
            'decode.log_with=none', 'decode.val_every=2', 'decode.val_images=1']   # micro-batches of one pair, seeded alike:
    # 4 in one process, 2 x 2 processes; validation captions of the first pair (held out) after steps 2 and 4
    one = run_process([sys.executable, '-m', 'vlv.cli', *args, 'decode.grad_accum=4', '--run-dir', 'one'], tmp_path,
                      VLV_MINIATURE=str(folder))
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [*fsdp_launch(2), *args, 'decode.grad_accum=2', '--run-dir', 'fsdp']
    first = run_process([*launch, '--stop-after', '2'], tmp_path, VLV_MINIATURE=str(folder))
    assert first.returncode == 0, first.stderr[-3000:]
    state = optimizer_file(tmp_path / 'one', 2), optimizer_file(tmp_path / 'fsdp', 2)   # both ranks' shards, whole
    assert state[0].keys() == state[1].keys() and any(k.startswith('caption_decoder.lm.') for k in state[0])
    for k in state[0]: torch.testing.assert_close(state[1][k], state[0][k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f'{k}: {m}')
    second = run_process([*launch, '--resume'], tmp_path, VLV_MINIATURE=str(folder))
    assert second.returncode == 0, second.stderr[-3000:]
    losses = [[r['loss'] for r in log_lines(tmp_path / run / 'stage2')] for run in ('one', 'fsdp')]
    assert len(losses[1]) == 4
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    weights = saved_model(tmp_path / 'one'), saved_model(tmp_path / 'fsdp')
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]: torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f'{k}: {m}')
    state = optimizer_file(tmp_path / 'one', 4), optimizer_file(tmp_path / 'fsdp', 4)   # the resumed moments went on as in one go
    for k in state[0]: torch.testing.assert_close(state[1][k], state[0][k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f'{k}: {m}')
    captions = [[json.loads(l) for l in (tmp_path / run / 'stage2' / 'val_captions.jsonl').read_text().splitlines()] for run in ('one', 'fsdp')]
    assert [l['step'] for l in captions[1]] == [2, 4] and captions[1] == captions[0]   # generated by both ranks, as the root's forward


def test_validation_captions_of_held_out_pairs(mini, photo_dir, tmp_path):
    """decode.val_every: greedy captions of the first `val_images` captioned pairs of a map-style source, which training
    leaves out, next to their references in val_captions.jsonl every N steps; a stream without data.val_path is refused."""
    folder, pattern, *_ = mini
    data = {'data.source': 'jsonl', 'data.path': str(photo_dir / 'photos.jsonl'), 'data.streaming': False}
    cfg = config(folder, **data, **{'decode.steps': 4, 'decode.val_every': 2, 'decode.val_images': 2})
    run(cfg, tmp_path / 'v', mini)
    lines = [json.loads(l) for l in (tmp_path / 'v' / 'val_captions.jsonl').read_text().splitlines()]
    assert [l['step'] for l in lines] == [2, 4]
    assert [r['reference'] for r in lines[0]['captions']] == [PHOTOS[0][2], PHOTOS[1][2]]   # photo 2 has no caption
    assert all(isinstance(r['caption'], str) for l in lines for r in l['captions'])
    assert log_lines(tmp_path / 'v')[-1]['data'] == {'captioned': 3, 'no_caption': 1, 'validation': 2}
    streamed = config(folder, **{'data.path': pattern, 'decode.val_every': 2})
    with pytest.raises(ValueError, match='data.val_path'): run(streamed, tmp_path / 's', mini)
