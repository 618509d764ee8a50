"""Tests of vlv.decode and vlv.lm: stage 2's caption decoder (tiny random models, offline, CPU) and the shipped toy LM."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlv.bottleneck import TINY, DiffusionDecoder
from vlv.core import get_config
from vlv.data import CAPTION_WORDS, make_splits, parse_caption
from vlv.decode import (TRAINABLE, CaptionDecoder, CaptionEmbedder, Captions, Stage2Model, caption_ids,
                        caption_scores, captioned_indices, hf_generate, lm_path, lm_tokenizer, load_checkpoint, load_lm,
                        load_weights, make_batch, pad_batch, paraphrase, save_checkpoint, save_lm, train_stage2)
from vlv.lm import perplexity, sample_text, text_loss, well_formed

TINY_LM = ('decode.lm=random decode.lm_width=32 decode.lm_layers=2 decode.lm_heads=4 decode.lm_kv_heads=2 '
           'decode.lm_intermediate=64 decode.steps=4 decode.batch_size=4 decode.checkpoint_every=3')
CAPTIONS = ['a large red circle in the center.',
            'in the top left there is a small blue square; in the bottom there is a large cyan diamond.']


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def cfg():
    return get_config('smoke', TINY_LM)


@pytest.fixture(scope='module')
def bottleneck():
    tokenizer = lm_tokenizer(max_length=77)
    return DiffusionDecoder.from_config({**TINY, 'vocab_size': len(tokenizer)}, tokenizer=tokenizer)


def new_captioner(cfg, bottleneck, seed=1):
    lm, tokenizer = load_lm(cfg.decode, seed=seed)
    return CaptionDecoder(lm, tokenizer, bottleneck.text_width, seed=seed)


class ToyEncoder(nn.Module):
    "Images -> z [B, 4, D] with a vision stem, queries, a `language_model` and a projector."
    def __init__(self, width):
        super().__init__()
        self.vision, self.queries = nn.Linear(3, width), nn.Parameter(torch.randn(1, 4, width))
        self.language_model, self.projector = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, images):
        return self.projector(self.language_model(self.queries + self.vision(images.mean((2, 3)))[:, None]))


def new_model(cfg, bottleneck):
    torch.manual_seed(0)
    return Stage2Model(ToyEncoder(bottleneck.text_width), bottleneck, new_captioner(cfg, bottleneck))


# --- tokens -----------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_specials():
    tok = lm_tokenizer()
    text = 'three shapes: a large red circle at the top left, a small blue square at the center; a cyan diamond.'
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, len(tok)) == (0, len(CAPTION_WORDS) + 4)
    ids = caption_ids(tok, CAPTIONS)
    assert all(i[0] == tok.bos_token_id and i[-1] == tok.eos_token_id for i in ids)
    assert all(tok.eos_token_id not in i[:-1] for i in ids)


def test_caption_ids_without_bos_and_errors():
    tok = lm_tokenizer()
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


# --- loss ----------------------------------------------------------------------------------------------------------

def reference_loss(captioner, conditioning, caption):
    "HF's own loss with -100 labels on the prefix and start tokens, one caption alone (no padding)."
    x = torch.tensor(caption_ids(captioner.tokenizer, [caption]))
    s = len(captioner.start_ids)
    embeds = torch.cat([captioner.prefix(conditioning), captioner.lm.get_input_embeddings()(x)], 1)
    labels = torch.cat([torch.full((1, conditioning.shape[1] + s), -100), x[:, s:]], 1)
    return captioner.lm(inputs_embeds=embeds, labels=labels).loss


@pytest.mark.parametrize('bos', [True, False])
def test_loss_masks_prefix_start_and_padding(cfg, bottleneck, bos):
    captioner = new_captioner(cfg, bottleneck)
    if not bos: captioner.tokenizer = lm_tokenizer(); captioner.tokenizer.bos_token = None
    conditioning = torch.randn(2, 5, bottleneck.text_width)
    losses, scored = captioner.token_losses(conditioning, CAPTIONS)
    ids = caption_ids(captioner.tokenizer, CAPTIONS)
    assert scored.sum(1).tolist() == [len(i) - (1 if bos else 0) for i in ids]   # words + EOS only
    assert (losses[~scored] == 0).all()
    for i in range(2):   # the short caption padded next to the long one scores as it does alone
        torch.testing.assert_close(losses[i].sum() / scored[i].sum(), reference_loss(captioner, conditioning[i:i + 1], CAPTIONS[i]))
    batch = captioner.loss(conditioning, CAPTIONS)
    torch.testing.assert_close(batch, losses.sum() / scored.sum())
    assert captioner.loss(conditioning.flip(0), CAPTIONS).item() != pytest.approx(batch.item())   # the prefix matters


def test_loss_errors(cfg, bottleneck):
    captioner = new_captioner(cfg, bottleneck)
    with pytest.raises(ValueError, match='conditioning must be'): captioner.loss(torch.randn(2, 5, 7), CAPTIONS)
    with pytest.raises(ValueError, match='1 captions for a conditioning batch of 2'):
        captioner.loss(torch.randn(2, 5, bottleneck.text_width), CAPTIONS[:1])
    with pytest.raises(ValueError, match='exceeds the LM'):
        captioner.loss(torch.randn(1, 120, bottleneck.text_width), CAPTIONS[1:])


# --- generation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_reference(captioner, conditioning, max_new_tokens):
    embed = captioner.lm.get_input_embeddings()
    x = torch.cat([captioner.prefix(conditioning), embed(torch.tensor([captioner.start_ids]))], 1)
    out = []
    for _ in range(max_new_tokens):
        token = captioner.lm(inputs_embeds=x).logits[0, -1].argmax().item()
        out.append(token)
        if token == captioner.tokenizer.eos_token_id: break
        x = torch.cat([x, embed(torch.tensor([[token]]))], 1)
    return out


def force_eos(lm, eos_id, after):
    "Hook: from the (after+1)-th forward call on, EOS is the argmax."
    calls = []
    def hook(module, args, logits):
        calls.append(1)
        if len(calls) > after: logits[..., eos_id] = 1e4
        return logits
    return lm.get_output_embeddings().register_forward_hook(hook)


def test_greedy_matches_reference_and_batching(cfg, bottleneck):
    captioner = new_captioner(cfg, bottleneck)
    conditioning = torch.randn(3, 5, bottleneck.text_width)
    batch = captioner.generate(conditioning, max_new_tokens=10)
    for i in range(3):
        assert batch.token_ids[i] == greedy_reference(captioner, conditioning[i:i + 1], 10)
        assert captioner.generate(conditioning[i:i + 1], max_new_tokens=10).token_ids[0] == batch.token_ids[i]
    assert all(len(t) <= 10 for t in batch.token_ids)


@pytest.mark.parametrize('num_beams', [1, 3])
def test_generation_stops_at_eos(cfg, bottleneck, num_beams):
    captioner = new_captioner(cfg, bottleneck)
    eos = captioner.tokenizer.eos_token_id
    hook = force_eos(captioner.lm, eos, 3)
    try: out = captioner.generate(torch.randn(2, 5, bottleneck.text_width), max_new_tokens=12, num_beams=num_beams)
    finally: hook.remove()
    assert out.finished == [True, True] and out.eos_rate == 1.0
    assert all(t[-1] == eos and eos not in t[:-1] and len(t) == 4 for t in out.token_ids)


def test_unfinished_captions_are_reported_and_generator_is_swappable(cfg, bottleneck):
    captioner = new_captioner(cfg, bottleneck)
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

def test_trainable_variants(cfg, bottleneck):
    model = new_model(cfg, bottleneck)
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


def test_encoder_hooks(cfg, bottleneck):
    captioner = new_captioner(cfg, bottleneck)
    with pytest.raises(ValueError, match='no `language_model` submodule'):
        Stage2Model(nn.Identity(), bottleneck, captioner).set_trainable('psi+lm+encoder')
    class Explicit(ToyEncoder):
        def language_model_parameters(self): return self.projector.parameters()
    model = Stage2Model(Explicit(bottleneck.text_width), bottleneck, captioner)
    model.set_trainable('psi+lm+encoder')
    assert {n for n in model.trainable_state() if n.startswith('encoder.')} == {'encoder.projector.weight', 'encoder.projector.bias'}


def test_with_the_vlv_encoder(cfg, bottleneck):
    "Stage 2 on the stage-1 encoder (smoke-size random Florence-2): psi+lm+encoder trains its BART, not queries or phi."
    encoder = pytest.importorskip('vlv.encoder').build_encoder(cfg.encoder, bottleneck.text_width)
    model = Stage2Model(encoder, bottleneck, new_captioner(cfg, bottleneck))
    model.set_trainable('psi+lm+encoder')
    model.loss({'image': torch.rand(2, 3, 64, 64), 'caption': CAPTIONS}).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(model.trainable_state())
    encoder_parts = {n.split('.')[3] if n.startswith('encoder.florence.') else n.split('.')[1] for n in graded if n.startswith('encoder.')}
    assert encoder_parts == {'language_model'}
    out = model.caption(torch.rand(3, 3, 64, 64), max_new_tokens=4)
    assert len(out) == 3 and all(len(t) <= 4 for t in out.token_ids)



@pytest.mark.parametrize('readout', ['image_tokens', 'queries'])
def test_whole_encoder_trains_everything_that_makes_z(cfg, bottleneck, readout):
    "psi+lm+whole-encoder (the supervised captioner): every encoder parameter the readout uses learns, at encoder_lr."
    ecfg = cfg.encoder.model_copy(update=dict(readout=readout, num_queries=16 if readout == 'image_tokens' else 4))
    encoder = pytest.importorskip('vlv.encoder').build_encoder(ecfg, bottleneck.text_width)
    model = Stage2Model(encoder, bottleneck, new_captioner(cfg, bottleneck))
    groups = model.set_trainable('psi+lm+whole-encoder', lr=1e-3, encoder_lr=5e-4)
    assert [(g['name'], g['lr']) for g in groups] == [('psi', 1e-3), ('lm', 1e-3), ('encoder', 5e-4)]
    model.loss({'image': torch.rand(2, 3, 64, 64), 'caption': CAPTIONS}).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(model.trainable_state())
    unused = {id(p) for p in encoder.decoder_only() + [encoder.queries]} if readout == 'image_tokens' else set()
    expected = {id(p) for p in encoder.parameters()} - unused
    assert {id(p) for p in groups[2]['params']} == expected
    assert model.train().encoder.training and not model.eval().encoder.training


def test_caption_embedder_gives_the_text_encoding(bottleneck, cfg):
    model = Stage2Model(CaptionEmbedder(bottleneck), bottleneck, new_captioner(cfg, bottleneck), input_key='caption')
    torch.testing.assert_close(model.conditioning(CAPTIONS), bottleneck.encode_text(CAPTIONS), atol=1e-5, rtol=1e-5)


# --- strict loading, checkpoints, training -------------------------------------------------------------------------

def test_load_weights_is_strict(tmp_path, bottleneck):
    encoder = ToyEncoder(bottleneck.text_width)
    path = tmp_path / 'stage1.safetensors'
    save_file(encoder.state_dict(), path)
    assert torch.equal(load_weights(ToyEncoder(bottleneck.text_width), path).queries, encoder.queries)
    save_file({f'encoder.{k}': v for k, v in encoder.state_dict().items()}, path)
    load_weights(ToyEncoder(bottleneck.text_width), path, prefix='encoder.')
    save_file({k: v for k, v in encoder.state_dict().items() if k != 'queries'} | {'extra': torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"missing keys: queries \| unexpected keys: extra"):
        load_weights(ToyEncoder(bottleneck.text_width), path)
    save_file(ToyEncoder(8).state_dict(), path)
    with pytest.raises(ValueError, match='shape mismatch'): load_weights(ToyEncoder(bottleneck.text_width), path)
    with pytest.raises(FileNotFoundError): load_weights(encoder, tmp_path / 'nothing.safetensors')


def test_load_lm_is_strict(tmp_path, cfg):
    lm, tokenizer = load_lm(cfg.decode)
    saved = save_lm(lm, tokenizer, tmp_path / 'lm', record={'a': 1})
    assert json.loads((saved / 'training.json').read_text()) == {'a': 1}
    again, tok = load_lm(cfg.decode.model_copy(update=dict(lm=str(saved))))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lm.state_dict().values()))
    assert caption_ids(tok, CAPTIONS) == caption_ids(tokenizer, CAPTIONS)   # exactly the saved word-level tokenizer
    weights = load_file(saved / 'model.safetensors'); weights.pop('model.norm.weight')
    save_file(weights, saved / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='missing_keys'): load_lm(cfg.decode.model_copy(update=dict(lm=str(saved))))
    with pytest.raises(FileNotFoundError, match='neither a folder nor a hub id'):
        load_lm(cfg.decode.model_copy(update=dict(lm=str(tmp_path / 'no' / 'such'))))


def test_checkpoint_round_trip_and_mismatch(tmp_path, cfg, bottleneck):
    model = new_model(cfg, bottleneck)
    groups = model.set_trainable('psi', lr=1e-3)
    opt = torch.optim.AdamW(groups)
    model.loss({'image': torch.rand(2, 3, 64, 64), 'caption': CAPTIONS}).backward(); opt.step()
    save_checkpoint(tmp_path / 'ckpt', model, opt, dict(step=1, history=[]))
    other = new_model(cfg, bottleneck)
    opt2 = torch.optim.AdamW(other.set_trainable('psi', lr=1e-3))
    assert load_checkpoint(tmp_path / 'ckpt', other, opt2)['step'] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.trainable_state().values(), other.trainable_state().values()))
    assert all(torch.equal(opt.state[a]['exp_avg'], opt2.state[b]['exp_avg'])
               for a, b in zip(model.trainable_state().values(), other.trainable_state().values()))
    opt3 = torch.optim.AdamW(other.set_trainable('psi+lm', lr=1e-3))
    with pytest.raises(ValueError, match='another decode.train'): load_checkpoint(tmp_path / 'ckpt', other, opt3)
    (tmp_path / 'ckpt' / 'optimizer.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='not a complete checkpoint'): load_checkpoint(tmp_path / 'ckpt', other, opt3)


class Recording(torch.utils.data.Dataset):
    "A Shapes split that records which items were read."
    def __init__(self, split): self.split, self.seen = split, set()
    @property
    def has_caption(self): return self.split.has_caption
    def caption(self, i): self.seen.add(i); return self.split.caption(i)
    def images(self, idx): self.seen.update(int(i) for i in idx); return self.split.images(idx)
    def __len__(self): return len(self.split)


def test_training_resumes_exactly_and_uses_only_captioned_items(tmp_path, cfg, bottleneck):
    data = Recording(make_splits(cfg.data, seed=0)['train'])
    straight = new_model(cfg, bottleneck)
    history = train_stage2(straight, data, cfg, tmp_path / 'a', progress=False)
    assert len(history) == cfg.decode.steps and data.seen <= set(captioned_indices(data).tolist())
    resumed = new_model(cfg, bottleneck)
    part = train_stage2(resumed, data, cfg, tmp_path / 'b', stop_after=2, progress=False)
    assert len(part) == 2 and json.loads((tmp_path / 'b' / 'checkpoint' / 'state.json').read_text())['step'] == 2
    resumed = new_model(cfg, bottleneck)
    history_b = train_stage2(resumed, data, cfg, tmp_path / 'b', progress=False)
    assert [h['loss'] for h in history_b] == [h['loss'] for h in history]
    assert all(torch.equal(a, b) for a, b in zip(straight.trainable_state().values(), resumed.trainable_state().values()))
    other = get_config('smoke', TINY_LM + ' decode.lr=0.1')
    with pytest.raises(ValueError, match=r"other settings \(decode: \['lr'\]\)"):
        train_stage2(new_model(other, bottleneck), data, other, tmp_path / 'b', progress=False)
    assert train_stage2(new_model(other, bottleneck), data, other, tmp_path / 'b', resume=False, progress=False)
    uncached = get_config('smoke', TINY_LM + ' decode.cache_conditioning=false')
    history_c = train_stage2(new_model(uncached, bottleneck), data, uncached, tmp_path / 'c', progress=False)
    np.testing.assert_allclose([h['loss'] for h in history_c], [h['loss'] for h in history], rtol=1e-5)


def test_no_captions_is_an_error(cfg, bottleneck, tmp_path):
    none = get_config('smoke', TINY_LM + ' data.caption_fraction=0')
    data = make_splits(none.data, seed=0)['train']
    with pytest.raises(ValueError, match='no captioned items'):
        train_stage2(new_model(none, bottleneck), data, none, tmp_path, progress=False)


def test_make_batch_and_scores(cfg, bottleneck):
    split = make_splits(cfg.data, seed=0)['test']
    batch = make_batch(split, [0, 3])
    assert batch['image'].shape == (2, 3, 64, 64) and batch['caption'] == [split.caption(0), split.caption(3)]
    assert set(make_batch(split, [1], ['caption'])) == {'index', 'caption'}
    model = Stage2Model(CaptionEmbedder(bottleneck), bottleneck, new_captioner(cfg, bottleneck), input_key='caption')
    scores, captions = caption_scores(model, split, n=3, batch_size=2, max_new_tokens=4, progress=False)
    assert scores['n_scenes'] == 3 and len(captions) == 3 and 0 <= scores['eos_rate'] <= 1


# --- config and the shipped toy LM ---------------------------------------------------------------------------------

def test_decode_config():
    assert get_config('paper').decode.lm == 'Qwen/Qwen2.5-3B' and get_config('paper').decode.train == 'psi+lm+encoder'
    assert get_config('toy').decode.lm == 'random' and get_config('smoke').decode.lm is None   # toy: see nbs/05_decode
    assert get_config('toy').decode.paraphrase and not get_config('paper').decode.paraphrase
    with pytest.raises(ValueError, match='lm_heads'): get_config('smoke', 'decode.lm_heads=3')
    with pytest.raises(ValueError): get_config('smoke', 'decode.train=lm')


def test_text_loss_ignores_padding():
    tok = lm_tokenizer()
    lm, _ = load_lm(get_config('smoke', TINY_LM).decode)
    alone = [text_loss(lm, tok, [c])[0] for c in CAPTIONS]
    both, n = text_loss(lm, tok, CAPTIONS)
    counts = [len(i) - 1 for i in caption_ids(tok, CAPTIONS)]
    assert n == sum(counts)
    torch.testing.assert_close(both, sum(a * c for a, c in zip(alone, counts)) / n)
    assert well_formed(CAPTIONS[1]) and not well_formed('a large red circle in the top left and a small blue square')


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


# --- paraphrased captions --------------------------------------------------------------------------------------------

def test_paraphrase_keeps_the_scene_and_changes_the_words():
    rng = np.random.default_rng(0)
    for text in make_splits(get_config('smoke').data, seed=0)['train'].captions[:20]:
        rewrites = [paraphrase(text, rng) for _ in range(8)]
        assert all(parse_caption(r) == parse_caption(text) for r in rewrites)
        assert len(set(rewrites) | {text}) > 1
    assert paraphrase('two dogs play football.', rng) == 'two dogs play football.'
    half = 'a large red circle in the top left and a blue square in the center.'    # the square has no size: not whole
    assert paraphrase(half, rng) == half


def test_paraphrased_training_sees_the_same_scenes_and_resumes_exactly(tmp_path, bottleneck, monkeypatch):
    para = get_config('smoke', TINY_LM + ' decode.paraphrase=true')
    data = make_splits(para.data, seed=0)['train']
    seen = []
    loss = CaptionDecoder.loss
    monkeypatch.setattr(CaptionDecoder, 'loss', lambda self, c, captions: seen.append(list(captions)) or loss(self, c, captions))
    straight = new_model(para, bottleneck)
    history = train_stage2(straight, data, para, tmp_path / 'a', progress=False)
    plain = get_config('smoke', TINY_LM + ' decode.paraphrase=false')
    originals = []
    monkeypatch.setattr(CaptionDecoder, 'loss', lambda self, c, captions: originals.append(list(captions)) or loss(self, c, captions))
    train_stage2(new_model(plain, bottleneck), data, plain, tmp_path / 'plain', progress=False)
    assert len(seen) == len(originals) == para.decode.steps
    assert all(parse_caption(a) == parse_caption(b) for s, o in zip(seen, originals) for a, b in zip(s, o))
    assert sum(a != b for s, o in zip(seen, originals) for a, b in zip(s, o)) > 0
    resumed = new_model(para, bottleneck)
    train_stage2(resumed, data, para, tmp_path / 'b', stop_after=2, progress=False)
    resumed = new_model(para, bottleneck)
    assert [h['loss'] for h in train_stage2(resumed, data, para, tmp_path / 'b', progress=False)] == [h['loss'] for h in history]


class FreeText(torch.utils.data.Dataset):
    "A captioned split whose captions are not Shapes captions."
    def __init__(self, split): self.split, self.has_caption = split, split.has_caption
    def __len__(self): return len(self.split)
    def __getitem__(self, i): return {**self.split[i], 'caption': f'photo number {i} of a sunny day.'}


def test_paraphrase_on_free_text_warns_and_keeps_the_captions(tmp_path, bottleneck):
    para = get_config('smoke', TINY_LM + ' decode.paraphrase=true')
    plain = get_config('smoke', TINY_LM + ' decode.paraphrase=false')
    data = FreeText(make_splits(para.data, seed=0)['train'])
    with pytest.warns(UserWarning, match='not Shapes captions'):
        warned = train_stage2(new_model(para, bottleneck), data, para, tmp_path / 'a', progress=False)
    assert [h['loss'] for h in warned] == [h['loss'] for h in train_stage2(new_model(plain, bottleneck), data, plain, tmp_path / 'b', progress=False)]
