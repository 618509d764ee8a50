"The shipped toy teacher: present, within budget, strictly loadable, and actually drawing what captions say."
import json

import pytest
import torch

from vlv.bottleneck import DiffusionDecoder, load_decoder, teacher_path
from vlv.core import get_config
from vlv.data import CAPTION_WORDS, attribute_accuracy, make_splits, parse_images, score


@pytest.fixture(scope='module')
def teacher():
    return load_decoder(get_config('toy').bottleneck)


def test_shipped_files_and_budget():
    folder = teacher_path()
    for sub in ('vae', 'text_encoder', 'unet', 'scheduler', 'tokenizer'): assert (folder / sub).is_dir(), sub
    weights = list(folder.rglob('*.safetensors'))
    assert len(weights) == 3 and not list(folder.rglob('*.bin')), "weights must be safetensors only"
    total = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1e6
    assert total <= 30, f"shipped teacher is {total:.1f} MB, over the 30 MB budget"
    record = json.loads((folder / 'training.json').read_text())
    assert record['command'].startswith('vlv run --preset toy') and 'ship True' in record['command']


def test_loads_as_float32_and_frozen(teacher):
    assert teacher.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters())
    config = get_config('toy').bottleneck
    assert teacher.max_length == config.max_length and teacher.text_width == config.text_width


def test_tokenizer_covers_the_world_vocabulary(teacher):
    unknown = teacher.tokenizer.unk_token_id
    ids = teacher.tokenizer(list(CAPTION_WORDS), add_special_tokens=False).input_ids
    assert all(unknown not in i for i in ids)


def test_strict_loading_refuses_a_damaged_checkpoint(tmp_path, teacher):
    import shutil
    from safetensors.torch import load_file, save_file
    copy = tmp_path / 'teacher'; shutil.copytree(teacher_path(), copy)
    path = next((copy / 'unet').glob('*.safetensors'))
    state = load_file(path); state.pop(next(iter(state))); save_file(state, path)
    with pytest.raises(ValueError, match='missing'): DiffusionDecoder.from_pretrained(copy)


@pytest.mark.slow
def test_samples_follow_their_captions(teacher):
    "A short sampling run (16 held-in test scenes, 20 DDIM steps, guidance 2): the oracle must read most attributes back."
    test = make_splits(get_config('toy').data, seed=0)['test']
    captions, scenes = test.captions[:16], test.scenes[:16]
    images = teacher.sample(teacher.encode_text(captions), guidance=2.0, steps=20, seed=0)
    result = score(parse_images(images), scenes)
    assert attribute_accuracy(result) > 0.8, result
