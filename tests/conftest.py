"""Fixtures shared by the test files: one torch thread, the tiny config, the tiny decoder and captioner, child processes.

Tests marked `slow` start other programs (subprocesses, torchrun, process pools, Java) or sample with the shipped
teacher; `scripts/test.sh` runs them all, `pytest -m 'not slow' tests` leaves them out while iterating.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]   # the checkout whose vlv every test (and every child process) imports

# A random-init decoder with the SD block structure at tiny widths (seconds per stage-1 run) ...
TINY_BOTTLENECK = ("bottleneck.pretrained=random bottleneck.vae_block_channels=[8,16,32,32] bottleneck.text_width=32 "
                   "bottleneck.text_layers=1 bottleneck.text_heads=2 bottleneck.unet_block_channels=[8,16,32,32] "
                   "bottleneck.unet_layers_per_block=1 bottleneck.unet_attention_head_dim=[1,2,4,4] bottleneck.sample_steps=2")
# ... a random-init Qwen2 caption LM at tiny widths ...
TINY_LM = ('decode.lm=random decode.lm_width=32 decode.lm_layers=2 decode.lm_heads=4 decode.lm_kv_heads=2 '
           'decode.lm_intermediate=64')
# ... and a small Shapes world.
TINY_DATA = 'data.n_train=32 data.n_test=8 data.n_heldout_test=4'


@pytest.fixture(scope='session', autouse=True)
def one_torch_thread():
    "Tiny models run fastest on one thread; several stall badly when other processes share the CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def repo() -> Path:
    "The root of this checkout."
    return REPO


@pytest.fixture(scope='session')
def tiny_overrides() -> str:
    "The overrides of the tiny config, 'key=value ...' (for `-o` on a command line)."
    return f'{TINY_BOTTLENECK} {TINY_LM} {TINY_DATA} run.device=cpu'


@pytest.fixture(scope='session')
def tiny_cfg(tiny_overrides) -> Callable:
    "`tiny_cfg(*overrides)`: the smoke preset with the tiny decoder, LM and world on the CPU, plus `overrides` ('key=value ...')."
    from vlv.core import get_config
    return lambda *overrides: get_config('smoke', ' '.join([tiny_overrides, *overrides]))


@pytest.fixture(scope='module')
def tiny_decoder(tiny_cfg):
    "The frozen decoder of `tiny_cfg()` (the Shapes words' tokenizer); one per test file, as some tests change it in place."
    from vlv.worlds import load_bottleneck
    return load_bottleneck(tiny_cfg())


@pytest.fixture(scope='session')
def make_captioner(tiny_cfg) -> Callable:
    "`make_captioner(text_width, cfg=None, seed=0)`: an untrained caption decoder (LM of `cfg.decode`, default `tiny_cfg()`)."
    from vlv.decode import CaptionDecoder, load_lm
    from vlv.worlds import caption_tokenizer
    def make(text_width: int, cfg=None, seed: int = 0):
        cfg = cfg if cfg is not None else tiny_cfg()
        # API: a random-init LM takes the world's tokenizer from outside (vlv.worlds.caption_tokenizer)
        lm, tokenizer = load_lm(cfg.decode, seed=seed, tokenizer=caption_tokenizer(cfg))
        return CaptionDecoder(lm, tokenizer, text_width, seed=seed)
    return make


def child_env(**extra: str) -> dict[str, str]:
    "Environment of a child process: it imports this checkout's vlv and runs torch on one thread."
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': path, **extra}


@pytest.fixture(scope='session')
def subprocess_env() -> Callable[..., dict[str, str]]:
    "`subprocess_env(**extra)`: the environment for a child process (this checkout's vlv, one thread, plus `extra`)."
    return child_env


@pytest.fixture(scope='session')
def run_process() -> Callable[..., subprocess.CompletedProcess]:
    "`run_process(argv, cwd, timeout=240, **env)`: run a program to the end in `subprocess_env`, capturing its text output."
    def run(argv, cwd, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], cwd=cwd, env=child_env(**env), capture_output=True, text=True,
                              timeout=timeout)
    return run


@pytest.fixture(scope='session')
def miniature(tmp_path_factory) -> Path:
    "The miniature of the paper path (`vlv.miniature`: tiny random-init models in the Hub's layout, shards of 16 photos), written once."
    from vlv.miniature import ensure_miniature, miniature_config
    return ensure_miniature(miniature_config(tmp_path_factory.mktemp('mini') / 'miniature'))


PHOTO_NAMES = ('astronaut', 'coffee', 'chelsea', 'rocket', 'camera', 'immunohistochemistry', 'coins', 'moon', 'cat')


@pytest.fixture(scope='session')
def photo_records() -> list[dict]:
    """Records {'key', 'image': PIL image, 'caption', 'meta'} of 11 real photos that install offline (scikit-image's and
    scikit-learn's samples), 96 pixels wide, with LAION-like metadata: what `vlv.sources.write_shards` writes as shards."""
    skdata, datasets = pytest.importorskip('skimage.data'), pytest.importorskip('sklearn.datasets')
    from PIL import Image
    images = {name: Image.fromarray(getattr(skdata, name)()) for name in PHOTO_NAMES}
    samples = datasets.load_sample_images()
    images.update({Path(f).stem: Image.fromarray(a) for f, a in zip(samples.filenames, samples.images)})
    return [{'key': f'{i:03d}-{name}', 'image': image.resize((96, round(96 * image.height / image.width))),
             'caption': f'a photo of the {name}', 'meta': {'pwatermark': 0.05, 'aesthetic': 5.5}}
            for i, (name, image) in enumerate(images.items())]


GPU_LIKE = '''"""`vlv ARGS` in a process that Accelerate takes for a GPU's: Accelerate applies FSDP only on GPUs, so this CPU
process (gloo) claims the distributed type of GPUs and Accelerate's FSDP2 path runs as on a node of GPUs."""
import os, sys
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: ('gloo', DistributedType.MULTI_GPU)
torch.distributed.init_process_group('gloo')   # what Accelerate does for GPUs, here on the CPU
os.environ['ACCELERATE_TORCH_DEVICE'] = 'cpu'
torch.set_num_threads(1)
from vlv.cli import main
code = main(sys.argv[1:])
torch.distributed.barrier(); torch.distributed.destroy_process_group()   # no gloo thread left at exit
sys.exit(code)
'''


@pytest.fixture(scope='session')
def fsdp_launch(tmp_path_factory) -> Callable[[int], list]:
    """`fsdp_launch(processes)`: the start of an argv that runs `vlv ARGS...` under `accelerate launch` with the shipped
    fsdp.yaml (fp32) on CPU processes that Accelerate takes for GPUs' (it applies FSDP only there): its FSDP2 path over gloo."""
    import yaml
    from vlv.launch import accelerate_config
    folder = tmp_path_factory.mktemp('fsdp-launch')
    (folder / 'gpu_like.py').write_text(GPU_LIKE)
    def argv(processes: int = 2) -> list:
        config = yaml.safe_load(accelerate_config('fsdp').read_text())
        config.update(num_processes=processes, mixed_precision='no', use_cpu=True)
        path = folder / f'fsdp-{processes}.yaml'; path.write_text(yaml.safe_dump(config))
        return [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', path, '--main_process_port', '0',
                folder / 'gpu_like.py']
    return argv
