"""Tests of vlv.decode and vlv.lm: stage 2's caption decoder (tiny random models, offline, CPU) and the shipped toy LM."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from vlv.checkpoints import latest_checkpoint
from vlv.core import get_config
from vlv.data import CAPTION_WORDS, make_splits, parse_caption
from vlv.decode import TRAINABLE, CaptionDecoder, Captions, Stage2Model, hf_generate, lm_path, load_lm, make_batch
from vlv.stage2 import captioned_indices, train_stage2
from vlv.lm import perplexity, sample_text, text_loss, well_formed
from vlv.tokenizers import caption_ids, lm_tokenizer
from vlv.worlds import caption_tokenizer, caption_transform

STAGE2 = 'decode.steps=4 decode.batch_size=4 decode.checkpoint_every=3'   # a short stage 2 on the tiny config
CAPTIONS = ['a large red circle in the center.',
            'in the top left there is a small blue square; in the bottom there is a large cyan diamond.']


@pytest.fixture(scope='module')
def cfg(tiny_cfg):
    return tiny_cfg(STAGE2)


@pytest.fixture(scope='module')
def bottleneck(tiny_decoder):
    return tiny_decoder


@pytest.fixture(scope='module')
def new_captioner(make_captioner, bottleneck):
    "`new_captioner(cfg, seed=1)`: an untrained captioner of the tiny decoder's conditioning."
    return lambda cfg, seed=1: make_captioner(bottleneck.text_width, cfg, seed)


class ToyEncoder(nn.Module):
    "Images -> z [B, 4, D] with a vision stem, queries, a `language_model` and a projector."
    def __init__(self, width):
        super().__init__()
        self.vision, self.queries = nn.Linear(3, width), nn.Parameter(torch.randn(1, 4, width))
        self.language_model, self.projector = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, images):
        return self.projector(self.language_model(self.queries + self.vision(images.mean((2, 3)))[:, None]))


@pytest.fixture(scope='module')
def new_model(new_captioner, bottleneck):
    "`new_model(cfg)`: a captioner on a `ToyEncoder` and the tiny decoder."
    def make(cfg):
        torch.manual_seed(0)
        return Stage2Model(ToyEncoder(bottleneck.text_width), bottleneck, new_captioner(cfg))
    return make


# --- loss ----------------------------------------------------------------------------------------------------------

def reference_loss(captioner, conditioning, caption):
    "HF's own loss with -100 labels on the prefix and start tokens, one caption alone (no padding)."
    x = torch.tensor(caption_ids(captioner.tokenizer, [caption]))
    s = len(captioner.start_ids)
    embeds = torch.cat([captioner.prefix(conditioning), captioner.lm.get_input_embeddings()(x)], 1)
    labels = torch.cat([torch.full((1, conditioning.shape[1] + s), -100), x[:, s:]], 1)
    return captioner.lm(inputs_embeds=embeds, labels=labels).loss


def test_loss_masks_prefix_and_padding_without_bos(cfg, bottleneck, new_captioner):
    "A tokenizer without BOS (like Qwen2.5's): the prefix and the padding score nothing (nbs/05_decode checks the BOS case)."
    captioner = new_captioner(cfg)
    captioner.tokenizer = lm_tokenizer(CAPTION_WORDS); captioner.tokenizer.bos_token = None
    conditioning = torch.randn(2, 5, bottleneck.text_width)
    losses, scored = captioner.token_losses(conditioning, CAPTIONS)
    ids = caption_ids(captioner.tokenizer, CAPTIONS)
    assert scored.sum(1).tolist() == [len(i) for i in ids]   # words + EOS only
    assert (losses[~scored] == 0).all()
    for i in range(2):   # the short caption padded next to the long one scores as it does alone
        torch.testing.assert_close(losses[i].sum() / scored[i].sum(), reference_loss(captioner, conditioning[i:i + 1], CAPTIONS[i]))
    batch = captioner.loss(conditioning, CAPTIONS)
    torch.testing.assert_close(batch, losses.sum() / scored.sum())
    assert captioner.loss(conditioning.flip(0), CAPTIONS).item() != pytest.approx(batch.item())   # the prefix matters


def test_loss_errors(cfg, bottleneck, new_captioner):
    captioner = new_captioner(cfg)
    with pytest.raises(ValueError, match='conditioning must be'): captioner.loss(torch.randn(2, 5, 7), CAPTIONS)
    with pytest.raises(ValueError, match='1 captions for a conditioning batch of 2'):
        captioner.loss(torch.randn(2, 5, bottleneck.text_width), CAPTIONS[:1])
    with pytest.raises(ValueError, match='exceeds the LM'):
        captioner.loss(torch.randn(1, 120, bottleneck.text_width), CAPTIONS[1:])



def test_training_never_computes_logits_of_the_prefix(tmp_path, tiny_cfg, new_model):
    """Stage-2 training steps through `train_stage2` (LM trained, conditioning not cached): the LM head only ever sees
    the caption positions of the sequence the LM just ran (never its N prefix positions), at most `logit_chunk` of
    them (whole captions) a call (`decode.logit_chunk`), and the LM's full forward (logits at every position) never runs."""
    cfg = tiny_cfg(STAGE2, 'decode.steps=2 decode.batch_size=6 decode.cache_conditioning=false decode.logit_chunk=40')
    model, data = new_model(cfg), make_splits(cfg.data, seed=0)['train']
    captioner = model.caption_decoder
    events = []
    hooks = [captioner.lm.base_model.register_forward_hook(lambda m, a, out: events.append(('lm', out.last_hidden_state.shape[1]))),
             captioner.lm.get_output_embeddings().register_forward_hook(lambda m, a, out: events.append(('head', *out.shape))),
             captioner.lm.register_forward_hook(lambda m, a, out: events.append(('full',)))]
    try: train_stage2(model, data, cfg, tmp_path, progress=False)
    finally:
        for h in hooks: h.remove()
    prefix, start = model.conditioning(make_batch(data, [0])['image']).shape[1], len(captioner.start_ids)   # N, 1 (BOS)
    assert [e[0] for e in events if e[0] != 'head'] == ['lm', 'lm']   # one LM pass a step; never the full forward
    heads = []
    for event in events:
        if event[0] == 'lm': length = event[1]
        else:
            _, rows, positions, width = event
            assert positions == length - prefix - start and width == len(captioner.tokenizer)   # caption positions only
            assert rows * positions <= max(40, positions)
            heads.append(rows)
    assert sum(heads) == 2 * 2 * 6   # 2 steps x (forward + recompute in backward) x 6 captions


