"""The two scale measurements of docs/retrieval.md section 3.

1. At initialisation, on random unit vectors (d 192, N 32, 2 blocks, seed 0): the norm of a
   candidate position's own input against the norm of what the blocks add to it, for each
   `model.input_scale` / `model.interaction` setting of the scorer.
2. The raw (not L2-normalised) hidden states of the recipe's pretrained bundles: coordinate RMS of
   the mean-pooled and index -2 states of 64 val documents, against 1/sqrt(d) after normalising.

    python docs/retrieval/frozen_scale.py runs/retrieval-recipe
"""

import sys

import torch
import torch.nn.functional as F

from mmtrain.models.frozen_scorer import FrozenEmbeddingScorer

torch.set_num_threads(1)
d, n, batch = 192, 32, 256
torch.manual_seed(0)
q = F.normalize(torch.randn(batch, d), dim=-1)
c = F.normalize(torch.randn(batch, n - 1, d), dim=-1)
for scale, interaction in [("none", "none"), ("sqrt_d", "none"), ("none", "product"), ("sqrt_d", "product")]:
    torch.manual_seed(0)
    model = FrozenEmbeddingScorer(d, n, 2, 4, input_scale=scale, interaction=interaction).eval()
    qs, cs = q * model.scale, c * model.scale
    if interaction == "product":
        cs = qs[:, None] * cs
    h0 = torch.cat([qs[:, None], cs], 1)
    h, out = h0, []
    with torch.no_grad():
        for i, block in enumerate(model.blocks, 1):
            h = block(h)
            out.append(f"after block {i}: added {(h[:, 1:] - h0[:, 1:]).norm(dim=-1).mean():.2f}")
    print(f"input_scale {scale:6} interaction {interaction:7}: own input {h0[:, 1:].norm(dim=-1).mean():.2f} | "
          + " | ".join(out))

if len(sys.argv) > 1:
    from mmtrain.data.pairs import load_split
    from mmtrain.export.bundle import load_pretrained

    recipe = sys.argv[1]
    arrays = load_split(f"{recipe}/pairs", "val")
    ids, lengths = torch.as_tensor(arrays["document_ids"][:64]), torch.as_tensor(arrays["document_length"][:64])
    for family in ("mixer", "transformer"):
        model = load_pretrained(f"{recipe}/bundles/{family}", device="cpu").eval()
        with torch.no_grad():
            h = model.hidden_states(ids[:, :int(lengths.max())])
        mask = (torch.arange(h.shape[1])[None] < lengths[:, None]).float()[..., None]
        mean = (h * mask).sum(1) / mask.sum(1)
        second = h[torch.arange(len(lengths)), (lengths - 2).clamp(min=0)]
        print(f"{family}: raw coordinate RMS, mean-pooled {mean.pow(2).mean().sqrt():.2f}, index -2 "
              f"{second.pow(2).mean().sqrt():.2f}; L2-normalised {h.shape[-1] ** -0.5:.3f}")
