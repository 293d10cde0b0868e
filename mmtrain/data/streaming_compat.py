"""The only module that imports mosaicml-streaming; everything else imports streaming names from here.

``import streaming`` runs ``streaming/__init__.py``, which imports ``streaming.vision`` and thereby
torchvision. The torchvision wheel that pip pairs with the CPU build of torch fails to load
(``RuntimeError: operator torchvision::nms does not exist``). mmtrain never uses streaming's
ready-made datasets, so empty modules are registered as ``streaming.vision`` (the fix) and
``streaming.text`` / ``streaming.multimodal`` (they import transformers' AutoTokenizer: ~1.7 s of
import time for nothing) before the first import. ``streaming.base`` never imports them.
"""

from __future__ import annotations

import sys
import types

for _name in ("streaming.vision", "streaming.text", "streaming.multimodal"):
    if _name not in sys.modules:
        _stub = types.ModuleType(_name)
        _stub.__doc__ = "Empty stand-in installed by mmtrain.data.streaming_compat (unused datasets)."
        sys.modules[_name] = _stub

import streaming  # noqa: E402
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
# Careful: unlinks the shm blocks of live datasets too (see mmtrain.data.lm_dataset); mmtrain never calls it.
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

STREAMING_VERSION = streaming.__version__

__all__ = ["MDSWriter", "StreamingDataLoader", "StreamingDataset", "clean_stale_shared_memory",
           "STREAMING_VERSION"]
