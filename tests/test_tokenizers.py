"""Tests of vlv.tokenizers: what nbs/00a_tokenizers does not check (no BOS, bad inputs, a missing open-clip-torch)."""
import importlib.util

import pytest

from vlv.data import CAPTION_WORDS
from vlv.tokenizers import caption_ids, clip_tokenizer, lm_tokenizer, pad_batch


def test_missing_open_clip_is_clear(monkeypatch):
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match='--no-deps open-clip-torch'): clip_tokenizer()


def test_caption_ids_without_bos_and_errors():
    tok = lm_tokenizer(CAPTION_WORDS)   # API: lm_tokenizer takes the world's words (no Shapes default)
    tok.bos_token = None   # like Qwen2.5: the prefix itself starts the text
    assert tok.bos_token_id is None
    ids = caption_ids(tok, ['a red circle in the center.'])
    assert ids[0][-1] == tok.eos_token_id and len(ids[0]) == 8   # 7 tokens + EOS, no BOS
    with pytest.raises(TypeError, match='not one string'): caption_ids(tok, 'a red circle')
    tok.eos_token = None
    with pytest.raises(ValueError, match='no EOS'): caption_ids(tok, ['a red circle'])


def test_dynamic_padding():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError): pad_batch([])
