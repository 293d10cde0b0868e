"""Run under `python -m torch.distributed.run --nproc_per_node 2`: several real pretraining runs
(the Trainer and its DeepSpeed engine) one after another in one process group of two ranks.

Usage: train_two_ranks.py ARGS_JSON, a file holding a list of argument lists as
`mmtrain/pretrain.py` takes them (["--config", FILE, "key=value", ...]).
"""

import json
import sys

import torch

from mmtrain.config import load_config
from mmtrain.train.lm import LMTask
from mmtrain.train.schema import PretrainConfig
from mmtrain.train.trainer import Trainer


def main() -> None:
    torch.set_num_threads(1)
    with open(sys.argv[1], encoding="utf-8") as fh:
        runs = json.load(fh)
    for args in runs:
        configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
        overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
        trainer = Trainer(load_config(PretrainConfig, configs, overrides), LMTask())
        try:
            trainer.run()
        finally:
            trainer.release_run_dir()


if __name__ == "__main__":
    main()
