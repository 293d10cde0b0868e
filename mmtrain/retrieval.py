"""Contrastive retrieval training (InfoNCE) of a pretrained mixer or transformer on the DeepSpeed
engine (the loop: :mod:`mmtrain.train.trainer`; the task: :mod:`mmtrain.train.contrastive`).

Run it any of these ways (``--config`` repeatable, then ``key=value`` overrides)::

    deepspeed mmtrain/retrieval.py --config configs/retrieval/mixer-demo.yaml retrieval.bundle=bundles/mixer
    torchrun --nproc_per_node 2 mmtrain/retrieval.py --config ... engine.zero_stage=3
    python mmtrain/retrieval.py --config ...     /    python -m mmtrain.retrieval --config ...

It starts from an exported bundle (``mmtrain export``) and pair shards (``mmtrain prepare-pairs``
with the same bundle, so the tokenizers match). Monitoring, checkpoints and exact resume work as
in pretraining (same run-dir layout). Export the result with ``mmtrain export-embedder <run_dir>
--out DIR``. Exit codes: as pretraining (0 done, 2 configuration / data error, 3 non-finite loss,
75 stopped by a signal with a checkpoint).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

if __name__ == "__main__" and not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]


def main(argv: Optional[List[str]] = None) -> int:
    from mmtrain.train.contrastive import ContrastiveTask
    from mmtrain.train.schema import RetrievalConfig
    from mmtrain.train.trainer import run_entry

    return run_entry(argv, RetrievalConfig, ContrastiveTask, "Contrastive retrieval training of a bundle.")


if __name__ == "__main__":
    sys.exit(main())
