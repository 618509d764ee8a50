"""Stage 1 under the shipped Accelerate configs on this CPU (nbs/04_stage1): DeepSpeed ZeRO-2 through `accelerate launch`
(one process: DeepSpeed's CPU accelerator), resumed; FSDP2 sharding of the miniature's encoder by the layer classes that
fsdp.yaml names, on 2 CPU processes with torch's `fully_shard` (Accelerate applies FSDP only on GPUs); and the launches
Accelerate cannot honour here, refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from vlv.core import get_config
from vlv.launch import deepspeed_settings
from vlv.launch import accelerate_config

MINI_DATA = ['-o', 'run.device=auto']   # DeepSpeed brings its own CPU accelerator: the run must not ask Accelerate for the CPU


def cpu_config(kind: str, folder: Path, processes: int, **changes) -> Path:
    "The shipped Accelerate config `kind` for this CPU: `processes` processes, fp32, and `changes`."
    config = yaml.safe_load(accelerate_config(kind).read_text())
    config.update(num_processes=processes, mixed_precision='no', **changes)
    path = folder / f'{kind}.yaml'; path.write_text(yaml.safe_dump(config)); return path


def fake_accelerator(processes: int = 2, **ds):
    return SimpleNamespace(num_processes=processes, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=dict(ds))))


def test_deepspeed_gets_the_micro_batch_and_must_agree_with_vlv():
    cfg = get_config('mini', 'stage1.batch_size=8 stage1.grad_clip=0.5')
    acc = fake_accelerator(2, gradient_accumulation_steps='auto', gradient_clipping='auto', train_micro_batch_size_per_gpu='auto')
    deepspeed_settings(acc, cfg)
    assert acc.state.deepspeed_plugin.deepspeed_config == dict(gradient_accumulation_steps=1, gradient_clipping=0.5,
                                                               train_micro_batch_size_per_gpu=4, train_batch_size=8)
    shipped = yaml.safe_load(accelerate_config('deepspeed-zero2').read_text())['deepspeed_config']
    deepspeed_settings(fake_accelerator(8, gradient_accumulation_steps=shipped['gradient_accumulation_steps'],
                                        gradient_clipping=shipped['gradient_clipping']), get_config('paper'))   # agrees
    with pytest.raises(ValueError, match=r'gradient_clipping=1.0 but stage1.grad_clip=0.5'):
        deepspeed_settings(fake_accelerator(2, gradient_clipping=1.0), cfg)
    with pytest.raises(ValueError, match=r'stage1.grad_accum=2'):
        deepspeed_settings(fake_accelerator(2), get_config('mini', 'stage1.grad_accum=2'))
    deepspeed_settings(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), cfg)   # no DeepSpeed: nothing to do


def test_fsdp_wraps_layer_classes_the_models_have(mini_encoder):
    """fsdp.yaml names the layers of both stages: stage 1 shards those of the encoder (Florence-2), stage 2 also Qwen2's;
    `fsdp_settings` keeps the classes the model at hand has, and refuses a config naming none of them."""
    from transformers.models.qwen2 import modeling_qwen2
    from vlv.launch import fsdp_settings
    names = yaml.safe_load(accelerate_config('fsdp').read_text())['fsdp_config']['fsdp_transformer_layer_cls_to_wrap'].split(',')
    present = {type(m).__name__ for m in mini_encoder.modules()}
    assert set(names) - present == {'Qwen2DecoderLayer'} and hasattr(modeling_qwen2, 'Qwen2DecoderLayer')
    plugin = SimpleNamespace(fsdp_version=2, transformer_cls_names_to_wrap=names, ignored_modules=None)
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name='FSDP'), state=SimpleNamespace(fsdp_plugin=plugin))
    fsdp_settings(acc, mini_encoder)
    assert plugin.transformer_cls_names_to_wrap == [n for n in names if n != 'Qwen2DecoderLayer']
    plugin.transformer_cls_names_to_wrap = ['Qwen2DecoderLayer']
    with pytest.raises(ValueError, match='none of the FSDP config'): fsdp_settings(acc, mini_encoder)


@pytest.fixture(scope='module')
def mini_encoder(mini_world):
    from vlv.encoder import build_encoder
    from vlv.miniature import miniature_config
    from vlv.worlds import load_bottleneck
    cfg = miniature_config(mini_world)   # not get_config('mini'): vlv.core read VLV_MINIATURE when it was imported
    return build_encoder(cfg.encoder, load_bottleneck(cfg).text_width, seed=0)


@pytest.fixture(scope='module')
def mini_world(tmp_path_factory, monkeymodule):
    "The miniature's models and shards in a temporary folder (VLV_MINIATURE), for this process and its children."
    from vlv.miniature import ensure_miniature, miniature_config
    folder = tmp_path_factory.mktemp('miniature')
    monkeymodule.setenv('VLV_MINIATURE', str(folder))
    return ensure_miniature(miniature_config(folder))


@pytest.fixture(scope='module')
def monkeymodule():
    with pytest.MonkeyPatch.context() as patch: yield patch


def launch(config: Path) -> list[str]:
    return [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(config), '--main_process_port', '0']


def log_losses(run_dir: Path) -> list[float]:
    return [json.loads(l)['loss'] for l in (run_dir / 'stage1' / 'log.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_deepspeed_zero2_trains_and_refuses_an_inexact_resume(mini_world, tmp_path, run_process):
    """`accelerate launch` with the shipped ZeRO-2 config (one CPU process) trains 2 steps with a checkpoint of complete
    weights; resuming it is refused with the reason (ZeRO's optimizer state is per rank), not done inexactly."""
    pytest.importorskip('deepspeed')
    config = cpu_config('deepspeed-zero2', tmp_path, 1)
    argv = [*launch(config), '-m', 'vlv.cli', 'stage1', '--preset', 'mini', '--no-progress', '--run-dir', 'run', *MINI_DATA]
    first = run_process([*argv, '--stop-after', '2'], tmp_path, VLV_MINIATURE=str(mini_world))
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / 'run' / 'stage1' / 'checkpoints' / 'step-0000002' / 'state.json').read_text())
    assert state['distributed'] == 'DEEPSPEED' and len(log_losses(tmp_path / 'run')) == 2
    again = run_process([*argv, '--resume'], tmp_path, VLV_MINIATURE=str(mini_world))
    assert again.returncode == 1 and "a DeepSpeed run's checkpoint holds complete weights" in again.stderr, again.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['fsdp', 'deepspeed-zero2'])
