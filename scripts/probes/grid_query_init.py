"""Issue 20: queries initialised from the grid's positions. Query i starts as the BART encoder's output at grid cell i
for a uniform grey image, and every decoder layer's cross-attention query projection starts equal to its key
projection, so that query i first reads its own cell.

    python scripts/probes/grid_query_init.py attention                       # cell i's share of query i's attention at init
    python scripts/probes/grid_query_init.py train gridinit_s2 "run.seed=2"  # stage 1 with this init, scored (runs/probes/NAME.json)
"""
import json, sys, time
from pathlib import Path
import torch
import vlv.stage1 as s1
from vlv.core import get_config
from vlv.encoder import build_encoder
from vlv.experiments import stage1_study
from vlv.worlds import train_images


def grid_init(e, tie=True, center=True):
    "queries[i] := BART-encoder output of a grey image at grid cell i (centred over the cells); cross-attention q_proj := k_proj."
    size = e.cfg.image_size
    with torch.no_grad():
        g = e.encode(torch.full((1, 3, size, size), 0.5, device=e.device))[0, 1:1 + e.num_queries]
        if center: g = g - g.mean(0)
        e.queries.copy_(g[None])
        if tie:
            for layer in e.language.decoder.layers:
                a = layer.encoder_attn
                a.q_proj.weight.copy_(a.k_proj.weight)
                if a.q_proj.bias is not None and a.k_proj.bias is not None: a.q_proj.bias.copy_(a.k_proj.bias)
    return e


@torch.no_grad()
def attention_on_own_cell(e, images):
    "Mean cross-attention weight of query i on grid token i, per decoder layer."
    enc = e.encode(images)
    out = e.language.decoder(inputs_embeds=e.queries.expand(len(enc), -1, -1), encoder_hidden_states=enc, use_cache=False,
                             output_attentions=True)
    idx = torch.arange(e.num_queries)
    return [round(att.mean(1)[:, idx, 1 + idx].mean().item(), 3) for att in out.cross_attentions]


def attention():
    for seed in (0, 2):
        cfg = get_config('toy', f'run.seed={seed} encoder.attn_implementation=eager')
        imgs, _ = train_images(cfg)
        batch = torch.stack([imgs[i]['image'] for i in range(16)])
        for name, fn in (('random', lambda e: e), ('grid', lambda e: grid_init(e, center=False)), ('grid, centred', grid_init),
                         ('grid, q/k untied', lambda e: grid_init(e, tie=False, center=False))):
            e = fn(build_encoder(cfg.encoder, cfg.bottleneck.text_width, seed=seed)).eval()
            print(seed, name, attention_on_own_cell(e, batch))


def train(name, overrides):
    torch.set_num_threads(1)
    orig = s1.build_encoder
    s1.build_encoder = lambda *a, **k: grid_init(orig(*a, **k))
    cfg = get_config('toy', f"stage1.log_with=none {overrides}")
    t0 = time.time()
    r = stage1_study(cfg, Path('runs/probes') / name, n_scenes=200, guidance=2.0)
    hist = r.pop('history'); r['loss_at'] = {h['step']: round(h['loss'], 4) for h in hist if h['step'] % 100 == 0}
    r['overrides'] = overrides; r['wall'] = time.time() - t0
    Path(f'runs/probes/{name}.json').write_text(json.dumps(r, indent=1, default=str))
    print(name, {k: r[k] for k in ('final_loss', 'attribute', 'exact', 'object_f1', 'held_out')}, f"{r['wall'] / 60:.1f} min")


if __name__ == '__main__':
    attention() if sys.argv[1] == 'attention' else train(*sys.argv[2:4])
