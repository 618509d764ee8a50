"""Tests of vlv.bottleneck: the frozen diffusion decoder (tiny random-init models, offline, CPU)."""
import importlib.util, os, pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlv.bottleneck as B
from vlv.bottleneck import (SAMPLERS, SD_SUBFOLDERS, TINY, DiffusionDecoder, LatentDataset, cache_latents,
                            make_word_tokenizer)

SHAPES_TEXT = ["a large small red green blue circle square triangle in the top bottom left right center and ."]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Tiny models run fastest on one thread; several stall badly when other processes share the CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
def test_inputs_embeds_path_equals_token_path(decoder, attn):
    prompts = ["a red circle", "a small blue square in the top left"]
    decoder.text_encoder.set_attn_implementation(attn)
    try:
        ids = decoder.tokenize(prompts)
        ref = decoder.encode_text(prompts)
        emb = decoder.text_encoder.embeddings.token_embedding(ids)
        torch.testing.assert_close(decoder.encode_embeddings(emb), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoder.encode_embeddings(emb[:, :16]), ref[:, :16], atol=1e-5, rtol=1e-5)
    finally:
        decoder.text_encoder.set_attn_implementation('sdpa')


def test_inputs_embeds_errors(decoder):
    with pytest.raises(ValueError, match='width 31'): decoder.encode_embeddings(torch.randn(1, 16, 31))
    with pytest.raises(ValueError, match='sequence length 78'): decoder.encode_embeddings(torch.randn(1, 78, 32))
    with pytest.raises(ValueError, match=r'\[B, N, D\]'): decoder.encode_embeddings(torch.randn(16, 32))
    with pytest.raises(TypeError, match='float tensor'): decoder.encode_embeddings(torch.zeros(1, 4, 32, dtype=torch.long))
    assert decoder.encode_embeddings(torch.randn(1, 77, 32)).shape == (1, 77, 32)
    assert decoder.empty_prompt_embedding.shape == (1, 77, 32)


# --- frozen + loss --------------------------------------------------------------------------------------------

def test_frozen(decoder):
    assert not any(p.requires_grad for p in decoder.parameters())
    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), decoder)
    parent.train()
    assert parent[0].training and not any(m.training for m in decoder.modules())


def test_loss_gradient_reaches_conditioning_not_weights(decoder):
    z = torch.randn(2, 16, 32, requires_grad=True)
    latents = torch.randn(2, 4, 8, 8)
    loss = decoder.denoising_loss(latents, decoder.encode_embeddings(z), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.parameters())
    again = decoder.denoising_loss(latents, decoder.encode_embeddings(z), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, loss)
    assert decoder.denoising_loss(latents, decoder.encode_embeddings(z), reduction='none').shape == (2,)
    with pytest.raises(ValueError, match='batch 3'): decoder.denoising_loss(latents, torch.randn(3, 16, 32))


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
def test_cfg_with_shorter_conditioning(decoder, sampler):
    cond = decoder.encode_embeddings(torch.randn(2, 16, 32))  # N=16 != 77 = empty-prompt length
    calls, hook = count_unet_calls(decoder)
    try:
        a = decoder.sample(cond, guidance=2.0, steps=3, sampler=sampler, seed=0)
    finally:
        hook.remove()
    assert calls == [2] * 6  # separate cond and uncond passes
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(decoder.sample(cond, guidance=2.0, steps=3, sampler=sampler, seed=0), a)
    assert not torch.equal(decoder.sample(cond, guidance=2.0, steps=3, sampler=sampler, seed=1), a)


def test_cfg_batched_and_guidance_one(decoder):
    full = decoder.encode_text(["a red circle", "a blue square"])
    calls, hook = count_unet_calls(decoder)
    try:
        decoder.sample(full, guidance=2.0, steps=2, seed=0, output='latents')
        decoder.sample(full, guidance=1.0, steps=2, seed=0, output='latents')
    finally:
        hook.remove()
    assert calls == [4, 4, 2, 2]  # one batched pass per step; g=1: no uncond pass
    g = torch.Generator().manual_seed(5)
    assert torch.equal(decoder.sample(full, steps=2, generator=g), decoder.sample(full, steps=2, seed=5))


def test_sampler_errors(decoder):
    cond = decoder.encode_embeddings(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match='guidance must be >= 0'): decoder.sample(cond, guidance=-0.5)
    with pytest.raises(ValueError, match='unknown sampler'): decoder.sample(cond, sampler='euler')
    with pytest.raises(ValueError, match='conditioning must be'): decoder.sample(torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match='not both'): decoder.sample(cond, generator=torch.Generator(), seed=0)