# --- generation ----------------------------------------------------------------------------------------------------

def force_eos(lm, eos_id, after):
    "Hook: from the (after+1)-th forward call on, EOS is the argmax."
    calls = []
    def hook(module, args, logits):
        calls.append(1)
        if len(calls) > after: logits[..., eos_id] = 1e4
        return logits
    return lm.get_output_embeddings().register_forward_hook(hook)


def test_beam_search_stops_at_eos(cfg, bottleneck, new_captioner):
    "Beam search ends every caption at its first EOS (nbs/05_decode checks greedy decoding)."
    captioner, num_beams = new_captioner(cfg), 3
    eos = captioner.tokenizer.eos_token_id
    hook = force_eos(captioner.lm, eos, 3)
    try: out = captioner.generate(torch.randn(2, 5, bottleneck.text_width), max_new_tokens=12, num_beams=num_beams)
    finally: hook.remove()
    assert out.finished == [True, True] and out.eos_rate == 1.0
    assert all(t[-1] == eos and eos not in t[:-1] and len(t) == 4 for t in out.token_ids)


def test_unfinished_captions_are_reported_and_generator_is_swappable(cfg, bottleneck, new_captioner):
    captioner = new_captioner(cfg)
    calls = []
    def counting_generate(lm, embeds, mask, **kw):
        calls.append((tuple(embeds.shape), kw['max_new_tokens']))
        return hf_generate(lm, embeds, mask, **kw)
    eos = captioner.tokenizer.eos_token_id
    hook = captioner.lm.get_output_embeddings().register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([eos]), -1e4))
    try: out = captioner.generate(torch.randn(2, 5, bottleneck.text_width), max_new_tokens=6, generate_fn=counting_generate)
    finally: hook.remove()
    assert calls == [((2, 6, captioner.lm_width), 6)]   # prefix (5) + <bos>
    assert out.finished == [False, False] and out.eos_rate == 0.0 and all(len(t) == 6 for t in out.token_ids)
    assert len(Captions.cat([out, out])) == 4


# --- what trains ---------------------------------------------------------------------------------------------------

