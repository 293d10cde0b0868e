"""The only module that imports mosaicml-streaming; everything else imports streaming names from here.

``import streaming`` runs ``streaming/__init__.py``, which imports ``streaming.vision`` and thereby
torchvision. The torchvision wheel that pip pairs with the CPU build of torch fails to load
(``RuntimeError: operator torchvision::nms does not exist``). mmtrain never uses streaming's
ready-made datasets, so empty modules are registered as ``streaming.vision`` (the fix) and
``streaming.text`` / ``streaming.multimodal`` (they import transformers' AutoTokenizer: ~1.7 s of
import time for nothing) before the first import. ``streaming.base`` never imports them.

``streaming.base.dataloader`` imports transformers (~2.4 s) only to name two batch classes in an
``isinstance`` check (``dict`` or a transformers batch). mmtrain's batches are plain dicts, so when
transformers is not loaded yet, stand-in classes are put in place for that one import and removed
right after: a later ``import transformers`` loads the real package.
"""

from __future__ import annotations

import sys
import types

for _name in ("streaming.vision", "streaming.text", "streaming.multimodal"):
    if _name not in sys.modules:
        _stub = types.ModuleType(_name)
        _stub.__doc__ = "Empty stand-in installed by mmtrain.data.streaming_compat (unused datasets)."
        sys.modules[_name] = _stub

_BATCH_CLASS_MODULES = {"transformers.feature_extraction_utils": "BatchFeature",
                        "transformers.tokenization_utils_base": "BatchEncoding"}
_stand_ins = []
if "transformers" not in sys.modules:
    for _name in ("transformers", *_BATCH_CLASS_MODULES):
        _stub = types.ModuleType(_name)
        _stub.__doc__ = "Temporary stand-in installed by mmtrain.data.streaming_compat while streaming imports."
        if _name in _BATCH_CLASS_MODULES:
            _cls = _BATCH_CLASS_MODULES[_name]
            setattr(_stub, _cls, type(_cls, (), {"__doc__": "Never instantiated: mmtrain batches are dicts."}))
        sys.modules[_name] = _stub
        _stand_ins.append(_name)
try:
    import streaming  # noqa: E402
    from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
finally:
    for _name in _stand_ins:
        del sys.modules[_name]
# Careful: unlinks the shm blocks of live datasets too (see mmtrain.data.lm_dataset); mmtrain never calls it.
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

STREAMING_VERSION = streaming.__version__

__all__ = ["MDSWriter", "StreamingDataLoader", "StreamingDataset", "clean_stale_shared_memory",
           "STREAMING_VERSION"]
