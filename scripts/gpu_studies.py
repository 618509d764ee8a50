"""The comparisons of `vlv seeds` (nbs/04's queries ablation, nbs/06's stage-2 studies) trained on one GPU into the
study caches the notebooks read, so that nbs/04 and nbs/06, rerun per seed with the comparisons on, find them done.

Each seed's runs are exactly those of `vlv seeds` (overrides `experiments.studies=true run.seed=S`, the jobs of
`vlv.stage1.ablation_configs` and `vlv.experiments.stage2_study_jobs`), trained by the package's own `_study_worker`
in a pool of worker processes; the trackers are off (`log_with` is not part of a study's cache key). Each finished run
writes OUT/seed-S/{short-runs,studies}/<spec>/summary.json; copy those folders into runs/NAME/seed-S/.

    python scripts/gpu_studies.py --encoders DIR --out OUT [--seeds 0 1 2] [--workers 14] [--preset toy] [--only 1 2]
      DIR/seed-S: the seed's stage-1 encoder (runs/NAME/seed-S/stage1/encoder), for the stage-2 studies
"""
import argparse, json, multiprocessing, time, traceback
from concurrent.futures import ProcessPoolExecutor, TimeoutError, as_completed
from pathlib import Path

from vlv.core import get_config
from vlv.encoder import load_encoder
from vlv.experiments import _call_with_one_thread, _study_worker, ablation_configs, spec_name, stage2_study_jobs, study_spec


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--encoders', type=Path, required=True)
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--workers', type=int, default=14)
    p.add_argument('--preset', default='toy')
    p.add_argument('--only', type=int, nargs='+', default=[1, 2], help='which studies: 1 (queries ablation), 2 (stage-2 studies)')
    p.add_argument('--overrides', default='', help='extra overrides of every seed (tests: tiny sizes)')
    p.add_argument('--limit', type=float, default=420, help='seconds: then the unfinished runs are stopped (the finished ones are kept)')
    args = p.parse_args()

    quiet = 'stage1.log_with=none decode.log_with=none'
    jobs, names = {}, {}   # spec name -> _study_worker arguments; spec name -> 'seed S: row'
    for s in args.seeds:
        overrides = f'experiments.studies=true {args.overrides} run.seed={s}'.replace('  ', ' ')   # as `vlv.seeds.seed_overrides` writes it
        cfg = get_config(args.preset, f'{overrides} {quiet}')
        out, encoder = args.out / f'seed-{s}', args.encoders / f'seed-{s}'
        if 1 in args.only:   # nbs/04: every row but the one that is the main run
            grid_tokens = load_encoder(encoder, cfg.encoder).grid_tokens
            configs, main_twin = ablation_configs(cfg, args.preset, f'{overrides} {quiet}', grid_tokens)
            scoring = dict(n_scenes=cfg.stage1.ablation_scenes, guidance=1.0)
            for row, c in configs.items():
                if row in main_twin: continue
                key = spec_name(study_spec(1, c, **scoring))
                jobs[key], names[key] = (1, c, str(out / 'short-runs'), None, scoring), f'seed {s}: {row}'
        if 2 in args.only:   # nbs/06: the caption budget, Table 7, Table 4 right
            for row, (c, enc) in stage2_study_jobs(args.preset, f'{overrides} {quiet}', encoder).items():
                key = spec_name(study_spec(2, c, enc))
                if key not in jobs: jobs[key], names[key] = (2, c, str(out / 'studies'), None if enc is None else str(enc), {}), f'seed {s}: {row}'
    light = lambda key: jobs[key][1].decode.train in ('psi', 'psi+lm')   # frozen encoder, cached conditioning: quick
    order = sorted(jobs, key=lambda key: (jobs[key][0] != 1, light(key)))   # the long stage-1 runs first, the quick ones last
    jobs, names = {k: jobs[k] for k in order}, {k: names[k] for k in order}
    print(f"{len(jobs)} runs on {args.workers} workers:", *names.values(), sep='\n  ', flush=True)

    t0, report = time.time(), {}
    args.out.mkdir(parents=True, exist_ok=True)
    pool = ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=multiprocessing.get_context('spawn'))
    futures = {pool.submit(_call_with_one_thread, _study_worker, job): key for key, job in jobs.items()}
    try:
        for future in as_completed(futures, timeout=args.limit):
            key = futures[future]
            try:
                r = future.result()
                report[names[key]] = dict(spec=key, seconds=r['seconds'], device=r.get('device'),
                                          scores={k: v['object_f1'] for k, v in r['scores'].items()} if 'scores' in r else
                                          dict(attribute=r['attribute'], held_out=r['held_out']['attribute']))
            except Exception:
                report[names[key]] = dict(spec=key, error=traceback.format_exc()[-2000:])
            print(f"{time.time() - t0:6.0f} s  {names[key]}: {report[names[key]]}", flush=True)
            (args.out / 'gpu_studies.json').write_text(json.dumps(report, indent=1))
    except TimeoutError:
        print(f"--limit {args.limit:g} s: stopping {sum(not f.done() for f in futures)} unfinished runs", flush=True)
        for process in list(pool._processes.values()): process.kill()   # this pool's workers only
    pool.shutdown(wait=False, cancel_futures=True)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == '__main__': main()   # spawned workers import this file
