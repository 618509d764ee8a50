"""Monitoring of stage 1 without an oracle: a TensorBoard event file with the loss, the learning rate, images/s, data
counters and the reconstruction grid, read back with TensorBoard's own reader; trackers change nothing in training."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlv.stage1 as S
from vlv.checkpoints import unique_state
from vlv.worlds import train_images

event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('latents')


def train(cfg, run_dir, decoder, cache, **kwargs):
    images, keys = train_images(cfg)
    return S.train_stage1(cfg, run_dir, images, keys, decoder=decoder, cache_dir=cache, progress=False, **kwargs)


def read_events(folder):
    "TensorBoard's reader over the run's event files (scalars and images, nothing dropped)."
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    return acc.Reload()


def test_tensorboard_events_hold_loss_and_grid(tiny_decoder, cache, tmp_path, tiny_cfg):
    "4 smoke steps, a line per step, a grid every 2: the event file has what log.jsonl and the PNG grids have."
    cfg = tiny_cfg()
    counts = iter(range(100))
    result = train(cfg, tmp_path, tiny_decoder, cache, counters=lambda: {'samples_read': 4 * next(counts), 'skipped': 1})
    folder = tmp_path / 'stage1'
    events = read_events(folder / 'tensorboard')
    tags = events.Tags()
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'train/images_per_s', 'data/samples_read', 'data/skipped'} <= set(tags['scalars'])
    log = [json.loads(l) for l in (folder / 'log.jsonl').read_text().splitlines()]
    loss = events.Scalars('train/loss')
    assert [e.step for e in loss] == [r['step'] for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], [h['loss'] for h in result.history], rtol=1e-6)
    assert [e.value for e in events.Scalars('data/samples_read')] == [0, 4, 8, 12] and log[0]['data'] == {'samples_read': 0, 'skipped': 1}
    assert all(e.value > 0 for e in events.Scalars('train/images_per_s'))
    # the grid: the first training images over their reconstructions (no test split needed), at steps 2 and 4
    grids = events.Images('validation/reconstructions')
    assert [g.step for g in grids] == [2, 4] and len(result.grids) == 2
    logged = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert('RGB'))
    np.testing.assert_array_equal(logged, np.asarray(Image.open(result.grids[-1]).convert('RGB')))
    assert min(logged.shape[:2]) >= 2 * 64   # 2 rows (images, reconstructions) x sample_images=2 columns of 64 px


def test_trackers_change_nothing(tiny_decoder, cache, tmp_path, tiny_cfg):
    "The same run with TensorBoard and with no tracker: the same losses and weights, bit for bit."
    tracked = train(tiny_cfg(), tmp_path / 'tracked', tiny_decoder, cache)
    plain = train(tiny_cfg('stage1.log_with=none'), tmp_path / 'plain', tiny_decoder, cache)
    assert (tmp_path / 'tracked' / 'stage1' / 'tensorboard').is_dir() and not (tmp_path / 'plain' / 'stage1' / 'tensorboard').exists()
    assert [h['loss'] for h in tracked.history] == [h['loss'] for h in plain.history]
    a, b = unique_state(tracked.encoder)[0], unique_state(plain.encoder)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_or_missing_tracker_is_refused_before_any_work(tiny_decoder, cache, tmp_path, tiny_cfg, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        train(tiny_cfg('stage1.log_with=tensorbord'), tmp_path / 'a', tiny_decoder, cache)
    monkeypatch.setattr(S, 'get_available_trackers', lambda: ['tensorboard'])   # as where wandb is not installed
    with pytest.raises(ModuleNotFoundError, match='pip install wandb'):
        train(tiny_cfg('stage1.log_with=[\"tensorboard\",\"wandb\"]'), tmp_path / 'b', tiny_decoder, cache)
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
