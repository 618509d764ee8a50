"""Tests of vlv.encoder: Florence-2 with learnable queries and phi (random-init, tiny widths, offline, CPU)."""
import json

import pytest
import torch

from vlv.checkpoints import CheckpointMismatch, unique_state
from vlv.core import get_config
from vlv.encoder import PARTS, build_encoder, load_encoder, save_encoder
from vlv.tokenizers import prompt_tokenizer


def paper_structure_tiny():
    "The paper preset's Florence-2-large block structure (4 DaViT stages, depths 1/1/9/1, window 12) at tiny widths."
    paper = get_config('paper').encoder
    return paper.model_copy(update=dict(
        pretrained=None, image_size=96, vision_embed_dim=(8, 16, 32, 64), vision_heads=(1, 2, 4, 8),
        vision_groups=(1, 2, 4, 8), d_model=32, encoder_layers=2, decoder_layers=2, attention_heads=4, ffn_dim=64,
        max_positions=128))


@pytest.fixture(scope='module')
def encoder():
    return build_encoder(paper_structure_tiny(), text_width=32, seed=0).eval()   # paper dropout 0.1: eval for comparisons


@pytest.fixture(scope='module')
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_paper_structure_and_shapes(encoder, images):
    "The config's structure reaches the model (paper: DaViT depths 1/1/9/1, window 12, 77 queries, frozen tower)."
    cfg = encoder.cfg
    v = encoder.florence.config.vision_config
    assert tuple(v.depths) == cfg.vision_depths and v.window_size == cfg.vision_window_size
    assert len(encoder.vision_tower.blocks) == len(cfg.vision_depths) and encoder.num_queries == cfg.num_queries
    assert not any(p.requires_grad for p in encoder.parts()['vision']) and not cfg.train_vision
    with torch.no_grad():
        feats = encoder.vision_features(images)   # 64 px in, resized to 96
        z = encoder(images)
    assert feats.shape == (3, cfg.vision_embed_dim[-1], 3, 3)   # 96 / 32
    assert z.shape == (3, cfg.num_queries, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(vision_features=feats), z)
    assert encoder.florence.config._attn_implementation == 'sdpa'


def test_prompt_enters_the_encoder(encoder, images):
    with torch.no_grad(): encoded = encoder.encode(images)
    n_image = 3 * 3 + 1
    assert encoded.shape[1] == n_image + len(encoder.prompt_ids)
    tokens = prompt_tokenizer(encoder.cfg).convert_ids_to_tokens(encoder.prompt_ids.tolist())
    assert tokens[0] == '<bos>' and tokens[-1] == '<eos>' and 'describe' in tokens


def test_trainable_parts_follow_config(encoder):
    flags = {k: [p.requires_grad for p in ps] for k, ps in encoder.parts().items()}
    assert set(flags) == set(PARTS)
    assert not any(flags['vision']) and all(flags['language']) and all(flags['queries']) and all(flags['projector'])
    encoder.train()
    assert not encoder.vision_tower.training and encoder.language.training
    encoder.eval()
    everything = build_encoder(paper_structure_tiny().model_copy(update=dict(train_vision=True)), 32)
    assert all(p.requires_grad for p in everything.parameters())


def test_bad_images_are_named(encoder):
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'): encoder(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match='pixels or vision_features'): encoder.encode()


def test_z_conditions_the_decoder_with_cfg(tiny_decoder, images):
    "z (N = the text encoder's max_length, or fewer) goes through encode_embeddings; CFG's empty prompt has max_length positions."
    decoder = tiny_decoder
    full, short = (build_encoder(paper_structure_tiny().model_copy(update=dict(num_queries=n)), decoder.text_width)
                   for n in (decoder.max_length, 16))
    with torch.no_grad():
        for enc in (full, short):
            cond = decoder.encode_embeddings(enc(images))
            out = decoder.sample(cond, guidance=2.0, steps=2, seed=0)
            assert out.shape == (3, 3, 64, 64) and torch.isfinite(out).all()