# --- VAE ----------------------------------------------------------------------------------------------------------

def test_vae_helpers(decoder):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = decoder.encode_images(x)
        assert z.shape == (2, 4, 8, 8)
        mean, std = decoder.latent_posterior(x)
        raw = decoder.vae.encode(x * 2 - 1).latent_dist.mean
        torch.testing.assert_close(mean, raw * decoder.vae.config.scaling_factor)
        y = decoder.decode_latents(z)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    with pytest.raises(ValueError, match=r'in \[0, 1\]'): decoder.encode_images(x * 2 - 1)
    with pytest.raises(ValueError, match='not a multiple'): decoder.encode_images(x[..., :60, :60])


# --- SD folder layout -----------------------------------------------------------------------------------------

def test_sd_layout_round_trip(decoder, saved):
    assert sorted(p.name for p in saved.iterdir()) == ['model_index.json', *sorted(SD_SUBFOLDERS)]
    assert (saved / 'unet' / 'diffusion_pytorch_model.safetensors').exists()
    assert (saved / 'text_encoder' / 'model.safetensors').exists()
    assert not list(saved.rglob('*.bin'))
    loaded = DiffusionDecoder.from_pretrained(saved)
    a, b = decoder.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert torch.equal(loaded.tokenize("a red circle"), decoder.tokenize("a red circle"))
    cond = decoder.encode_embeddings(torch.randn(1, 16, 32))
    # weights are equal (above); the reloaded UNet's kernels may sum in another order (~7e-7 per call): close, not bit-equal
    torch.testing.assert_close(loaded.sample(cond, steps=2, seed=0), decoder.sample(cond, steps=2, seed=0), atol=1e-5, rtol=0)
    assert sorted(p.name for p in saved.parent.iterdir()) == ['tiny-sd']  # no temporary folders left


def copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_sd_layout_missing_folder(saved, tmp_path):
    import shutil
    d = copy_tree(saved, tmp_path / 'sd')
    shutil.rmtree(d / 'text_encoder')
    with pytest.raises(FileNotFoundError, match='missing text_encoder/'):
        DiffusionDecoder.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match='neither a folder nor a hub id'):
        DiffusionDecoder.from_pretrained(tmp_path / 'nowhere')


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
    assert torch.equal(loaded.tokenize("a red circle ."), toy.tokenize("a red circle ."))
    torch.testing.assert_close(loaded.encode_text(["a red circle ."]), toy.encode_text(["a red circle ."]))
    with pytest.raises(ValueError, match='pass the matching tokenizer'):
        DiffusionDecoder.from_config({**TINY, 'vocab_size': 100})


