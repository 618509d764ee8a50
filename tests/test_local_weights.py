"""Local copies of the weights, as the README describes them: the `paper` preset's loaders (here under `mini`, its sizes) (`encoder.pretrained`,
`bottleneck.pretrained`, `decode.lm`) and the CLIP of `vlv.metrics.clip_score` take a folder in the Hub's layout, or a
Hub id found in the cache under HF_HOME with HF_HUB_OFFLINE=1. The miniature's random-init folders stand in for the
real weights; a child process gets the environment a user would set."""
from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

REVISION = '0' * 40
PARTS = {'encoder.pretrained': 'florence-2', 'bottleneck.pretrained': 'stable-diffusion-2-1-base', 'decode.lm': 'qwen2.5'}

CHILD = textwrap.dedent('''
    import json, sys
    import huggingface_hub.constants as hub
    import torch
    from vlv.core import get_config
    from vlv.bottleneck import load_decoder
    from vlv.decode import load_lm
    from vlv.encoder import build_encoder
    from vlv.metrics import clip_score
    assert hub.HF_HUB_OFFLINE, 'HF_HUB_OFFLINE=1 did not reach huggingface_hub'
    folders, ids, clip_folder = json.loads(sys.argv[1])
    for overrides in (folders, ids):
        # the mini preset: the paper's loaders with the miniature's sizes (the paper preset's sizes are Florence-2-large's,
        # and a pretrained folder that contradicts a size field is refused: tests/test_encoder.py)
        cfg = get_config('mini', [f'{k}={v}' for k, v in overrides.items()])   # -o KEY=VALUE ...
        decoder = load_decoder(cfg.bottleneck)
        encoder = build_encoder(cfg.encoder, decoder.text_width)
        lm, tokenizer = load_lm(cfg.decode)
        z = encoder(torch.rand(1, 3, 64, 64))
        print(type(encoder.florence).__name__, type(decoder.unet).__name__, type(lm).__name__, tuple(z.shape))
    images = torch.rand(2, 3, 40, 40)
    print(clip_score(images, ['a cat', 'a dog'], model=clip_folder, device='cpu') >= 0,
          clip_score(images, ['a cat', 'a dog'], model='local/clip', device='cpu') >= 0)
''')


def write_clip(folder, tokenizer_folder) -> None:
    "A tiny random-init CLIP (model and processor) in the Hub's layout, with the SD 2.x BPE tokenizer."
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    CLIPProcessor(CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}),
                  CLIPTokenizer.from_pretrained(tokenizer_folder)).save_pretrained(folder)


def cache(hub, repo_id: str, folder) -> None:
    "Put `folder` into the Hub cache `hub` as repository `repo_id` (the layout `hf download` writes)."
    root = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / 'snapshots' / REVISION)
    (root / 'refs').mkdir(); (root / 'refs' / 'main').write_text(REVISION)


@pytest.mark.slow
def test_paper_loaders_read_local_folders_and_the_offline_cache(miniature, tmp_path, run_process, repo):
    import json
    hf_home, clip = tmp_path / 'hf', tmp_path / 'clip-vit-large-patch14'
    folders = {key: str(miniature / part) for key, part in PARTS.items()}
    ids = {key: f'local/{part}' for key, part in PARTS.items()}
    env = dict(HF_HOME=str(hf_home), HF_HUB_OFFLINE='1')
    argv = [sys.executable, '-c', CHILD, json.dumps([folders, ids, str(clip)])]
    write_clip(clip, miniature / PARTS['bottleneck.pretrained'] / 'tokenizer')
    for key, part in PARTS.items(): cache(hf_home / 'hub', ids[key], miniature / part)
    cache(hf_home / 'hub', 'local/clip', clip)
    done = run_process(argv, cwd=tmp_path, **env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3:] == ['Florence2ForConditionalGeneration UNet2DConditionModel Qwen2ForCausalLM (1, 77, 32)'] * 2 + ['True True']
    # without the cache, the same Hub ids fail offline with a message that names the key and the folder option
    shutil.rmtree(hf_home / 'hub' / 'models--local--qwen2.5')
    failed = run_process(argv, cwd=tmp_path, **env)
    assert failed.returncode != 0 and "decode.lm='local/qwen2.5'" in failed.stderr and '-o decode.lm=/path/to/folder' in failed.stderr
