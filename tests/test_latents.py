"""Tests of vlv.latents: the VAE latent cache of stage 1 (written once, reused, atomic), on the tiny decoder."""
import os
import pickle

import pytest
import torch

from vlv.images import tensor_to_pil
from vlv.latents import LatentDataset, cache_latents


@pytest.fixture(scope='module')
def decoder(tiny_decoder):
    "Its VAE encodes the images (8 x 8 latents of 64 px images)."
    return tiny_decoder


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
    monkeypatch.setattr(os, 'fsync', broken_fsync)
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
