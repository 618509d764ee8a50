"""Issue 20: does a pretrained toy Florence-2 remove the query readout's plateau? The vision tower, image projector and
BART encoder start from another run's encoder (pretrained with images only, e.g. the grid-readout run of nbs/04's
queries ablation on seed 0's scenes); the BART decoder, the queries and phi start fresh, as the toy preset builds them.
Stage 1 of the toy preset, stopped after STOP steps of its schedule (prints the loss every 100 steps; the log is
runs/probes/NAME/stage1/log.jsonl), or with STOP = full the whole schedule, scored by `stage1_study` as
scripts/probes/stage1_study.py scores (200 scenes per split, g = 2; runs/probes/NAME.json).

    python scripts/probes/pretrained_florence.py runs/toy-seeds/seed-0/short-runs/5facaf389573/stage1/encoder \\
        "encoder.readout=image_tokens encoder.num_queries=16" pre_grid0_s2 "run.seed=2" 1000      # or full
"""
import json, sys, time
from pathlib import Path
import torch
import vlv.stage1 as s1
from vlv.core import get_config
from vlv.encoder import load_encoder
from vlv.experiments import stage1_study
from vlv.worlds import load_bottleneck, train_images

torch.set_num_threads(1)
source, source_overrides, name, overrides, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
pre = load_encoder(source, get_config('toy', source_overrides).encoder)
orig = s1.build_encoder


def build_pretrained(cfg, width, seed=0):
    e = orig(cfg, width, seed=seed)
    with torch.no_grad():
        for part in ('vision_tower', 'image_projector'):
            getattr(e, part).load_state_dict(getattr(pre, part).state_dict())
        e.language.encoder.load_state_dict(pre.language.encoder.state_dict())   # its token embeddings are shared with the decoder
    return e


s1.build_encoder = build_pretrained
cfg = get_config('toy', f"stage1.log_with=none {overrides}")
if stop == 'full':
    t0 = time.time()
    r = stage1_study(cfg, Path('runs/probes') / name, n_scenes=200, guidance=2.0)
    hist = r.pop('history'); r['loss_at'] = {h['step']: round(h['loss'], 4) for h in hist if h['step'] % 100 == 0}
    r.update(source=source, overrides=overrides, wall=time.time() - t0)
    Path(f'runs/probes/{name}.json').write_text(json.dumps(r, indent=1, default=str))
    print(name, {k: r[k] for k in ('final_loss', 'attribute', 'exact', 'object_f1', 'held_out')}, f"{r['wall'] / 60:.1f} min")
else:
    images, keys = train_images(cfg)
    r = s1.train_stage1(cfg, Path('runs/probes') / name, images, keys, decoder=load_bottleneck(cfg), stop_after=int(stop), progress=False)
    print(name, [(h['step'], round(h['loss'], 3)) for h in r.history if h['step'] % 100 == 0])
