"""Issue 20: which part of a seed makes the query readout slow, its data (scenes, batch order, noise) or its
initialisation? Stage 1 of the toy preset with run.seed=DATA_SEED and the encoder built with INIT_SEED, stopped after
1,000 of its 3,000 steps; prints the loss every 100 steps (runs/probes/cross_dataD_initI/stage1/log.jsonl).

    python scripts/probes/seed_cross.py 2 0      # seed 2's data, seed 0's initialisation
"""
import sys
from pathlib import Path
import torch
import vlv.stage1 as s1
from vlv.core import get_config
from vlv.worlds import load_bottleneck, train_images

torch.set_num_threads(1)
data_seed, init_seed = int(sys.argv[1]), int(sys.argv[2])
orig = s1.build_encoder
s1.build_encoder = lambda c, w, seed=0: orig(c, w, seed=init_seed)
cfg = get_config('toy', f"stage1.log_with=none run.seed={data_seed}")
name = f'cross_data{data_seed}_init{init_seed}'
images, keys = train_images(cfg)
r = s1.train_stage1(cfg, Path('runs/probes') / name, images, keys, decoder=load_bottleneck(cfg), stop_after=1000, progress=False)
print(name, [(h['step'], round(h['loss'], 3)) for h in r.history if h['step'] % 100 == 0])
