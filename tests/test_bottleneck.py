"""Tests of vlv.bottleneck: the frozen diffusion decoder (SD 2.1-base structure at tiny widths, offline, CPU)."""
import importlib.util
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlv.bottleneck as B
from vlv.bottleneck import SAMPLERS, TINY, DiffusionDecoder
from vlv.tokenizers import make_word_tokenizer

SHAPES_TEXT = ["a large small red green blue circle square triangle in the top bottom left right center and ."]
HAS_OPEN_CLIP = importlib.util.find_spec('open_clip') is not None


@pytest.fixture(scope='module')
def decoder():
    "SD 2.1-base block structure at tiny widths; the CLIP BPE tokenizer when open-clip-torch is installed."
    tokenizer = None if HAS_OPEN_CLIP else make_word_tokenizer(SHAPES_TEXT, max_length=77)
    return DiffusionDecoder.from_config(TINY, tokenizer=tokenizer)


@pytest.fixture(scope='module')
def saved(decoder, tmp_path_factory):
    return decoder.save_pretrained(tmp_path_factory.mktemp('sd') / 'tiny-sd')


def count_unet_calls(decoder):
    calls = []
    return calls, decoder.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))


# --- text encoder on continuous embeddings ---------------------------------------------------------------------

def test_embeddings_without_a_batch_axis_are_named(decoder):
    with pytest.raises(ValueError, match=r'\[B, N, D\]'): decoder.encode_embeddings(torch.randn(16, 32))
    assert decoder.encode_embeddings(torch.randn(1, 77, 32)).shape == (1, 77, 32)   # all max_length positions


# --- loss -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_loss_matches_scheduler_noising(decoder, prediction_type):
    "With fixed t the loss is the MSE between the UNet output on diffusers' add_noise and the scheduler's target."
    if prediction_type != 'epsilon':
        decoder = DiffusionDecoder.from_config({**TINY, 'prediction_type': prediction_type}, tokenizer=decoder.tokenizer)
    latents, cond, t = torch.randn(2, 4, 8, 8), decoder.encode_text(["a", "b"]), torch.tensor([3, 700])
    loss = decoder.denoising_loss(latents, cond, generator=torch.Generator().manual_seed(1), timesteps=t, reduction='none')
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = decoder.unet(decoder.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
    target = noise if prediction_type == 'epsilon' else decoder.scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-4)


# --- CFG sampler ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_every_sampler_makes_two_passes_per_step_and_follows_the_seed(decoder, sampler):
    "Shorter conditioning (N=16 != 77, the empty prompt's length): separate cond and uncond passes, with every sampler."
    cond = decoder.encode_embeddings(torch.randn(2, 16, 32))
    calls, hook = count_unet_calls(decoder)
    try:
        a = decoder.sample(cond, guidance=2.0, steps=3, sampler=sampler, seed=0)
    finally:
        hook.remove()
    assert calls == [2] * 6 and a.dtype == torch.float32
    assert not torch.equal(decoder.sample(cond, guidance=2.0, steps=3, sampler=sampler, seed=1), a)


def test_generator_or_seed(decoder):
    full = decoder.encode_text(["a red circle", "a blue square"])
    g = torch.Generator().manual_seed(5)
    assert torch.equal(decoder.sample(full, steps=2, generator=g), decoder.sample(full, steps=2, seed=5))
    with pytest.raises(ValueError, match='not both'): decoder.sample(full, generator=torch.Generator(), seed=0)


# --- VAE ----------------------------------------------------------------------------------------------------------

def test_vae_helpers(decoder):
    "The posterior mean is the VAE's on [-1, 1] pixels, scaled; decoded images are back in [0, 1]."
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = decoder.encode_images(x)
        mean, std = decoder.latent_posterior(x)
        raw = decoder.vae.encode(x * 2 - 1).latent_dist.mean
        torch.testing.assert_close(mean, raw * decoder.vae.config.scaling_factor)
        y = decoder.decode_latents(z)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