def test_save_load_roundtrip(encoder, images, tmp_path):
    path = save_encoder(encoder, tmp_path / 'enc')
    assert sorted(p.name for p in path.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((path / 'config.json').read_text())
    assert config['text_width'] == 32 and config['encoder']['num_queries'] == 77
    loaded = load_encoder(path).eval()
    with torch.no_grad(): torch.testing.assert_close(loaded(images), encoder(images))
    a, b = unique_state(encoder)[0], unique_state(loaded)[0]
    assert set(a) == set(b)
    assert not any(p.requires_grad for p in loaded.parts()['vision'])


def test_tied_weights_stored_once(encoder):
    state, aliases = unique_state(encoder)
    assert 'florence.lm_head.weight' in aliases
    assert aliases['florence.lm_head.weight'] in state


def test_checkpoint_from_another_config_names_keys_and_shapes(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / 'enc')
    other = paper_structure_tiny().model_copy(update=dict(num_queries=16, d_model=64, encoder_layers=3))
    with pytest.raises(CheckpointMismatch) as e: load_encoder(path, cfg=other)
    msg = str(e.value)
    assert 'queries: checkpoint [1, 77, 32] vs model [1, 16, 64]' in msg
    assert 'missing keys' in msg and 'encoder.layers.2' in msg and 'shape mismatch' in msg


def test_not_an_encoder_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a saved VLV encoder'): load_encoder(tmp_path)


def test_seeded_init_is_reproducible():
    cfg = get_config('smoke').encoder
    a, b = build_encoder(cfg, 32, seed=3), build_encoder(cfg, 32, seed=3)
    for (k, x), (_, y) in zip(unique_state(a)[0].items(), unique_state(b)[0].items()): assert torch.equal(x, y), k
    assert not torch.equal(build_encoder(cfg, 32, seed=4).queries, a.queries)


def test_position_init_std(images):
    cfg = get_config('smoke').encoder.model_copy(update=dict(position_init_std=0.5))
    enc = build_encoder(cfg, 32)
    std = enc.language.encoder.embed_positions.weight.std().item()
    assert 0.4 < std < 0.6


def test_toy_pixel_statistics_are_the_shapes_worlds():
    "The toy preset normalises with the Shapes training images' own per-channel mean and std (not ImageNet's)."
    from vlv.data import make_splits
    cfg = get_config('toy')
    train = make_splits(cfg.data.model_copy(update=dict(n_train=2000)), seed=0)['train']
    pixels = torch.from_numpy(train.images(range(2000))).float().div(255)   # [n, H, W, 3]
    mean, std = pixels.mean((0, 1, 2)), pixels.std((0, 1, 2))
    torch.testing.assert_close(mean, torch.tensor(cfg.encoder.pixel_mean), atol=0.005, rtol=0)
    torch.testing.assert_close(std, torch.tensor(cfg.encoder.pixel_std), atol=0.005, rtol=0)


def test_image_tokens_readout(images, tmp_path):
    "readout='image_tokens': z = phi(BART encoder output at the grid tokens); decoder and queries frozen; survives save/load."
    cfg = get_config('smoke').encoder.model_copy(update=dict(readout='image_tokens', num_queries=16))
    enc = build_encoder(cfg, 32, seed=0).eval()
    assert enc.grid_tokens == 16                                        # 64 px, strides 4 * 2 * 2 -> 4 x 4
    with torch.no_grad():
        z = enc(images)
        torch.testing.assert_close(z, enc.projector(enc.encode(images)[:, 1:17]))
    assert z.shape == (3, 16, 32)
    assert not enc.queries.requires_grad and not any(p.requires_grad for p in enc.decoder_only())
    assert enc.language.encoder.layers[0].self_attn.q_proj.weight.requires_grad
    enc(images).sum().backward()
    assert all(p.grad is None for p in enc.decoder_only())             # the decoder really is unused
    assert not {id(p) for p in enc.language_model_parameters()} & {id(p) for p in enc.decoder_only()}   # stage 2 leaves it out too
    loaded = load_encoder(save_encoder(enc, tmp_path / 'enc')).eval()
    assert loaded.cfg.readout == 'image_tokens'
    with torch.no_grad(): torch.testing.assert_close(loaded(images), z)
    with pytest.raises(ValueError, match='encoder.num_queries=16'): build_encoder(cfg.model_copy(update=dict(num_queries=4)), 32)


@pytest.mark.parametrize('preset', ['smoke', 'toy', 'paper'])
def test_each_preset_builds_a_z_its_decoder_reads(preset, encoder):
    "Each preset's readout builds (image_tokens: num_queries must be the grid its image size gives) and z fits the text encoder."
    cfg = get_config(preset)
    ecfg = encoder.cfg if preset == 'paper' else cfg.encoder   # paper: its structure at tiny widths (module fixture)
    enc = encoder if preset == 'paper' else build_encoder(ecfg, cfg.bottleneck.text_width, seed=0).eval()
    with torch.no_grad(): z = enc(torch.rand(1, 3, ecfg.image_size, ecfg.image_size))
    assert z.shape[1] == ecfg.num_queries <= cfg.bottleneck.max_length
    if ecfg.readout == 'image_tokens': assert enc.grid_tokens == ecfg.num_queries


def test_toy_preset_starts_from_the_shipped_florence():
    "encoder.pretrained='toy' is the toy Florence-2 in vlv/assets/florence (nbs/04a): its weights, fresh queries and phi."
    from transformers import Florence2ForConditionalGeneration
    from vlv.hub import TOY_FLORENCE, florence_path
    cfg = get_config('toy')
    assert cfg.encoder.pretrained == TOY_FLORENCE and (florence_path() / 'training.json').is_file()
    enc = build_encoder(cfg.encoder, cfg.bottleneck.text_width, seed=3)
    shipped = Florence2ForConditionalGeneration.from_pretrained(florence_path()).state_dict()
    assert all(torch.equal(shipped[k], v) for k, v in enc.florence.state_dict().items())
    assert enc.cfg.pretrained == TOY_FLORENCE   # the record names the asset, not this install's path
    assert not torch.equal(enc.queries, build_encoder(cfg.encoder, cfg.bottleneck.text_width, seed=4).queries)
    record = json.loads((florence_path() / 'training.json').read_text())
    assert record['command'] == 'vlv run --preset toy --name florence --only 04a -p train True -p ship True'


def test_missing_toy_florence_names_the_command(monkeypatch, tmp_path):
    "Without the shipped asset (e.g. a trimmed install) the error says how to make it."
    import vlv.hub
    monkeypatch.setattr(vlv.hub, 'florence_path', lambda: tmp_path / 'florence')
    for make in (lambda: build_encoder(get_config('toy').encoder, 32), lambda: prompt_tokenizer(get_config('toy').encoder)):
        with pytest.raises(FileNotFoundError, match=r'--only 04a -p train True -p ship True'): make()


def test_a_pretrained_florence_refuses_size_fields_it_contradicts():
    "A size field set over a pretrained Florence-2 would be ignored (its checkpoint fixes the model): an error naming both values."
    ok = get_config('toy', 'encoder.d_model=128 encoder.dropout=0.0')   # the shipped checkpoint's own values
    build_encoder(ok.encoder, ok.bottleneck.text_width)
    bad = get_config('toy', 'encoder.d_model=64 encoder.vision_depths=[1,1,2]')
    with pytest.raises(ValueError, match=r"encoder.pretrained='toy' .*encoder.vision_depths=\[1, 1, 2\] \(the checkpoint: \[1, 1, 1\]\), "
                                         r"encoder.d_model=64 \(the checkpoint: 128\)"):
        build_encoder(bad.encoder, bad.bottleneck.text_width)
