"""Issue 20 item 3: can the supervised captioner (random-init encoder, psi, random LM, end to end) learn to read 32 images? Full-batch AdamW."""
import sys, torch
from vlv.core import get_config
from vlv.worlds import load_bottleneck, caption_tokenizer, caption_transform
from vlv.encoder import build_encoder
from vlv.decode import CaptionDecoder, Stage2Model, load_lm
from vlv.data import make_splits
torch.set_num_threads(1)
cfg = get_config('toy', 'decode.train=psi+lm+whole-encoder')
teacher = load_bottleneck(cfg)
enc = build_encoder(cfg.encoder, teacher.text_width, seed=0)
lm, tok = load_lm(cfg.decode, seed=0, tokenizer=caption_tokenizer(cfg))
model = Stage2Model(enc, teacher, CaptionDecoder(lm, tok, teacher.text_width, cfg.decode.psi_hidden, seed=0))
groups = model.set_trainable('psi+lm+whole-encoder', 2e-3, 1e-3, 5e-4)
model.train()
train = make_splits(cfg.data, seed=0)['train']
items = [train[i] for i in range(32)]
tf = caption_transform(cfg)
import numpy as np
rng = np.random.default_rng(0)
caps = [tf(it['caption'], rng) for it in items]
x = torch.stack([torch.as_tensor(it['image']) for it in items]).float()
if x.shape[-1] == 3: x = x.permute(0, 3, 1, 2)
if x.max() > 1.5: x = x / 255
opt = torch.optim.AdamW(groups, weight_decay=0.0)
share = lambda t: (t.var(0).mean() / t.reshape(-1, t.shape[-1]).var(0).mean()).item()
caps = [tf(it['caption'], np.random.default_rng(i)) for i, it in enumerate(items)]   # one fixed caption per image
for step in range(int(sys.argv[1]) if len(sys.argv) > 1 else 150):
    loss = model.loss({'image': x, 'caption': caps}); opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g['params']], 1.0); opt.step()
    if step % 25 == 0:
        with torch.no_grad(): c = model.conditioning(x)
        print(step, round(loss.item(), 4), 'share c', round(share(c), 3), flush=True)
model.eval()
print(model.caption(x[:4]).texts); print(caps[:4])