def test_trainable_variants(cfg, bottleneck, new_model):
    model = new_model(cfg)
    images = torch.rand(2, 3, 64, 64)
    names = {}
    for what in TRAINABLE:
        groups = model.set_trainable(what, lr=1e-4, psi_lr=1e-3)
        assert [g['name'] for g in groups] == ['psi', 'lm', 'encoder'][:len(what.split('+'))]
        model.loss({'image': images, 'caption': CAPTIONS}).backward()
        graded = {n for n, p in model.named_parameters() if p.grad is not None}
        assert graded == set(model.trainable_state())
        names[what] = graded
        model.zero_grad(set_to_none=True)
    assert all(n.startswith('caption_decoder.psi.') for n in names['psi'])
    assert {n.split('.')[1] for n in names['psi+lm']} == {'psi', 'lm'}
    encoder = {n for n in names['psi+lm+encoder'] if n.startswith('encoder.')}
    assert encoder == {'encoder.language_model.weight', 'encoder.language_model.bias'}   # not queries, phi, vision
    model.train()
    assert model.encoder.training and model.caption_decoder.lm.training and not model.bottleneck.training
    model.set_trainable('psi')
    assert not model.encoder.training and not model.caption_decoder.lm.training
    with pytest.raises(ValueError, match='unknown decode.train'): model.set_trainable('lm')


def test_encoder_hooks(cfg, bottleneck, new_captioner):
    "Instead of a `language_model` submodule, an encoder may name what `psi+lm+encoder` trains: `language_model_parameters`."
    captioner = new_captioner(cfg)
    class Explicit(ToyEncoder):
        def language_model_parameters(self): return self.projector.parameters()
    model = Stage2Model(Explicit(bottleneck.text_width), bottleneck, captioner)
    model.set_trainable('psi+lm+encoder')
    assert {n for n in model.trainable_state() if n.startswith('encoder.')} == {'encoder.projector.weight', 'encoder.projector.bias'}


def test_with_the_vlv_encoder(cfg, bottleneck, new_captioner):
    "Stage 2 on the stage-1 encoder (smoke-size random Florence-2): psi+lm+encoder trains its BART, not queries or phi."
    encoder = pytest.importorskip('vlv.encoder').build_encoder(cfg.encoder, bottleneck.text_width)
    model = Stage2Model(encoder, bottleneck, new_captioner(cfg))
    model.set_trainable('psi+lm+encoder')
    model.loss({'image': torch.rand(2, 3, 64, 64), 'caption': CAPTIONS}).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(model.trainable_state())
    encoder_parts = {n.split('.')[3] if n.startswith('encoder.florence.') else n.split('.')[1] for n in graded if n.startswith('encoder.')}
    assert encoder_parts == {'language_model'}
    out = model.caption(torch.rand(3, 3, 64, 64), max_new_tokens=4)
    assert len(out) == 3 and all(len(t) <= 4 for t in out.token_ids)


@pytest.mark.parametrize('readout', ['image_tokens', 'queries'])
def test_whole_encoder_trains_everything_that_makes_z(cfg, bottleneck, readout, new_captioner):
    "psi+lm+whole-encoder (the supervised captioner): every encoder parameter the readout uses learns, at encoder_lr."
    ecfg = cfg.encoder.model_copy(update=dict(readout=readout, num_queries=16 if readout == 'image_tokens' else 4))
    encoder = pytest.importorskip('vlv.encoder').build_encoder(ecfg, bottleneck.text_width)
    model = Stage2Model(encoder, bottleneck, new_captioner(cfg))
    groups = model.set_trainable('psi+lm+whole-encoder', lr=1e-3, encoder_lr=5e-4)
    assert [(g['name'], g['lr']) for g in groups] == [('psi', 1e-3), ('lm', 1e-3), ('encoder', 5e-4)]
    model.loss({'image': torch.rand(2, 3, 64, 64), 'caption': CAPTIONS}).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(model.trainable_state())
    unused = {id(p) for p in encoder.decoder_only() + [encoder.queries]} if readout == 'image_tokens' else set()
    expected = {id(p) for p in encoder.parameters()} - unused
    assert {id(p) for p in groups[2]['params']} == expected
    assert model.train().encoder.training and not model.eval().encoder.training


# --- checkpoints, training ------------------------------------------------------------------------------------

