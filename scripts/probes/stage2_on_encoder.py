"""Issue 20 item 1: stage 2 (the toy preset's recipe) on a saved stage-1 encoder, captions scored by the oracle."""
import json, sys, time, torch
from pathlib import Path
from vlv.core import get_config
from vlv.experiments import stage2_study
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
name, encoder, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = get_config('toy', f"experiments.study_scenes=200 decode.log_with=none {overrides}")
t0 = time.time()
r = stage2_study(cfg, Path('runs/probes') / name, encoder)
r['overrides'] = overrides; r['wall'] = time.time() - t0
Path(f'runs/probes/{name}.json').write_text(json.dumps(r, indent=1, default=str))
print(name, overrides, 'loss', r['final_loss'], {k: (v['object_f1'], v['exact_match']) for k, v in r['scores'].items()}, f"{r['wall']/60:.1f} min")
