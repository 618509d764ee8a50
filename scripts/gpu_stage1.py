#!/usr/bin/env python3
"""Stage 1 of the `paper` preset at full size on one GPU, with random weights and no Hub.

The models are the paper's architectures built from the preset's sizes: Florence-2-large written as a random-init
Hub folder (`vlv.miniature.write_florence`, with Florence-2-large's 51,289-row vocabulary) that `encoder.pretrained`
points at, so the encoder loads the way a downloaded one does; SD 2.1-base's UNet, VAE and OpenCLIP-H text tower built
in memory (`bottleneck.pretrained=random`: the same classes and sizes as the released folder). The data are the
miniature's sixteen offline photos written as WebDataset shards (`vlv.miniature.write_photo_shards`) and read by the
preset's own source. The run is `vlv.stage1.train_stage1` itself (Accelerate, bf16 autocast on CUDA, fused AdamW), for
a few steps; then a checkpoint round trip (the last checkpoint strictly loaded into a fresh encoder, optimiser and
schedule: every tensor equal), a reconstruction grid through the frozen decoder, and a few steps of stage 2
(`vlv.stage2.train_stage2`) on the shards' captions: the trained encoder, psi and a random-init LM of the preset's
shape (full: Qwen2.5-3B's, over Qwen2.5's 151,643-token BPE vocabulary), trained as the preset says, for caption
tokens/s and peak memory.

Written to --out (default $OUT, else runs/gpu-stage1): gpu_stage1.json (rewritten after every phase, so a failure or a
time limit keeps what finished), log.jsonl (the run's log), recon.png and stage2_log.jsonl. Exit status 0 only when every phase passed.

    python scripts/gpu_stage1.py                 # one GPU, full size (bash scripts/gpu_stage1.sh on the device machine)
    python scripts/gpu_stage1.py --tiny          # the same code at the `mini` preset's sizes on a CPU, in seconds
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')          # nothing here may touch the Hub
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch
import torch.nn.functional as F

from vlv.core import Config, get_config, parse_overrides, save_json
from vlv.encoder import build_encoder
from vlv.miniature import PHOTOS, qwen_tokenizer, write_florence, write_photo_shards
from vlv.bottleneck import load_decoder
from vlv.worlds import train_images
from vlv.stage1 import first_images, load_stage1_checkpoint, make_optimizer, reconstruct, save_grid, train_stage1
from vlv.bench import (FLORENCE2_LARGE_VOCAB, STAGE1_FLOP_PER_IMAGE, build_on, device_name, free_memory, peak_memory_gib,
                       reset_peak_memory)

QWEN25_BPE = 151_643    # Qwen2.5's BPE tokens (its 3B model pads the embedding to 151,936 rows)
FLORENCE_SPECIALS = 6   # rows of write_florence's vocabulary besides the BPE tokens: <s> <pad> </s> <unk> <mask> + the image token
SIZES = dict(   # per size: preset, device, images per step, untimed + timed steps, data workers, shards (16 photos each), longest side
    full=dict(preset='paper', device='cuda', batch_size=64, warmup=3, steps=5, workers=4, shards=8, max_side=768,
              florence_tokens=FLORENCE2_LARGE_VOCAB - FLORENCE_SPECIALS, sample_images=4, sample_steps=10, qwen_tokens=QWEN25_BPE),
    tiny=dict(preset='mini', device='cpu', batch_size=4, warmup=1, steps=2, workers=0, shards=2, max_side=256,
              florence_tokens=4096, sample_images=2, sample_steps=2, qwen_tokens=4096),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--tiny', action='store_true', help="the `mini` preset's sizes on the CPU (what the tests run)")
    p.add_argument('--out', default=None, help="results folder (default $OUT, else runs/gpu-stage1)")
    p.add_argument('--work', default=None, help="models, shards and checkpoints (default a temporary folder, removed at the end)")
    p.add_argument('--batch-size', type=int, default=None, help="images per optimiser step (full: 64, the paper's 512 over 8 GPUs)")
    p.add_argument('--grad-accum', type=int, default=1, help="micro-batches per step")
    p.add_argument('--warmup', type=int, default=None, help="untimed steps first (full: 3)")
    p.add_argument('--steps', type=int, default=None, help="timed steps after them (full: 5)")
    p.add_argument('--workers', type=int, default=None, help="DataLoader workers (full: 4)")
    p.add_argument('--data', choices=('auto', 'shards', 'synthetic'), default='auto',
                   help="shards: the preset's WebDataset source; synthetic: a map-style dataset with cached latents; "
                        "auto: shards, else synthetic where this checkout's stage 1 cannot stream")
    p.add_argument('--compile', action='store_true', help="stage1.compile=true (torch.compile; adds minutes)")
    p.add_argument('--no-grid', action='store_true', help="skip the reconstruction grid")
    p.add_argument('-o', '--override', action='append', default=[], help="further config overrides, key=value")
    args = p.parse_args(argv)
    size = SIZES['tiny' if args.tiny else 'full']
    for name in ('batch_size', 'warmup', 'steps', 'workers'):
        if getattr(args, name) is None: setattr(args, name, size[name])
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.workers < 0 or args.grad_accum < 1:
        p.error("--batch-size, --steps and --grad-accum must be positive, --warmup and --workers not negative")
    if args.batch_size % args.grad_accum: p.error(f"--grad-accum {args.grad_accum} must divide --batch-size {args.batch_size}")
    args.size = size
    return args


def check_config(args: argparse.Namespace, work: Path) -> Config:
    "The preset with the check's locations, step counts and logging (everything else as the preset says)."
    s, total = args.size, args.warmup + args.steps
    overrides = {
        'encoder.pretrained': str(work / 'florence-2'), 'bottleneck.pretrained': 'random', 'decode.lm': 'random',
        'data.source': 'webdataset', 'data.path': str(work / 'shards' / f"photos-{{00000..{s['shards'] - 1:05d}}}.tar"),
        'run.device': s['device'], 'run.num_workers': args.workers,
        # steps + 1: the schedule's horizon lies past the last step, so the loop's own end-of-training grid does not run
        # (it comes after the round trip here); one checkpoint, after the last step
        'stage1.steps': total + 1, 'stage1.batch_size': args.batch_size, 'stage1.grad_accum': args.grad_accum,
        'stage1.warmup_steps': 1, 'stage1.checkpoint_every': total, 'stage1.sample_every': total + 1,
        'stage1.log_every': 1, 'stage1.sample_images': s['sample_images'], 'stage1.compile': args.compile,
        'bottleneck.sample_steps': s['sample_steps']}
    return get_config(s['preset'], {**overrides, **parse_overrides(args.override)})


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


class SyntheticImages(torch.utils.data.Dataset):
    "Seeded smooth random images, a map-style source (for a stage 1 that caches latents and cannot stream)."
    def __init__(self, n: int, size: int, seed: int = 0): self.n, self.size, self.seed = n, size, seed
    def __len__(self) -> int: return self.n
    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        low = torch.rand(1, 3, 8, 8, generator=g)
        return {'image': F.interpolate(low, size=(self.size, self.size), mode='bicubic', align_corners=False).clamp(0, 1)[0]}
    def keys(self) -> list[str]: return [f'synthetic{self.size}-{self.seed}-{i}' for i in range(self.n)]


class Report(dict):
    "The JSON report, rewritten after every phase; each phase's seconds and error are recorded."
    def __init__(self, path: Path, **fields):
        super().__init__(status='running', phases={}, **fields); self.path = path; self.save()
    def save(self) -> None: save_json(dict(self), self.path)
    def phase(self, name: str, fn, *args):
        print(f"[gpu_stage1] {name} ...", flush=True)
        t0 = time.perf_counter()
        try: result = fn(*args)
        except BaseException as e:
            self['phases'][name] = dict(seconds=round(time.perf_counter() - t0, 2), error=f"{type(e).__name__}: {e}"[:2000])
            self['status'] = f'failed in {name}'; self.save()
            raise
        self['phases'][name] = dict(seconds=round(time.perf_counter() - t0, 2))
        print(f"[gpu_stage1] {name}: {self['phases'][name]['seconds']} s", flush=True)
        self.save()
        return result


def write_florence_folder(cfg: Config, args: argparse.Namespace, device: torch.device, report: Report) -> None:
    "A random-init Florence-2 Hub folder where `encoder.pretrained` points (built on the GPU when there is one: faster)."
    folder = Path(cfg.encoder.pretrained)
    try:
        with torch.device(device): write_florence(folder, cfg.encoder, cfg.run.seed, args.size['florence_tokens'])
    except Exception as e:
        if device.type == 'cpu': raise
        print(f"[gpu_stage1] building Florence-2 on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_florence(folder, cfg.encoder, cfg.run.seed, args.size['florence_tokens'])
    if device.type == 'cuda': torch.cuda.empty_cache()
    report['florence_folder_bytes'] = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())


def training_data(cfg: Config, args: argparse.Namespace, report: Report):
    "The offline photos as WebDataset shards through the preset's source (a stream); synthetic map-style images where asked, or (auto) where that fails."
    report['data'] = {}
    if args.data != 'synthetic':
        try:
            shards = write_photo_shards(cfg.data.path, PHOTOS * args.size['shards'], max_side=args.size['max_side'])
            report['data'] = dict(shards=len(shards), samples=len(PHOTOS) * args.size['shards'], max_side=args.size['max_side'],
                                  bytes=sum(s.stat().st_size for s in shards))
            images, keys = train_images(cfg)
            report['data']['source'] = 'webdataset stream' if keys is None else 'webdataset (map-style)'
            return images, keys
        except Exception as e:   # a stage 1 that cannot stream yet (NotImplementedError), a photo missing from this scikit-image
            if args.data == 'shards': raise
            report['data']['fallback'] = f"the shards could not be used ({type(e).__name__}: {e}); synthetic map-style images instead"
            print(f"[gpu_stage1] {report['data']['fallback']}", flush=True)
    images = SyntheticImages(max(64, 2 * args.batch_size), cfg.data.image_size, cfg.run.seed)
    report['data']['source'] = f'synthetic map-style, {len(images)} images, cached latents'
    return images, images.keys()


def train(cfg: Config, args: argparse.Namespace, work: Path, images, keys, decoder, device: torch.device, report: Report):
    "`train_stage1` for warm-up + timed steps at the largest batch that fits (halved after running out of memory, down to 8); images/s over the timed steps, the peak memory of the whole call."
    batch, report['train_attempts'] = cfg.stage1.batch_size, []
    while True:
        run_cfg = Config.model_validate(cfg.model_dump() | {'stage1': cfg.stage1.model_dump() | {'batch_size': batch}})
        reset_peak_memory(device)
        t0, error = time.perf_counter(), None
        try:
            result = train_stage1(run_cfg, work / f'run-batch{batch}', images, keys, decoder=decoder,
                                  stop_after=args.warmup + args.steps, progress=False, cache_dir=work / 'latents')
        except torch.cuda.OutOfMemoryError as e: error = f"out of memory: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if error is None: break
        report['train_attempts'].append(dict(batch_size=batch, error=error, seconds=round(time.perf_counter() - t0, 2)))
        report.save(); free_memory(device)   # the failed run's tensors went with the exception
        smaller = batch // 2
        if smaller < max(8, args.grad_accum) or smaller % args.grad_accum:
            raise torch.cuda.OutOfMemoryError(f"stage 1 runs out of memory down to batch {batch}: {error}")
        print(f"[gpu_stage1] batch {batch}: {error}; trying batch {smaller}", flush=True)
        batch = smaller
    wall = time.perf_counter() - t0
    ends = [0.0] + [h['seconds'] for h in result.history]   # seconds since the loop's start, after each step
    step_seconds = [b - a for a, b in zip(ends, ends[1:])]
    timed = step_seconds[args.warmup:]
    images_per_s = batch * len(timed) / sum(timed)
    peak, what = peak_memory_gib(device)
    report['train'] = dict(
        steps=len(result.history), warmup_steps=args.warmup, timed_steps=len(timed), batch_size=batch,
        grad_accum=args.grad_accum, images_per_s=round(images_per_s, 3),
        seconds_per_step=round(sum(timed) / len(timed), 4), step_seconds=[round(x, 4) for x in step_seconds],
        peak_memory_gib=round(peak, 3), peak_memory=what,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if device.type == 'cuda' else None,
        model_tflops_per_s=None if args.tiny else round(images_per_s * STAGE1_FLOP_PER_IMAGE / 1e12, 1),   # vlv.bench's work per image
        losses=[h['loss'] for h in result.history], grad_norms=[h['grad_norm'] for h in result.history],
        train_stage1_seconds=round(wall, 2), loop_seconds=round(result.seconds, 2))
    if not all(map(torch.isfinite, torch.tensor(report['train']['losses']))): raise FloatingPointError(f"non-finite loss: {report['train']['losses']}")
    return result, run_cfg


def round_trip(cfg: Config, result, decoder, report: Report) -> None:
    "The last checkpoint, strictly loaded into a fresh encoder (another seed), optimiser and schedule: every tensor equal."
    checkpoint = result.checkpoint
    files = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob('*')) if f.is_file()}
    trained = {k: v.detach().cpu() for k, v in result.encoder.state_dict().items()}
    fresh = build_encoder(cfg.encoder, decoder.text_width, seed=cfg.run.seed + 1)
    differed = sum(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    optimizer, scheduler = make_optimizer(fresh, cfg, 'cpu')
    t0 = time.perf_counter()
    saved = load_stage1_checkpoint(checkpoint, fresh, optimizer, scheduler, cfg)
    load_seconds = time.perf_counter() - t0
    loaded = fresh.state_dict()
    unequal = [k for k, v in trained.items() if k not in loaded or not torch.equal(loaded[k], v)]
    trainable = [p for p in fresh.parameters() if p.requires_grad]
    report['checkpoint'] = dict(
        folder=checkpoint.name, step=saved['step'], bytes=sum(files.values()), files=files, tensors=len(trained),
        differed_before_load=differed, unequal_after_load=unequal[:20], equal=not unequal, load_seconds=round(load_seconds, 2),
        optimizer_states=len(optimizer.state), trainable_tensors=len(trainable), scheduler_step=scheduler.last_epoch)
    if unequal or saved['step'] != len(result.history) or len(optimizer.state) != len(trainable) or not differed:
        raise AssertionError(f"checkpoint round trip failed: {len(unequal)} tensors differ after loading {unequal[:5]}, "
                             f"step {saved['step']} (trained {len(result.history)}), {len(optimizer.state)} optimiser states "
                             f"for {len(trainable)} trainable tensors, {differed} tensors differed before loading")


def grid(cfg: Config, images, encoder, decoder, out: Path, report: Report) -> None:
    "Reconstructions of the first training images through the frozen decoder, as the loop's grids are made."
    originals = first_images(images, cfg.stage1.sample_images)
    b = cfg.bottleneck
    samples = reconstruct(encoder, decoder, originals, b.guidance, b.sample_steps, b.sampler, seed=0)
    save_grid(out / 'recon.png', originals, samples)
    report['grid'] = dict(images=len(originals), sample_steps=b.sample_steps, sampler=b.sampler, size=list(samples.shape[-2:]),
                          finite=bool(torch.isfinite(samples).all()))


def stage2(cfg: Config, args: argparse.Namespace, work: Path, encoder, decoder, device: torch.device, out: Path, report: Report) -> None:
    "A few stage-2 steps (`train_stage2`, the preset's `decode.train`) of the trained encoder with psi and a random-init LM of the preset's shape on the shards' captions: tokens/s and peak memory."
    from vlv.decode import CaptionDecoder, Stage2Model, load_lm
    from vlv.stage2 import train_stage2
    from vlv.worlds import caption_pairs
    total = args.warmup + args.steps
    decode = cfg.decode.model_dump() | dict(lm='random', steps=total + 1, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                            warmup_steps=1, checkpoint_every=total, log_every=1, log_with='none',
                                            gradient_checkpointing=not args.tiny)
    s2 = Config.model_validate(cfg.model_dump() | {'decode': decode, 'data': cfg.data.model_dump() | {'source': 'webdataset'}})
    free_memory(device)
    tokenizer = qwen_tokenizer(args.size['qwen_tokens'])
    lm = build_on(device, lambda: load_lm(s2.decode, seed=s2.run.seed, tokenizer=tokenizer)[0])
    model = Stage2Model(encoder, decoder, CaptionDecoder(lm, tokenizer, decoder.text_width, s2.decode.psi_hidden, seed=s2.run.seed))
    reset_peak_memory(device)
    history = train_stage2(model, caption_pairs(s2), s2, work / 'stage2', resume=False, stop_after=total, progress=False)
    ends = [0.0] + [h['seconds'] for h in history]
    seconds = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    tokens = [h['tokens'] for h in history][args.warmup:]
    peak, what = peak_memory_gib(device)
    report['stage2'] = dict(
        steps=len(history), timed_steps=len(seconds), batch_size=args.batch_size, grad_accum=args.grad_accum, train=s2.decode.train,
        gradient_checkpointing=s2.decode.gradient_checkpointing, lm_parameters=count(lm), vocabulary=len(tokenizer),
        tokens_per_s=round(sum(tokens) / sum(seconds), 1), images_per_s=round(args.batch_size * len(seconds) / sum(seconds), 3),
        seconds_per_step=round(sum(seconds) / len(seconds), 4), peak_memory_gib=round(peak, 3), peak_memory=what,
        losses=[h['loss'] for h in history])
    shutil.copy(work / 'stage2' / 'log.jsonl', out / 'stage2_log.jsonl')
    if not all(map(torch.isfinite, torch.tensor(report['stage2']['losses']))): raise FloatingPointError(f"non-finite stage-2 loss: {report['stage2']['losses']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or os.environ.get('OUT') or 'runs/gpu-stage1'); out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix='vlv-gpu-stage1-'))
    device = torch.device(args.size['device'])
    import transformers, diffusers, accelerate
    report = Report(out / 'gpu_stage1.json', size='tiny' if args.tiny else 'full', argv=sys.argv[1:] if argv is None else list(argv),
                    device=device_name(device) if device.type == 'cpu' or torch.cuda.is_available() else 'no CUDA device',
                    versions=dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                                  transformers=transformers.__version__, diffusers=diffusers.__version__,
                                  accelerate=accelerate.__version__))
    t_start = time.perf_counter()
    try:
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the full-size check needs one GPU (use --tiny on a CPU)")
        cfg = check_config(args, work)
        report['config'] = dict(preset=cfg.preset, encoder_image_size=cfg.encoder.image_size,
                                decoder_image_size=cfg.bottleneck.image_size, num_queries=cfg.encoder.num_queries,
                                mixed_precision=cfg.stage1.mixed_precision, compile=cfg.stage1.compile,
                                train_vision=cfg.encoder.train_vision, overrides=args.override)
        report.phase('write_florence', write_florence_folder, cfg, args, device, report)
        decoder = report.phase('build_decoder', build_on, device, lambda: load_decoder(cfg.bottleneck))
        report['parameters'] = dict(unet=count(decoder.unet), vae=count(decoder.vae), text_encoder=count(decoder.text_encoder))
        images, keys = report.phase('data', training_data, cfg, args, report)
        result, cfg = report.phase('train', train, cfg, args, work, images, keys, decoder, device, report)
        encoder = result.encoder
        report['parameters'] |= dict(encoder=count(encoder), encoder_trainable=count(encoder, trainable=True),
                                     florence2=count(encoder.florence),
                                     **{f'encoder_{k}': sum(p.numel() for p in v) for k, v in encoder.parts().items()},
                                     florence_vocab=encoder.language.get_input_embeddings().num_embeddings)
        if (run_log := result.folder / 'log.jsonl').exists(): shutil.copy(run_log, out / 'log.jsonl')
        report.phase('checkpoint_round_trip', round_trip, cfg, result, decoder, report)
        if not args.no_grid: report.phase('grid', grid, cfg, images, encoder, decoder, out, report)
        if report['data'].get('shards'):   # captions to train on (the synthetic images have none); last: it trains the encoder on
            report.phase('stage2', stage2, cfg, args, work, encoder, decoder, device, out, report)
        report['status'] = 'ok'
    except BaseException as e:
        traceback.print_exc()
        report['error'] = f"{type(e).__name__}: {e}"[:2000]
        if report['status'] == 'running': report['status'] = 'failed'
    finally:
        report['seconds'] = round(time.perf_counter() - t_start, 2)
        report.save()
        if not args.work: shutil.rmtree(work, ignore_errors=True)
    t = report.get('train', {})
    s2 = report.get('stage2', {})
    print(f"[gpu_stage1] {report['status']} in {report['seconds']} s: {t.get('images_per_s')} images/s, "
          f"{t.get('seconds_per_step')} s/step, peak {t.get('peak_memory_gib')} GiB, checkpoint round trip "
          f"{report.get('checkpoint', {}).get('equal')}; stage 2 {s2.get('tokens_per_s')} tokens/s, peak {s2.get('peak_memory_gib')} GiB; "
          f"report {report.path}", flush=True)
    return 0 if report['status'] == 'ok' else 1


if __name__ == '__main__':
    sys.exit(main())
