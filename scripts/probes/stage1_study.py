"""Issue 20 item 1: stage 1 with the query readout (toy preset), trained and scored by the library's study runner."""
import json, sys, time, torch
from pathlib import Path
from vlv.core import get_config
from vlv.experiments import stage1_study
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
name, overrides = sys.argv[1], sys.argv[2]
cfg = get_config('toy', f"stage1.log_with=none {overrides}")
t0 = time.time()
r = stage1_study(cfg, Path('runs/probes') / name, n_scenes=200, guidance=2.0)
r['overrides'] = overrides; r['wall'] = time.time() - t0
Path(f'runs/probes/{name}.json').write_text(json.dumps({k: v for k, v in r.items() if k != 'history'}, indent=1, default=str))
print(name, overrides, {k: r[k] for k in ('final_loss', 'attribute', 'exact', 'object_f1', 'held_out', 'seconds')}, f"{r['wall']/60:.1f} min")
