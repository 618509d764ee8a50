"""Converting the authors' released stage-2 checkpoint (nbs/93_reference), tested on a stand-in with its key names and
shapes at the `mini` preset's sizes: every part of the converted model against the original tensors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, Florence2Config

from vlv.core import get_config
from vlv.bottleneck import load_decoder
from vlv.decode import load_vlv
from vlv.miniature import ensure_miniature
from vlv.reference import (REFERENCE_PROMPT, ReferenceMismatch, import_reference, read_reference, reference_settings,
                           standin_state)

N_QUERIES = 8


@pytest.fixture(scope='module')
def original():
    "The stand-in state dict (bf16, every tensor its own random values) at the mini preset's sizes."
    cfg = get_config('mini'); ensure_miniature(cfg)
    fc, qc = Florence2Config.from_pretrained(cfg.encoder.pretrained), AutoConfig.from_pretrained(cfg.decode.lm)
    clip = load_decoder(cfg.bottleneck).text_encoder.state_dict()
    return standin_state(fc, qc, num_queries=N_QUERIES, text_width=cfg.bottleneck.text_width, clip_state=clip, seed=1)


@pytest.fixture(scope='module')
def converted(original, tmp_path_factory):
    "The stand-in saved as the authors' trainer may (DDP prefix, model_state_dict wrapper), converted, and loaded strictly."
    folder = tmp_path_factory.mktemp('reference')
    torch.save({'model_state_dict': {f'module.{k}': v for k, v in original.items()}}, folder / 'model.pt')
    out = import_reference(folder / 'model.pt', folder / 'converted', base='mini')
    model, encoder, bottleneck, cfg = load_vlv(out)   # strict loads of encoder, psi and LM
    return out, model, encoder, cfg


def f32(state, key): return state[key].float()


@pytest.mark.parametrize('wrap', ['plain', 'module', 'model_state_dict'])
def test_read_containers(original, tmp_path, wrap):
    state = {f'module.{k}': v for k, v in original.items()} if wrap == 'module' else original
    torch.save({'model_state_dict': state} if wrap == 'model_state_dict' else state, tmp_path / 'model.pt')
    read = read_reference(tmp_path / 'model.pt')
    assert list(read) == list(original)
    assert all(torch.equal(read[k], original[k]) for k in original)


def test_read_refuses_code_and_mixed_prefixes(tmp_path):
    torch.save({'a': torch.zeros(1), 'x': torch.nn.Linear(1, 1)}, tmp_path / 'pickled.pt')   # a module object: needs code
    with pytest.raises(ValueError, match='weights_only'): read_reference(tmp_path / 'pickled.pt')
    with pytest.raises(ValueError, match="some keys carry the DDP prefix"): read_reference({'module.a': torch.zeros(1), 'b': torch.zeros(1)})
    with pytest.raises(FileNotFoundError): read_reference(tmp_path / 'none.pt')


def test_config_carries_reference_behaviour(converted):
    out, model, encoder, cfg = converted
    assert cfg.encoder.prompt == REFERENCE_PROMPT and cfg.encoder.num_queries == N_QUERIES
    assert (cfg.decode.num_beams, cfg.decode.max_new_tokens) == (4, 300)
    ref = reference_settings(out)
    assert (ref['crop_size'], ref['resample'], ref['dedupe_sentences'], ref['early_stopping'], ref['stage']) == (384, 'bicubic', True, True, 2)


def test_queries_phi_psi(original, converted):
    _, model, encoder, cfg = converted
    assert torch.equal(encoder.queries.data, f32(original, 'VLV_model.query_embed'))
    h = torch.randn(2, N_QUERIES, encoder.d_model)
    phi = F.linear(F.gelu(F.linear(h, f32(original, 'VLV_model.language_proj.0.weight'), f32(original, 'VLV_model.language_proj.0.bias'))),
                   f32(original, 'VLV_model.language_proj.2.weight'), f32(original, 'VLV_model.language_proj.2.bias'))
    torch.testing.assert_close(encoder.projector(h), phi)
    c = torch.randn(2, N_QUERIES, cfg.bottleneck.text_width)
    psi = F.linear(F.gelu(F.linear(c, f32(original, 'mlp.layers.0.weight'), f32(original, 'mlp.layers.0.bias'))),
                   f32(original, 'mlp.layers.2.weight'), f32(original, 'mlp.layers.2.bias'))
    torch.testing.assert_close(model.caption_decoder.prefix(c).float(), psi, rtol=2e-2, atol=2e-2)   # psi stays bf16, as in the file


def test_bart_attention_projections(original, converted):
    _, _, encoder, _ = converted
    x = torch.randn(3, encoder.d_model)
    lm = 'VLV_model.model.language_model.model.'
    q = encoder.language.encoder.layers[0].self_attn.q_proj
    torch.testing.assert_close(q(x), x @ f32(original, lm + 'encoder.layers.0.self_attn.q_proj.weight').T + f32(original, lm + 'encoder.layers.0.self_attn.q_proj.bias'))
    k = encoder.language.decoder.layers[0].encoder_attn.k_proj
    torch.testing.assert_close(k(x), x @ f32(original, lm + 'decoder.layers.0.encoder_attn.k_proj.weight').T + f32(original, lm + 'decoder.layers.0.encoder_attn.k_proj.bias'))


def test_image_projection_is_transposed(original, converted):
    _, _, encoder, _ = converted
    projection = f32(original, 'VLV_model.model.image_projection')    # [in, out]: the remote code computes x @ P
    x = torch.randn(2, 5, projection.shape[0])
    assert projection.shape[0] != projection.shape[1]
    torch.testing.assert_close(encoder.image_projector.image_projection(x), x @ projection)


def native_davit_name(key: str) -> str:
    "The native name of a remote-code DaViT tensor, as transformers' Florence-2 converter lists them."
    k = key.removeprefix('VLV_model.model.vision_tower.')
    if k.startswith('convs.'): return 'model.vision_tower.' + k.replace('.proj.', '.conv.')
    for old, new in (('conv1.fn.dw.', 'conv1.'), ('conv2.fn.dw.', 'conv2.'), ('window_attn.norm.', 'norm1.'),
                     ('channel_attn.norm.', 'norm1.'), ('window_attn.fn.', 'window_attn.'), ('channel_attn.fn.', 'channel_attn.'),
                     ('ffn.norm.', 'norm2.'), ('ffn.fn.net.', 'ffn.')):
        k = k.replace(old, new)
    return 'model.vision_tower.' + k


def test_every_davit_tensor_lands(original, converted):
    _, _, encoder, _ = converted
    native = encoder.florence.state_dict()
    davit = [k for k in original if k.startswith('VLV_model.model.vision_tower.') and '.norms.' not in k and '.head.' not in k]
    assert len(davit) == sum(k.startswith('model.vision_tower.') for k in native)
    for key in davit:
        name = native_davit_name(key)
        assert name in native, f"{key} -> {name}: no such native tensor"
        assert native[name].shape == original[key].shape and torch.equal(native[name], f32(original, key)), key


def test_embeddings_lm_and_dropped(original, converted):
    out, model, encoder, _ = converted
    shared = f32(original, 'VLV_model.model.language_model.model.shared.weight')
    table = encoder.language.get_input_embeddings().weight
    assert len(table) == len(shared) + 1 and torch.equal(table[:len(shared)], shared)
    lm = model.caption_decoder.lm.state_dict()
    assert all(torch.equal(lm[k.removeprefix('qwen2_model.')], f32(original, k)) for k in original if k.startswith('qwen2_model.'))
    dropped = set(reference_settings(out)['dropped'])
    assert {k for k in original if k.startswith('VLV_model.text_encoder.')} <= dropped
    assert {'VLV_model.model.language_model.lm_head.weight', 'VLV_model.model.language_model.final_logits_bias',
            'VLV_model.model.vision_tower.head.weight', 'VLV_model.model.vision_tower.norms.bias',
            'VLV_model.model.language_model.model.decoder.embed_tokens.weight'} <= dropped
    assert not [k for k in dropped if k.startswith(('qwen2_model.', 'mlp.', 'VLV_model.query', 'VLV_model.language_proj'))]


@pytest.mark.parametrize('change, named', [
    ('extra', 'VLV_model.model.vision_tower.blocks.0.0.spatial_block.extra.weight'),
    ('extra', 'unrelated.weight'),
    ('missing', 'mlp.layers.2.bias'),
    ('missing', 'VLV_model.model.vision_tower.blocks.0.0.channel_block.ffn.fn.net.fc2.weight'),
    ('missing', 'qwen2_model.model.norm.weight'),
])
def test_leftover_or_missing_key_is_named(original, tmp_path, change, named):
    state = dict(original, **{named: torch.zeros(1)}) if change == 'extra' else {k: v for k, v in original.items() if k != named}
    with pytest.raises(ValueError) as error: import_reference(state, tmp_path / 'out', base='mini')
    shown = named if change == 'extra' else named.split('.', 2)[-1].replace('ffn.fn.net.', 'ffn.').removeprefix('layers.')
    assert shown in str(error.value), str(error.value)
    assert not (tmp_path / 'out').exists()
    if change == 'extra': assert isinstance(error.value, ReferenceMismatch)


def test_caption_and_reconstruct(converted, tmp_path):
    from vlv.apps import caption_files, reconstruct_files
    from PIL import Image
    out = converted[0]
    Image.new('RGB', (300, 200), (200, 30, 30)).save(tmp_path / 'red.png')
    report = caption_files([tmp_path / 'red.png'], out, tmp_path / 'captions.json', max_new_tokens=6, num_beams=2)
    assert list(json.loads((tmp_path / 'captions.json').read_text())) == ['red.png'] == list(report.captions)
    with pytest.warns(UserWarning, match='stage-2 checkpoint'):
        reconstruct_files([tmp_path / 'red.png'], out, tmp_path / 'recon', steps=1)


def test_cli_without_the_hub(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from vlv.cli import main
    def offline(*args, **kwargs): raise LocalEntryNotFoundError("the Hub cannot be reached")
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
    assert main(['import-reference', 'someone/some-model', '--out', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert 'hf download someone/some-model model.pt' in err and 'vlv import-reference DIR/model.pt' in err
    assert main(['import-reference', str(tmp_path / 'nothing.pt'), '--out', str(tmp_path / 'out')]) == 1