def test_resume_with_another_choice_of_what_trains_is_refused(tmp_path, cfg, new_model, tiny_cfg):
    "The checkpoint holds the trained parameters only: another decode.train, or a checkpoint missing a file, is an error."
    data = make_splits(cfg.data, seed=0)['train']
    train_stage2(new_model(cfg), data, cfg, tmp_path, stop_after=2, progress=False)
    other = tiny_cfg(STAGE2, 'decode.train=' + ('psi' if cfg.decode.train != 'psi' else 'psi+lm'))
    # API: stage-2 checkpoints are vlv.checkpoints' (step-N folders, latest.json; the trained weights checked strictly)
    with pytest.raises(ValueError, match='another choice of what trains'):
        train_stage2(new_model(other), data, other, tmp_path, progress=False)
    (latest_checkpoint(tmp_path / 'checkpoints') / 'optimizer.pt').unlink()
    with pytest.raises(FileNotFoundError, match='not a complete checkpoint'):
        train_stage2(new_model(cfg), data, cfg, tmp_path, progress=False)


class Recording(torch.utils.data.Dataset):
    "A Shapes split that records which items were read."
    def __init__(self, split): self.split, self.seen = split, set()
    @property
    def has_caption(self): return self.split.has_caption
    def caption(self, i): self.seen.add(i); return self.split.caption(i)
    def images(self, idx): self.seen.update(int(i) for i in idx); return self.split.images(idx)
    def __len__(self): return len(self.split)


def test_training_resumes_exactly_and_uses_only_captioned_items(tmp_path, cfg, new_model, tiny_cfg):
    data = Recording(make_splits(cfg.data, seed=0)['train'])
    straight = new_model(cfg)
    history = train_stage2(straight, data, cfg, tmp_path / 'a', progress=False)
    assert len(history) == cfg.decode.steps and data.seen <= set(captioned_indices(data).tolist())
    resumed = new_model(cfg)
    part = train_stage2(resumed, data, cfg, tmp_path / 'b', stop_after=2, progress=False)
    assert len(part) == 2
    resumed = new_model(cfg)
    history_b = train_stage2(resumed, data, cfg, tmp_path / 'b', progress=False)
    assert [h['loss'] for h in history_b] == [h['loss'] for h in history]
    assert all(torch.equal(a, b) for a, b in zip(straight.trainable_state().values(), resumed.trainable_state().values()))
    other = tiny_cfg(STAGE2, 'decode.lr=0.1')
    with pytest.raises(ValueError, match=r"other settings \(decode: \['lr'\]\)"):
        train_stage2(new_model(other), data, other, tmp_path / 'b', progress=False)
    assert train_stage2(new_model(other), data, other, tmp_path / 'b', resume=False, progress=False)
    uncached = tiny_cfg(STAGE2, 'decode.cache_conditioning=false')
    history_c = train_stage2(new_model(uncached), data, uncached, tmp_path / 'c', progress=False)
    np.testing.assert_allclose([h['loss'] for h in history_c], [h['loss'] for h in history], rtol=1e-5)


def test_no_captions_is_an_error(tmp_path, new_model, tiny_cfg):
    none = tiny_cfg(STAGE2, 'data.caption_fraction=0')
    data = make_splits(none.data, seed=0)['train']
    with pytest.raises(ValueError, match='no captioned items'):
        train_stage2(new_model(none), data, none, tmp_path, progress=False)


def test_make_batch(cfg):
    split = make_splits(cfg.data, seed=0)['test']
    batch = make_batch(split, [0, 3])
    assert batch['image'].shape == (2, 3, 64, 64) and batch['caption'] == [split.caption(0), split.caption(3)]
    assert set(make_batch(split, [1], ['caption'])) == {'index', 'caption'}


# --- config and the shipped toy LM ---------------------------------------------------------------------------------

def test_decode_config_is_validated():
    with pytest.raises(ValueError, match='lm_heads'): get_config('smoke', 'decode.lm_heads=3')
    with pytest.raises(ValueError): get_config('smoke', 'decode.train=lm')


def test_text_loss_ignores_padding(cfg):
    lm, tok = load_lm(cfg.decode, tokenizer=caption_tokenizer(cfg))   # API: a random-init LM takes the world's tokenizer
    alone = [text_loss(lm, tok, [c])[0] for c in CAPTIONS]
    both, n = text_loss(lm, tok, CAPTIONS)
    counts = [len(i) - 1 for i in caption_ids(tok, CAPTIONS)]
    assert n == sum(counts)
    torch.testing.assert_close(both, sum(a * c for a, c in zip(alone, counts)) / n)


