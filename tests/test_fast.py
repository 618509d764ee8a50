"""Tests of vlv.fast, the fast inference path: what nbs/91a_fast does not check (a failing compiler, padded prefixes,
the switch inside `CaptionDecoder.generate`, decode sessions). nbs/91a_fast compares its tokens with HF generate's."""
import pytest
import torch

import vlv.fast as F
from vlv.decode import hf_generate


def test_a_step_that_cannot_compile_falls_back_to_eager():
    def failing_backend(gm, example_inputs): raise RuntimeError("no compiler here")
    with pytest.warns(UserWarning, match='failed.*using the eager step'):
        check = F.check_fast_generate(compile=failing_backend, seeds=(0,), vocabularies=(12,))
    assert check['identical'] == check['cases']


def test_switch_in_caption_decoder(make_captioner):
    "The one-line switch for `vlv caption`: CaptionDecoder.generate(..., generate_fn=fast_generate) gives the same captions."
    captioner = make_captioner(text_width=24).eval()
    conditioning = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    for beams in (1, 3):
        ours = captioner.generate(conditioning, max_new_tokens=20, num_beams=beams, generate_fn=F.fast_generate)
        theirs = captioner.generate(conditioning, max_new_tokens=20, num_beams=beams)
        assert ours.token_ids == theirs.token_ids and ours.texts == theirs.texts


def test_fast_generate_refuses_padded_prefixes():
    lm = F.random_lm(F.TINY_QWEN)
    embeds, mask = torch.randn(2, 4, 32), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(NotImplementedError, match='unpadded'): F.fast_generate(lm, embeds, mask, 4)
    assert hf_generate(lm, embeds, mask, 4).shape[0] == 2


def test_sessions_are_reused_and_freed():
    lm = F.random_lm(F.TINY_QWEN)
    embeds, mask = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.long)
    a = F.fast_generate(lm, embeds, mask, 6)
    session = F.decode_session(lm, 2, 10, None)
    assert F.fast_generate(lm, embeds, mask, 6).tolist() == a.tolist() and F.decode_session(lm, 2, 10, None) is session
    F.clear_sessions(lm)
    assert F.decode_session(lm, 2, 10, None) is not session
