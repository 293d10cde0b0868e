"""Run under `python -m torch.distributed.run --nproc_per_node 2`: gathered InfoNCE == 1-rank InfoNCE.

Each rank embeds its half of a fixed batch with a shared linear encoder, computes the gathered
InfoNCE (optionally symmetric, with extra negatives), backpropagates and averages the parameter
gradient over ranks (what the engine does). Rank 0 also computes the single-process loss and
gradient on the concatenated batch and writes both to OUT_JSON.
Usage: retrieval_gather_two_ranks.py OUT_JSON
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtrain.train.losses import info_nce

BATCH, EXTRA, DIM_IN, DIM = 6, 2, 5, 4   # per rank


def data():
    gen = torch.Generator().manual_seed(0)
    world = 2
    return (torch.randn(world * BATCH, DIM_IN, generator=gen), torch.randn(world * BATCH, DIM_IN, generator=gen),
            torch.randn(world * EXTRA, DIM_IN, generator=gen), torch.randn(DIM_IN, DIM, generator=gen))


def run(q, d, e, w0, symmetric, gather):
    w = w0.clone().requires_grad_(True)
    enc = lambda x: F.normalize(x @ w, dim=-1)  # noqa: E731
    loss = info_nce(enc(q), enc(d), 0.1, extra_negatives=enc(e), symmetric=symmetric, gather=gather)
    loss.backward()
    return loss.detach(), w.grad


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    q, d, e, w0 = data()
    result = {}
    for symmetric in (False, True):
        sl, se = slice(rank * BATCH, (rank + 1) * BATCH), slice(rank * EXTRA, (rank + 1) * EXTRA)
        loss, grad = run(q[sl], d[sl], e[se], w0, symmetric, gather=True)
        dist.all_reduce(grad)
        grad /= world                      # the engine averages gradients over ranks
        ref_loss, ref_grad = run(q, d, e, w0, symmetric, gather=False)   # 1 rank, concatenated batch
        # the 1-rank reference orders extras after all positives, as the gather does
        result[f"symmetric={symmetric}"] = {
            "loss": float(loss), "ref_loss": float(ref_loss),
            "max_grad_diff": float((grad - ref_grad).abs().max()), "grad_norm": float(ref_grad.norm())}
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