def test_shipped_toy_lm():
    path = lm_path()
    assert (path / 'config.json').exists(), f"no toy LM shipped at {path}"
    assert sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) <= 10e6
    record = json.loads((path / 'training.json').read_text())
    assert record['command'] == 'vlv run --preset toy --name lm --only 05a -p train True -p ship True'
    lm, tok = load_lm(get_config('toy', 'decode.lm=null').decode)   # the toy preset's stage 2 starts from random init
    assert type(lm).__name__ == 'Qwen2ForCausalLM' and tok.eos_token_id is not None
    texts, ended = sample_text(lm, tok, 20, seed=0)
    assert np.mean(ended) >= 0.9 and np.mean([well_formed(t) for t in texts]) >= 0.6   # shipped: 1.0 and 0.845 of 200
    split = make_splits(get_config('smoke').data, seed=0)['test']
    assert perplexity(lm, tok, split.captions[:16]) < 4


# --- the caption transform (the Shapes world's paraphraser, nbs/01_data) ---------------------------------------------

def test_paraphrased_training_sees_the_same_scenes_and_resumes_exactly(tmp_path, monkeypatch, new_model, tiny_cfg):
    "train_stage2 rewrites each caption with the transform the world plugs in: the same scenes in other words, resumable."
    para = tiny_cfg(STAGE2, 'decode.paraphrase=true')
    rewrite = caption_transform(para)   # API: the Shapes paraphraser comes from vlv.worlds; train_stage2 takes it
    data = make_splits(para.data, seed=0)['train']
    seen = []
    loss = CaptionDecoder.loss
    monkeypatch.setattr(CaptionDecoder, 'loss', lambda self, c, captions: seen.append(list(captions)) or loss(self, c, captions))
    straight = new_model(para)
    history = train_stage2(straight, data, para, tmp_path / 'a', progress=False, caption_transform=rewrite)
    plain = tiny_cfg(STAGE2, 'decode.paraphrase=false')
    assert caption_transform(plain) is None
    originals = []
    monkeypatch.setattr(CaptionDecoder, 'loss', lambda self, c, captions: originals.append(list(captions)) or loss(self, c, captions))
    train_stage2(new_model(plain), data, plain, tmp_path / 'plain', progress=False)
    assert len(seen) == len(originals) == para.decode.steps
    assert all(parse_caption(a) == parse_caption(b) for s, o in zip(seen, originals) for a, b in zip(s, o))
    assert sum(a != b for s, o in zip(seen, originals) for a, b in zip(s, o)) > 0
    resumed = new_model(para)
    train_stage2(resumed, data, para, tmp_path / 'b', stop_after=2, progress=False, caption_transform=rewrite)
    resumed = new_model(para)
    resumed_history = train_stage2(resumed, data, para, tmp_path / 'b', progress=False, caption_transform=rewrite)
    assert [h['loss'] for h in resumed_history] == [h['loss'] for h in history]


class FreeText(torch.utils.data.Dataset):
    "A captioned split whose captions are not Shapes captions."
    def __init__(self, split): self.split, self.has_caption = split, split.has_caption
    def __len__(self): return len(self.split)
    def __getitem__(self, i): return {**self.split[i], 'caption': f'photo number {i} of a sunny day.'}


def test_paraphrase_on_free_text_warns_and_keeps_the_captions(tmp_path, new_model, tiny_cfg):
    para = tiny_cfg(STAGE2, 'decode.paraphrase=true')
    plain = tiny_cfg(STAGE2, 'decode.paraphrase=false')
    data = FreeText(make_splits(para.data, seed=0)['train'])
    # API: the warning names the caption transform (train_stage2 no longer knows that it paraphrases Shapes captions)
    with pytest.warns(UserWarning, match='changes none of the first'):
        warned = train_stage2(new_model(para), data, para, tmp_path / 'a', progress=False,
                              caption_transform=caption_transform(para))
    kept = train_stage2(new_model(plain), data, plain, tmp_path / 'b', progress=False)
    assert [h['loss'] for h in warned] == [h['loss'] for h in kept]
