"Checks of the Shapes world: seeded determinism, held-out split, caption fraction, clear errors."
import numpy as np
import pytest
import torch

from vlv.core import get_config
from vlv.data import ALL_COMBOS, Obj, make_splits, parse_caption, parse_image, score


def small_cfg(**overrides):
    "Smoke data config with a few more scenes and optional overrides."
    data = get_config('smoke').data.model_dump()
    data.update({'n_train': 300, 'n_test': 50, 'n_heldout_test': 50, **overrides})
    return data


def test_splits_deterministic_by_seed():
    a, b, c = make_splits(small_cfg(), 3), make_splits(small_cfg(), 3), make_splits(small_cfg(), 4)
    for name in a:
        assert a[name].scenes == b[name].scenes
        assert a[name].captions == b[name].captions
        assert np.array_equal(a[name].has_caption, b[name].has_caption)
        assert torch.equal(a[name][5]['image'], b[name][5]['image'])
    assert a['train'].scenes != c['train'].scenes
    # a caption depends only on (seed, split, index), not on what was read before
    fresh = make_splits(small_cfg(), 3)['train']
    assert fresh.caption(17) == a['train'].captions[17]


def test_heldout_combos_absent_from_train_and_present_in_heldout():
    heldout = ('red triangle', 'green circle', 'blue square')
    splits = make_splits(small_cfg(heldout_combos=heldout, n_train=2000), 0)
    for name in ('train', 'test'):
        assert not any(o.combo in heldout for s in splits[name].scenes for o in s)
    assert all(any(o.combo in heldout for o in s) for s in splits['heldout_test'].scenes)
    # every other combination does occur in training
    seen = {o.combo for s in splits['train'].scenes for o in s}
    assert seen == set(ALL_COMBOS) - set(heldout)


@pytest.mark.parametrize('fraction', [0.0, 0.1, 0.37, 1.0])
def test_caption_fraction_honoured(fraction):
    train = make_splits(small_cfg(caption_fraction=fraction), 0)['train']
    assert train.has_caption.sum() == round(fraction * len(train))
    flags = [train[i]['has_caption'] for i in range(len(train))]
    assert sum(flags) == train.has_caption.sum()


@pytest.mark.parametrize('combos, message', [(('triangle red',), 'unknown colour-shape'),
                                             (('purple triangle',), 'unknown colour-shape'),
                                             (ALL_COMBOS, 'nothing left to train on')])
def test_bad_heldout_combo_raises_clear_error(combos, message):
    with pytest.raises(ValueError, match=message):
        make_splits(small_cfg(heldout_combos=combos), 0)


def test_heldout_test_needs_combos():
    with pytest.raises(ValueError, match='heldout_combos'):
        make_splits(small_cfg(heldout_combos=()), 0)
    assert len(make_splits(small_cfg(heldout_combos=(), n_heldout_test=0), 0)['heldout_test']) == 0


def test_dataloader_batches_and_oracle_round_trip():
    train = make_splits(small_cfg(), 0)['train']
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8, num_workers=2)))
    assert batch['image'].shape == (8, 3, 64, 64) and batch['image'].dtype == torch.float32
    assert 0 <= batch['image'].min() and batch['image'].max() <= 1
    assert batch['has_caption'].dtype == torch.bool and len(batch['caption']) == 8
    preds = [parse_image(im) for im in batch['image']]
    trues = [train.scenes[int(i)] for i in batch['index']]
    assert score(preds, trues)['exact_match'] == 1.0
    assert [parse_caption(c) for c in batch['caption']] == trues


def test_unknown_colour_is_named():
    with pytest.raises(ValueError, match='unknown colour'):
        Obj('circle', 'mauve', 'large', 0)