# --- SD folder layout -----------------------------------------------------------------------------------------

def test_sd_layout_files(saved):
    "Safetensors only, in diffusers' file names; the loaded decoder is frozen; no temporary folder is left."
    assert (saved / 'unet' / 'diffusion_pytorch_model.safetensors').exists()
    assert (saved / 'text_encoder' / 'model.safetensors').exists()
    assert not list(saved.rglob('*.bin'))
    loaded = DiffusionDecoder.from_pretrained(saved)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert sorted(p.name for p in saved.parent.iterdir()) == ['tiny-sd']


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize('part,file', [('unet', 'diffusion_pytorch_model.safetensors'),
                                       ('text_encoder', 'model.safetensors'),
                                       ('vae', 'diffusion_pytorch_model.safetensors')])
def test_sd_layout_strict_keys(saved, tmp_path, part, file):
    d = copy_tree(saved, tmp_path / 'sd')
    weights = load_file(d / part / file)
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, d / part / file, metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='missing_keys'): DiffusionDecoder.from_pretrained(d)
    save_file({**weights, 'surplus.weight': torch.zeros(2)}, d / part / file, metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='unexpected_keys'): DiffusionDecoder.from_pretrained(d)


def test_hub_style_text_encoder_keys_load(decoder, saved, tmp_path):
    "SD 2.x hub checkpoints name the text weights 'text_model.*' and keep a position_ids buffer: still strict-loadable."
    d = copy_tree(saved, tmp_path / 'sd')
    w = load_file(d / 'text_encoder' / 'model.safetensors')
    old = {f'text_model.{k}': v for k, v in w.items()} | {'text_model.embeddings.position_ids': torch.arange(77)[None]}
    save_file(old, d / 'text_encoder' / 'model.safetensors', metadata={'format': 'pt'})
    loaded = DiffusionDecoder.from_pretrained(d)
    torch.testing.assert_close(loaded.encode_text(["a red circle"]), decoder.encode_text(["a red circle"]))


def test_save_pretrained_is_atomic(decoder, saved, tmp_path, monkeypatch):
    d = copy_tree(saved, tmp_path / 'sd')
    before = sorted(p.relative_to(d) for p in d.rglob('*'))
    monkeypatch.setattr(decoder.scheduler, 'save_pretrained', lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError, match='disk full'): decoder.save_pretrained(d)
    assert sorted(p.relative_to(d) for p in d.rglob('*')) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sd']
    monkeypatch.undo()
    decoder.save_pretrained(d)  # replacing an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sd']
    DiffusionDecoder.from_pretrained(d)


def test_missing_toy_teacher_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(B, 'teacher_path', lambda: tmp_path / 'teacher')
    with pytest.raises(FileNotFoundError, match='03a_teacher'): DiffusionDecoder.from_pretrained(None)


# --- tokenizers -----------------------------------------------------------------------------------------------

def test_word_tokenizer_model_round_trip(tmp_path):
    words = make_word_tokenizer(SHAPES_TEXT, max_length=32)
    ids = words(["A small red circle in the center."]).input_ids[0]
    assert ids[0] == words.bos_token_id and ids[-1] == words.eos_token_id and words.unk_token_id not in ids
    assert words.pad_token_id == 0
    toy = DiffusionDecoder.from_config({**TINY, 'vocab_size': len(words), 'max_length': 32}, tokenizer=words)
    assert toy.text_encoder.embeddings.token_embedding.weight.shape == (len(words), 32)
    loaded = DiffusionDecoder.from_pretrained(toy.save_pretrained(tmp_path / 'toy'))
    torch.testing.assert_close(loaded.encode_text(["a red circle ."]), toy.encode_text(["a red circle ."]))
    with pytest.raises(ValueError, match='pass the matching tokenizer'):
        DiffusionDecoder.from_config({**TINY, 'vocab_size': 100})
