"""Run under `python -m torch.distributed.run --nproc_per_node 2`: exact resume with two ranks.

Each rank reads `total` batches without interruption, then again as `k` batches -> state_dict ->
fresh loader -> load_state_dict -> the rest, and writes what it saw to <out>/rank<R>.json.
Usage: data_resume_two_ranks.py SHARD_DIR N_CTX OUT_DIR NUM_WORKERS K TOTAL
"""

import json
import os
import sys

import torch.distributed as dist

from mmtrain.data.lm_dataset import build_lm_loader, iterate_forever


def main() -> None:
    shard_dir, n_ctx, out_dir, num_workers, k, total = sys.argv[1:7]
    n_ctx, num_workers, k, total = int(n_ctx), int(num_workers), int(k), int(total)
    dist.init_process_group("gloo")  # as the trainer does (DeepSpeed on CPU uses gloo)
    rank = dist.get_rank()

    def loader():
        return build_lm_loader(shard_dir, n_ctx, "train", 4, shuffle=True, seed=7, num_workers=num_workers)

    def rows(batch):
        return [r.tolist() for r in batch["input_ids"]]

    stream = iterate_forever(loader())
    reference = [rows(next(stream)) for _ in range(total)]

    first = loader()
    stream = iterate_forever(first)
    before = [rows(next(stream)) for _ in range(k)]
    state = first.state_dict()
    del stream, first

    resumed = loader()
    resumed.load_state_dict(state)
    stream = iterate_forever(resumed)
    after = [rows(next(stream)) for _ in range(total - k)]

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"reference": reference, "resumed": before + after, "state": state,
                   "world_size": dist.get_world_size()}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
