"""Issue 20: how often does the toy preset's query readout stall, and which fair lever removes the stall?

Stage 1 of the toy preset (the library's `stage1_study`: train, then score held-in and held-out reconstructions with
the oracle) for several seeds and variants, run as parallel processes (one GPU shared, or CPU threads), fp32 everywhere
so that a GPU run follows the CPU recipe. Jobs go seed by seed, so a run stopped at its time budget still has every
variant for the first seeds. Each job writes OUT/NAME.json when it finishes; a job stopped at the budget leaves its
loss curve (log.jsonl), which the summary reads. OUT/summary.json holds every job, finished or not.

    python scripts/probes/stall_sweep.py --seeds 0 1 2 3 --workers 8 --budget 300 --out runs/probes/stall
    python scripts/probes/stall_sweep.py --tiny --seeds 0 --variants base --workers 1   # seconds, on a CPU
"""
import argparse, json, multiprocessing as mp, os, shutil, sys, time, traceback
from pathlib import Path

VARIANTS = {   # name -> overrides on top of the toy preset (g = 2, 16 queries, 3,000 steps)
    'base': '',
    'g3': 'encoder.cross_attention_gain=3',
    'qlr10': 'stage1.query_lr=5e-3',
    's4000': 'stage1.steps=4000',
}
TINY = 'stage1.steps=12 stage1.batch_size=4 stage1.log_every=2 stage1.checkpoint_every=100 stage1.sample_every=100'


def job(name: str, overrides: str, out: str, n_scenes: int, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    from vlv.core import get_config
    from vlv.experiments import stage1_study
    cfg = get_config('toy', f"stage1.log_with=none stage1.mixed_precision=no {overrides}")
    t0 = time.time()
    try:
        r = stage1_study(cfg, Path(out) / name, n_scenes=n_scenes, guidance=2.0)
        del r['history']   # the summary reads every job's curve from its log.jsonl (`partial_curve`)
    except Exception as e:
        r = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    r.update(name=name, overrides=overrides, wall=round(time.time() - t0, 1), device=str(cfg.run.device),
             cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    Path(out, f'{name}.json').write_text(json.dumps(r, indent=1, default=str))
    print(name, {k: r.get(k) for k in ('final_loss', 'attribute', 'object_f1', 'held_out', 'wall', 'error')}, flush=True)


def partial_curve(folder: Path) -> dict:
    "The loss every 100 steps from a job's log.jsonl (also for a job stopped at the budget)."
    log = folder / 'stage1' / 'log.jsonl'
    if not log.exists(): return {}
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    return {r['step']: round(r['loss'], 4) for r in rows if 'loss' in r and r['step'] % 100 == 0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3])
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--late', nargs='*', default=[], choices=list(VARIANTS), help="variants queued after every seed of the others")
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--threads', type=int, default=1, help="torch threads per job")
    p.add_argument('--budget', type=float, default=600, help="seconds; jobs still running then are stopped")
    p.add_argument('--n-scenes', type=int, default=200)
    p.add_argument('--out', default='runs/probes/stall')
    p.add_argument('--tiny', action='store_true', help="a dozen steps, a few scenes: checks the script")
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    order = [[v for v in a.variants if v not in a.late], [v for v in a.late if v in a.variants]]
    jobs = [(f'{v}_s{s}', f"run.seed={s} {VARIANTS[v]} {TINY if a.tiny else ''}".strip())
            for group in order for s in a.seeds for v in group]
    n_scenes = 4 if a.tiny else a.n_scenes
    ctx, t0, running, queue = mp.get_context('spawn'), time.time(), {}, list(jobs)
    while queue or running:
        for name, proc in list(running.items()):
            if not proc.is_alive(): proc.join(); del running[name]
        while queue and len(running) < a.workers and time.time() - t0 < a.budget:
            name, ov = queue.pop(0)
            proc = ctx.Process(target=job, args=(name, ov, str(out), n_scenes, a.threads)); proc.start(); running[name] = proc
        if time.time() - t0 >= a.budget:
            for proc in running.values(): proc.terminate()
            for proc in running.values(): proc.join()
            break
        time.sleep(2)
    rows = []
    for name, ov in jobs:
        f = out / f'{name}.json'
        row = json.loads(f.read_text()) if f.exists() else dict(name=name, overrides=ov, unfinished=True)
        rows.append(row | dict(loss_at=partial_curve(out / name)))
    (out / 'summary.json').write_text(json.dumps(dict(seconds=round(time.time() - t0, 1), jobs=rows), indent=1))
    for r in rows:
        print(r['name'], 'unfinished' if r.get('unfinished') else
              (r.get('error', '')[:60] or f"loss {r['final_loss']:.4f} attr {r['attribute']:.3f} F1 {r['object_f1']:.3f} "
               f"held-out F1 {r['held_out']['object_f1']:.3f} {r['wall']:.0f}s"), r.get('loss_at'))


if __name__ == '__main__':
    main()
