"""Run as `python zero3_partitioned.py SHARD_DIR RUN_DIR OUT_JSON`: a real ZeRO-3 Trainer on the tiny mixer.

Records whether the model came out of the task's build_model already partitioned (every parameter a
DeepSpeed one with an empty local tensor), its weights gathered after the build (to compare with a
model built without ZeRO-3 at the same seed), and, after two training steps, the parameters any
module had to fetch outside its own ``__call__`` (DeepSpeed's external-parameter fallback).
"""

import json
import sys

import torch

from mmtrain.config import load_config
from mmtrain.train.lm import LMTask
from mmtrain.train.schema import PretrainConfig
from mmtrain.train.trainer import Trainer

shard_dir, run_dir, out_json = sys.argv[1:4]


class RecordingLMTask(LMTask):
    def build_model(self):
        model = super().build_model()
        self.built = [{"name": n, "ds": hasattr(p, "ds_id"), "local_numel": p.data.numel(),
                       "numel": int(getattr(p, "ds_numel", p.numel()))} for n, p in model.named_parameters()]
        return model


cfg = load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"],
                  [f"data.shard_dir={shard_dir}", f"logging.run_dir={run_dir}", "engine.zero_stage=3",
                   "train.steps=2", "train.eval_every=0", "checkpoint.every=0", "model.mixer_heads=2"])
task = RecordingLMTask()
trainer = Trainer(cfg, task)
import deepspeed  # noqa: E402

weights = {}
for name, p in trainer.engine.module.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        weights[name] = p.detach().clone()
torch.save(weights, run_dir + "/initial_weights.pt")
trainer.run()
external = {name: len(getattr(m, "_external_params", {}) or {}) for name, m in trainer.engine.module.named_modules()}
trainer.release_run_dir()
json.dump({"built": task.built, "external": {k: v for k, v in external.items() if v},
           "losses": [], "modules": len(external)}, open(out_json, "w"))
