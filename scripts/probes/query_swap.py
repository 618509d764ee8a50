"""Issue 20 item 2: what each query of a query-readout encoder carries. Swap one query of z_A for B's, decode with the
frozen teacher, read with the oracle: which of A's objects (by cell) are lost, which of B's appear."""
import json, sys, time, torch, numpy as np
from pathlib import Path
from vlv.core import get_config
from vlv.worlds import load_bottleneck
from vlv.encoder import load_encoder
from vlv.eval import eval_sets, composition_scores, objects_present
from vlv.data import parse_images
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
folder, overrides = Path(sys.argv[1]), sys.argv[2]
cfg = get_config('toy', overrides); b = cfg.bottleneck
teacher = load_bottleneck(cfg)
enc = load_encoder(folder, cfg.encoder).eval()
n = 100
sets = eval_sets(cfg, 2 * n)
out = {}
def decode(z, seed=0):
    with torch.no_grad():
        c = teacher.encode_embeddings(z)
        return parse_images(teacher.sample(c, guidance=2.0, steps=b.sample_steps, sampler=b.sampler, seed=seed).cpu())
t0 = time.time()
for split in ('held-in', 'held-out'):
    images, scenes, _ = sets[split]
    with torch.no_grad(): z = enc(images)
    za, zb, sa, sb = z[:n], z[n:2 * n], scenes[:n], scenes[n:2 * n]
    N = z.shape[1]
    comp = {f'k={k}': composition_scores(za, zb, sa, sb, teacher, k=k, steps=b.sample_steps, sampler=b.sampler)[0] for k in (N // 2, N, 0)}
    rows = []
    for i in range(N):
        zs = za.clone(); zs[:, i] = zb[:, i]
        decoded = decode(zs)
        lost_cells, kept = np.zeros(9), np.zeros(9)
        gained = 0
        for a, s, d in zip(sa, sb, decoded):
            for o in a:
                hit = objects_present([o], d) > 0
                (kept if hit else lost_cells)[o.cell] += 1
            gained += objects_present(s, d)
        total = lost_cells + kept
        rows.append(dict(query=i, recall_a=float(kept.sum() / total.sum()), b_objects_shown=int(gained),
                         lost_by_cell=[round(float(l / t), 2) if t else None for l, t in zip(lost_cells, total)]))
    out[split] = dict(composition=comp, swap_one_query=rows)
    print(split, {k: (round(v['recall_a'], 2), round(v['recall_b'], 2)) for k, v in comp.items()}, flush=True)
    for r in rows: print('  query', r['query'], 'recall A', round(r['recall_a'], 2), 'B objects shown', r['b_objects_shown'], 'lost by cell', r['lost_by_cell'], flush=True)
out['seconds'] = time.time() - t0
Path(folder.parent / 'composition_probe.json').write_text(json.dumps(out, indent=1))