def test_missing_open_clip_is_clear(monkeypatch):
    monkeypatch.setattr(B.importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match='--no-deps open-clip-torch'): B.clip_tokenizer()


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason='open-clip-torch not installed (pip install --no-deps open-clip-torch)')
def test_clip_tokenizer_matches_open_clip(decoder):
    import sys, types
    spec_dir = B.open_clip_bpe_path().parent
    if importlib.util.find_spec('ftfy') is None:
        sys.modules.setdefault('ftfy', types.SimpleNamespace(fix_text=lambda s: s))
    spec = importlib.util.spec_from_file_location('_oc_tok', spec_dir / 'tokenizer.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer()
    for p in ["a photo of an astronaut riding a horse", "Two SMALL squares, top-left; 3 circles.", ""]:
        assert decoder.tokenize(p)[0].tolist() == ref([p])[0].tolist()


# --- latent cache ---------------------------------------------------------------------------------------------

class CountingVAE:
    "Wrap `decoder.latent_posterior` to count and optionally fail VAE calls."
    def __init__(self, decoder, fail_at=None):
        self.decoder, self.orig, self.calls, self.fail_at = decoder, decoder.latent_posterior, [], fail_at
    def __call__(self, x):
        if self.fail_at is not None and len(self.calls) == self.fail_at: raise RuntimeError('simulated crash')
        self.calls.append(len(x))
        return self.orig(x)


def test_latent_cache_written_once_and_reused(decoder, tmp_path, monkeypatch):
    imgs = torch.rand(7, 3, 64, 64)
    vae = CountingVAE(decoder)
    monkeypatch.setattr(decoder, 'latent_posterior', vae, raising=False)
    ds = cache_latents(imgs, tmp_path, decoder, batch_size=3, shard_size=3)
    assert vae.calls == [3, 3, 1] and len(ds) == 7
    shards = sorted(ds.folder.glob('shard-*'))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    ds2 = cache_latents(imgs, tmp_path, decoder, batch_size=3, shard_size=3)
    assert vae.calls == [3, 3, 1]  # nothing re-encoded
    assert [p.stat().st_mtime_ns for p in sorted(ds2.folder.glob('shard-*'))] == mtimes
    monkeypatch.undo()
    with torch.no_grad(): ref = decoder.encode_images(imgs)
    got = torch.stack([ds2[i] for i in range(7)])
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)  # float16 storage
    f32 = cache_latents(imgs, tmp_path, decoder, dtype=torch.float32)
    assert f32.folder != ds.folder  # storage dtype is part of the fingerprint
    torch.testing.assert_close(torch.stack([f32[i] for i in range(7)]), ref)
    # a resized transform is a different cache
    resized = cache_latents(torch.rand(2, 3, 32, 32), tmp_path, decoder, size=64)
    assert resized.folder != ds.folder and resized[0].shape == (4, 8, 8)
    # a dataset over the cache: DataLoader, pickling, source zipping, posterior sampling
    batch = next(iter(torch.utils.data.DataLoader(ds2, batch_size=4)))
    assert batch.shape == (4, 4, 8, 8)
    assert torch.equal(pickle.loads(pickle.dumps(ds2))[3], ds2[3])
    pairs = [(im, f'caption {i}') for i, im in enumerate(imgs)]
    zipped = cache_latents(pairs, tmp_path, decoder, zip_source=True)
    (im, cap), z = zipped[2]
    assert cap == 'caption 2' and torch.equal(im, imgs[2]) and torch.equal(z, ds2[2])
    dicts = cache_latents([{'image': im, 'caption': f'c{i}'} for i, im in enumerate(imgs)], tmp_path, decoder, zip_source=True)
    assert dicts[2]['caption'] == 'c2' and torch.equal(dicts[2]['latents'], ds2[2])
    from vlv.core import tensor_to_pil
    pil = cache_latents([tensor_to_pil(im) for im in imgs[:2]], tmp_path, decoder)
    assert pil[0].shape == (4, 8, 8)
    assert not torch.equal(LatentDataset(ds.folder, ds.keys, sample=True)[0], ds2[0])
    with pytest.raises(KeyError, match='not in the latent cache'): LatentDataset(ds.folder, ['nope'])


def test_latent_cache_keys_skip_loading(decoder, tmp_path):
    class Source(torch.utils.data.Dataset):
        def __init__(self): self.loaded = []; self.imgs = torch.rand(4, 3, 64, 64)
        def __len__(self): return 4
        def __getitem__(self, i): self.loaded.append(i); return {'image': self.imgs[i], 'caption': 'x'}
    src, keys = Source(), [f'img{i}.png' for i in range(4)]
    cache_latents(src, tmp_path, decoder, keys=keys)
    src.loaded.clear()
    ds = cache_latents(src, tmp_path, decoder, keys=keys)
    assert src.loaded == [] and len(ds) == 4


def test_latent_cache_atomic_on_failure(decoder, tmp_path, monkeypatch):
    imgs = torch.rand(6, 3, 64, 64)
    cache_latents(imgs[:1], tmp_path, decoder)  # creates the fingerprint folder and info.json
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    before = sorted(p.name for p in folder.iterdir())
    # 1. the process dies while writing a shard: no partial or temporary file survives
    def broken_fsync(fd): raise OSError('simulated crash during write')
    monkeypatch.setattr(B.os, 'fsync', broken_fsync)
    with pytest.raises(OSError, match='simulated crash'): cache_latents(imgs, tmp_path, decoder, batch_size=2, shard_size=2)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == before
    # 2. the process dies between shards: complete shards stay and a re-run encodes only the rest
    vae = CountingVAE(decoder, fail_at=2)
    monkeypatch.setattr(decoder, 'latent_posterior', vae, raising=False)
    with pytest.raises(RuntimeError, match='simulated crash'): cache_latents(imgs, tmp_path, decoder, batch_size=2, shard_size=2)
    assert vae.calls == [2, 2] and len(list(folder.glob('shard-*'))) == len(before) - 1 + 2
    assert not [p for p in folder.iterdir() if p.name.startswith('.')]
    vae.fail_at = None
    ds = cache_latents(imgs, tmp_path, decoder, batch_size=2, shard_size=2)
    assert vae.calls == [2, 2, 1] and len(ds) == 6  # image 0 was cached before, 1-4 in the crashed run
