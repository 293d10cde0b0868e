"""LM pretraining on the DeepSpeed ZeRO engine (the loop: :mod:`mmtrain.train.trainer`; the task:
:mod:`mmtrain.train.lm`).

Run it any of these ways (all take ``--config X.yaml`` (repeatable) and ``key=value`` overrides)::

    deepspeed mmtrain/pretrain.py --config configs/pretrain/mixer-d512-ctx512.yaml
    torchrun --nproc_per_node 2 mmtrain/pretrain.py --config ... engine.zero_stage=3
    python mmtrain/pretrain.py                  # default small mixer on the demo corpus (CPU)
    python -m mmtrain.pretrain train.steps=50

Exit codes: 0 done, 2 configuration / data error (before any training; also: run directory not
writable, locked by another job, or too little free disk for a checkpoint), 3 non-finite loss,
75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint at the next step boundary (relaunch
with ``checkpoint.resume=auto``, the default, to continue; see mmtrain/train/faults.py).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

if __name__ == "__main__" and not __package__:
    # Run as a file: keep mmtrain/ itself off sys.path so its modules cannot shadow others.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]


def main(argv: Optional[List[str]] = None) -> int:
    from mmtrain.train.lm import LMTask
    from mmtrain.train.schema import PretrainConfig
    from mmtrain.train.trainer import run_entry

    return run_entry(argv, PretrainConfig, LMTask, "Pretrain a masked mixer or transformer LM with DeepSpeed.")


if __name__ == "__main__":
    sys.exit(main())