def test_a_config_accelerate_cannot_apply_here_is_refused(kind, mini_world, tmp_path, run_process):
    "Without GPUs Accelerate falls back to plain CPU processes: the run says so instead of training without FSDP / DeepSpeed."
    if kind != 'fsdp': pytest.importorskip('deepspeed')
    config = cpu_config(kind, tmp_path, 2, use_cpu=kind == 'fsdp')
    result = run_process([*launch(config), '-m', 'vlv.cli', 'stage1', '--preset', 'mini', '--no-progress', '--run-dir', 'run',
                          '-o', f"run.device={'cpu' if kind == 'fsdp' else 'auto'}"], tmp_path, VLV_MINIATURE=str(mini_world))
    assert result.returncode != 0 and f"launched with a {'FSDP' if kind == 'fsdp' else 'DeepSpeed'} config" in result.stderr
    assert not (tmp_path / 'run' / 'stage1' / 'checkpoints').exists()


FSDP_STEP = '''
import sys, torch, torch.distributed as dist, yaml
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from vlv.core import get_config, seeded
from vlv.encoder import build_encoder
from vlv.launch import accelerate_config
from vlv.stage1 import stage1_loss
from vlv.worlds import load_bottleneck
torch.set_num_threads(1)
dist.init_process_group('gloo'); rank, world = dist.get_rank(), dist.get_world_size()
cfg = get_config('mini')   # eval() below: no dropout (a size or dropout field over the pretrained miniature would be refused)
decoder = load_bottleneck(cfg)
images = torch.rand(2 * world, 3, 64, 64, generator=torch.Generator().manual_seed(0))
def trained(shard: bool) -> dict:
    encoder = build_encoder(cfg.encoder, decoder.text_width, seed=0).eval()   # no dropout: the runs draw alike
    if shard:
        classes = yaml.safe_load(accelerate_config('fsdp').read_text())['fsdp_config']['fsdp_transformer_layer_cls_to_wrap'].split(',')
        for module in encoder.modules():
            if type(module).__name__ in classes: fully_shard(module)
        fully_shard(encoder)
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=1.0)   # weights - gradients
    ranks = [rank] if shard else range(world)   # the sharded run: this rank's 2 images; the reference: every rank's, averaged
    loss = sum(stage1_loss(encoder, decoder, {'pixels': images[2 * r:2 * r + 2]}, seeded(0, 0, r, 2), 'cpu', encode_latents=True)
               for r in ranks) / len(ranks)
    loss.backward(); optimizer.step()
    if not shard: return {k: v.detach() for k, v in encoder.state_dict().items()}
    return get_model_state_dict(encoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
sharded, reference = trained(True), trained(False)
if rank == 0:
    assert sharded.keys() == reference.keys(), sharded.keys() ^ reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f'{k}: {m}')
    print('FSDP step == one-process step on', len(reference), 'tensors')
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp2_sharding_of_the_encoder_on_two_cpu_processes(mini_world, tmp_path, run_process):
    """One stage-1 step of the miniature's encoder sharded with FSDP2 (`fully_shard` on the classes fsdp.yaml wraps, gloo)
    equals the same step in one process on both processes' images."""
    script = tmp_path / 'fsdp_step.py'; script.write_text(FSDP_STEP)
    result = run_process([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', script],
                         tmp_path, VLV_MINIATURE=str(mini_world))
    assert result.returncode == 0 and 'FSDP step == one-process step' in result.stdout, (result.stdout + result.stderr)[-3000:]
