"""Issue 20 item 5: the queries ablation of a seeds folder, one row per run and seed, with the loss of steps
2,000-2,500 and 2,500-3,000 from each run's log.jsonl (does it still fall?), then mean ± std over the seeds.
Reads what nbs/04 wrote: seed-S/stage1_metrics.json ('queries') and the cached runs in seed-S/short-runs.
Usage: python scripts/probes/queries_table.py runs/toy-seeds-studies 0 1 2"""
import json, sys
from pathlib import Path
from vlv.seeds import mean_std_text, seed_stats


def window(log: Path, a: int, b: int) -> float:
    "Mean training loss of the log lines with a < step <= b."
    xs = [x['loss'] for x in map(json.loads, log.read_text().splitlines()) if a < x['step'] <= b]
    return sum(xs) / len(xs)


def run_log(seed_dir: Path, row: dict) -> Path:
    "The log.jsonl of a row: the main run's, or the cached short run whose spec is the row's."
    if row.get('main_run'): return seed_dir / 'stage1' / 'log.jsonl'
    return next(p.parent / 'stage1' / 'log.jsonl' for p in (seed_dir / 'short-runs').glob('*/summary.json')
                if json.loads(p.read_text())['spec'] == row['spec'])


def main():
    folder, seeds = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    scores = {}   # seed -> {'queries': row -> column -> value}: the shape `seed_stats` gathers over seeds
    for s in seeds:
        for name, r in json.loads((folder / f'seed-{s}' / 'stage1_metrics.json').read_text())['queries'].items():
            log = run_log(folder / f'seed-{s}', r)
            print(f"| {name} | {s} | {window(log, 2000, 2500):.4f} | {window(log, 2500, 3000):.4f} | {r['attribute']:.3f} | {r['exact']:.2f} | "
                  f"{r['object_f1']:.3f} | {r['held_out']['attribute']:.3f} | {r['held_out']['exact']:.2f} | {r['held_out']['object_f1']:.3f} |")
            scores.setdefault(s, {}).setdefault('queries', {})[name] = {
                f'{split} {k}': (r if split == 'held-in' else r['held_out'])[k]
                for split in ('held-in', 'held-out') for k in ('attribute', 'exact', 'object_f1')}
    for name, cols in seed_stats(scores)['queries'].items():
        print(f"{name}: " + ', '.join(f'{c} {mean_std_text(v, len(seeds))}' for c, v in cols.items()))

if __name__ == '__main__': main()
