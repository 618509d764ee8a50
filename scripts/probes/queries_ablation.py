"""Issue 20 item 5: nbs/04's queries ablation for one finished toy run, outside the notebook (the run itself had
experiments.studies=false). Trains the rows that are not the main run (4 queries, the grid readout) with
`run_studies` on the rows of `vlv.stage1.ablation_configs`, as 04 does, scores the run's own encoder as the row that
is the main run, and writes
<run>/queries_ablation.json. Usage: python scripts/probes/queries_ablation.py runs/toy-seeds/seed-0 [workers]"""
import json, sys, time
from pathlib import Path
import torch
from vlv.core import get_config, save_json
from vlv.encoder import load_encoder
from vlv.experiments import run_studies, stage1_scores
from vlv.experiments import ablation_configs
from vlv.worlds import load_bottleneck


def main():
    run = Path(sys.argv[1]); workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(1)
    manifest = json.loads((run / 'manifest.json').read_text())
    overrides = manifest['parameters'].get('cfg_overrides', '')
    cfg = get_config('toy', overrides)
    n = cfg.stage1.ablation_scenes
    decoder = load_bottleneck(cfg)
    encoder = load_encoder(run / 'stage1' / 'encoder', cfg.encoder).eval()
    cfgs, main_twin = ablation_configs(cfg, 'toy', overrides, encoder.grid_tokens)
    t0 = time.time()
    table = run_studies(1, {k: c for k, c in cfgs.items() if k not in main_twin}, run / 'short-runs', workers, n_scenes=n, guidance=1.0)
    log = [json.loads(l) for l in (run / 'stage1' / 'log.jsonl').read_text().splitlines()]   # every log_every-th step
    done = json.loads((run / 'stage1_metrics.json').read_text())                              # 04's steps and final loss
    for name in main_twin:
        table[name] = stage1_scores(encoder, decoder, cfg, steps=done['steps'], seconds=done['train_seconds'],
                                    final_loss=done['final_loss'], history=log, n_scenes=n, guidance=1.0) | dict(main_run=True)
    table = {name: table[name] for name in cfgs}
    save_json({k: {x: y for x, y in v.items() if x != 'history'} for k, v in table.items()} | {'minutes': (time.time() - t0) / 60},
              run / 'queries_ablation.json')
    for k, v in table.items():
        print(k, 'final loss', round(v['final_loss'], 4), 'held-in', round(v['attribute'], 3), round(v['exact'], 3), round(v['object_f1'], 3),
              'held-out', {a: round(b, 3) for a, b in v['held_out'].items()})


if __name__ == '__main__': main()   # spawned study workers import this file
