"""The miniature of the paper path (nbs/05b_miniature): tiny models in the Hub's layout, read by the paper's loaders."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vlv.core import MINIATURE_DIR, get_config
from vlv.miniature import LOCATIONS, PHOTOS, ensure_miniature, miniature_complete, miniature_config, miniature_layout


@pytest.fixture(scope='module')
def mini(tmp_path_factory):
    "A `mini` config and its miniature, written once for this file."
    cfg = miniature_config(tmp_path_factory.mktemp('miniature') / 'mini')
    return cfg, ensure_miniature(cfg)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != 'miniature.json'}


def test_preset_points_into_the_miniature():
    cfg = get_config('mini')
    paper = get_config('paper')
    assert miniature_layout(cfg)[0] == MINIATURE_DIR
    assert (cfg.data.source, cfg.encoder.readout, cfg.decode.train) == (paper.data.source, paper.encoder.readout, paper.decode.train)
    assert cfg.encoder.prompt == paper.encoder.prompt and cfg.bottleneck.max_length == paper.bottleneck.max_length == 77


def test_layout_and_reuse(mini):
    cfg, folder = mini
    layout = miniature_layout(cfg)[1]
    sd = folder / layout['bottleneck.pretrained']
    assert {p.name for p in sd.iterdir()} == {'model_index.json', 'vae', 'text_encoder', 'unet', 'scheduler', 'tokenizer',
                                              'feature_extractor'}
    assert (sd / 'unet' / 'diffusion_pytorch_model.safetensors').is_file() and (sd / 'text_encoder' / 'model.safetensors').is_file()
    assert json.loads((sd / 'scheduler' / 'scheduler_config.json').read_text())['_class_name'] == 'PNDMScheduler'
    assert (folder / layout['encoder.pretrained'] / 'model.safetensors').is_file()
    assert (folder / layout['decode.lm'] / 'model.safetensors.index.json').is_file()
    assert len(list((folder / 'shards').glob('photos-*.tar'))) == 2
    assert not list(folder.rglob('*.bin')) and not list(folder.rglob('*.pt'))   # safetensors only
    stamp = (folder / 'miniature.json').read_text()
    assert ensure_miniature(cfg) == folder and (folder / 'miniature.json').read_text() == stamp   # reused


def test_incomplete_folder_is_rebuilt(tmp_path):
    cfg = miniature_config(tmp_path / 'mini')
    folder = ensure_miniature(cfg)
    digest = json.loads((folder / 'miniature.json').read_text())['digest']
    unet = folder / 'stable-diffusion-2-1-base' / 'unet' / 'diffusion_pytorch_model.safetensors'
    unet.write_bytes(unet.read_bytes()[:100])   # truncated
    assert not miniature_complete(folder, digest)
    before = digests(folder)
    ensure_miniature(cfg)
    assert miniature_complete(folder, digest) and digests(folder) != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.mini.tmp')]   # no temporary folder left


def test_deterministic_and_locked(mini, tmp_path):
    "Two threads asking at once get one complete miniature, byte for byte the module's."
    cfg = miniature_config(tmp_path / 'mini')
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_miniature(cfg))) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert results == [tmp_path / 'mini'] * 2
    assert digests(tmp_path / 'mini') == digests(mini[1])


def test_layout_errors(tmp_path):
    cfg = get_config('mini', {'decode.lm': str(tmp_path / 'elsewhere' / 'qwen2.5')})
    with pytest.raises(ValueError, match='one folder'): ensure_miniature(cfg)
    with pytest.raises(ValueError, match='absolute'): miniature_layout(get_config('paper'))


def test_missing_folder_is_a_clear_error(tmp_path):
    from vlv.bottleneck import load_decoder
    from vlv.decode import load_lm
    from vlv.encoder import build_encoder
    cfg = miniature_config(tmp_path / 'never-written')
    for load in (lambda: build_encoder(cfg.encoder, 32), lambda: load_decoder(cfg.bottleneck), lambda: load_lm(cfg.decode)):
        with pytest.raises(FileNotFoundError, match='neither a folder nor a hub id'): load()


def test_paper_loaders_train_and_caption(mini):
    from vlv.bottleneck import load_decoder
    from vlv.decode import CaptionDecoder, Stage2Model, load_lm
    from vlv.encoder import build_encoder
    from vlv.sources import collate_items, source_from_config
    from vlv.stage1 import LocalRuntime, make_optimizer, micro_seeds, stage1_step
    cfg, _ = mini
    encoder = build_encoder(cfg.encoder, cfg.bottleneck.text_width, seed=0)
    decoder = load_decoder(cfg.bottleneck)
    lm, tokenizer = load_lm(cfg.decode)
    assert (type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id) == ('Qwen2Tokenizer', 4096, None)
    items = [item for _, item in zip(range(4), source_from_config(cfg))]
    batch = collate_items(items)
    assert batch['caption'] == [caption for _, _, caption in PHOTOS[:4]]
    optimizer, schedule = make_optimizer(encoder, cfg, torch.device('cpu'))
    queries = encoder.queries.detach().clone()
    loss, norm = stage1_step(LocalRuntime('cpu'), encoder.train(), decoder, optimizer, iter([{'pixels': batch['image']}]),
                             micro_seeds(0, 0), scheduler=schedule, encode_latents=True)
    assert np.isfinite([loss, norm]).all() and not torch.equal(queries, encoder.queries)
    captioner = Stage2Model(encoder.eval(), decoder, CaptionDecoder(lm, tokenizer, decoder.text_width, cfg.decode.psi_hidden))
    captions = captioner.caption(batch['image'][:2], max_new_tokens=cfg.decode.max_new_tokens, num_beams=cfg.decode.num_beams)
    assert len(captions) == 2 and all(0 < len(ids) <= cfg.decode.max_new_tokens for ids in captions.token_ids)


@pytest.mark.slow
def test_env_var_moves_the_preset(tmp_path, run_process, repo):
    code = "from vlv.core import get_config; import json; c = get_config('mini'); print(json.dumps([c.encoder.pretrained, c.data.path]))"
    result = run_process([sys.executable, '-c', code], cwd=tmp_path, VLV_MINIATURE=str(tmp_path / 'm'))
    assert result.returncode == 0, result.stderr
    encoder, shards = json.loads(result.stdout.strip().splitlines()[-1])
    assert encoder == str(tmp_path / 'm' / 'florence-2') and shards.startswith(str(tmp_path / 'm' / 'shards'))
