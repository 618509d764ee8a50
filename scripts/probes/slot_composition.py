"""Slot-aligned composition: z = A's first k slots, then B's slots k..N (B's vectors stay at their own positions)."""
import json, sys, torch
from pathlib import Path
from vlv.core import get_config
from vlv.worlds import load_bottleneck
from vlv.encoder import load_encoder
from vlv.eval import eval_sets, objects_present
from vlv.data import parse_images
import numpy as np
torch.set_num_threads(1)
folder, overrides = Path(sys.argv[1]), sys.argv[2]
cfg = get_config('toy', overrides); b = cfg.bottleneck
teacher = load_bottleneck(cfg); enc = load_encoder(folder, cfg.encoder).eval()
n, out = 100, {}
for split, (images, scenes, _) in eval_sets(cfg, 2 * n).items():
    with torch.no_grad():
        z = enc(images); za, zb = z[:n], z[n:]
        N = z.shape[1]; k = N // 2
        zs = torch.cat([za[:, :k], zb[:, k:]], 1)
        dec = parse_images(teacher.sample(teacher.encode_embeddings(zs), guidance=2.0, steps=b.sample_steps, sampler=b.sampler, seed=0).cpu())
    sa, sb = scenes[:n], scenes[n:2 * n]
    ha = [objects_present(a, d) for a, d in zip(sa, dec)]; hb = [objects_present(s, d) for s, d in zip(sb, dec)]
    # by region: A's objects in the top rows (cells 0-2) vs the rest; B's in the bottom row (6-8) vs the rest
    top_a = [objects_present([o], d) for a, d in zip(sa, dec) for o in a if o.cell < 3]
    bot_b = [objects_present([o], d) for s, d in zip(sb, dec) for o in s if o.cell >= 6]
    out[split] = dict(recall_a=sum(ha) / sum(map(len, sa)), recall_b=sum(hb) / sum(map(len, sb)),
                      both=float(np.mean([x > 0 and y > 0 for x, y in zip(ha, hb)])),
                      recall_a_top_row=float(np.mean(top_a)), recall_b_bottom_row=float(np.mean(bot_b)))
    print(split, {k_: round(v, 3) for k_, v in out[split].items()}, flush=True)
Path(folder.parent / 'slot_composition.json').write_text(json.dumps(out, indent=1))
