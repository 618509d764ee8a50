"""Issue 20 item 3: does the supervised captioner (random-init encoder, end to end) learn? One variant per call."""
import json, sys, time, torch
from pathlib import Path
from vlv.core import get_config
from vlv.experiments import stage2_study
torch.set_num_threads(1)
name, overrides = sys.argv[1], sys.argv[2]
cfg = get_config('toy', f"data.caption_fraction=1.0 decode.train=psi+lm+whole-encoder experiments.study_scenes=100 decode.log_with=none {overrides}")
t0 = time.time()
import os
teacher = None
if os.environ.get('BYPASS'):
    from vlv.worlds import load_bottleneck
    teacher = load_bottleneck(cfg)
    teacher.encode_embeddings = lambda z: z * float(os.environ['BYPASS'])   # the supervised path without the frozen text encoder
r = stage2_study(cfg, Path('runs/probes') / name, None, decoder=teacher)
r['overrides'] = overrides; r['wall'] = time.time() - t0
Path(f'runs/probes/{name}.json').write_text(json.dumps(r, indent=1, default=str))
print(name, overrides, 'loss', r['final_loss'], {k: (v['object_f1'], v['exact_match']) for k, v in r['scores'].items()}, f"{r['wall']/60:.1f} min")
