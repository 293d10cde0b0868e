"""The only module that imports mosaicml-streaming; everything else imports streaming names from here.

mmtrain uses only ``streaming.base`` (MDS shards, the dataset and its loader). But streaming's
package ``__init__`` (0.13) first imports its ready-made datasets: ``streaming.vision`` imports
torchvision, whose PyPI wheel fails to load beside the CPU build of torch (``RuntimeError:
operator torchvision::nms does not exist``), and ``streaming.text`` / ``streaming.multimodal`` import
transformers (~1.6 s per process, measured). ``streaming.base.dataloader`` imports transformers only
to name two batch classes in an ``isinstance`` check; mmtrain's batches are plain dicts.

So for the duration of ``import streaming`` only, those modules are stood in for by empty ones,
and removed right after: a later ``import streaming.text`` (or ``transformers``) gets the real module,
or its real error.
"""

from __future__ import annotations

import json
import os
import re
import sys
import types

_DATASET_MODULES = ("streaming.vision", "streaming.text", "streaming.multimodal")
_BATCH_CLASS_MODULES = {"transformers.feature_extraction_utils": "BatchFeature",
                        "transformers.tokenization_utils_base": "BatchEncoding"}


def _import_streaming():
    stand_ins = [name for name in _DATASET_MODULES if name not in sys.modules]
    if "transformers" not in sys.modules:
        stand_ins += ["transformers", *_BATCH_CLASS_MODULES]
    for name in stand_ins:
        stub = types.ModuleType(name)
        if name in _BATCH_CLASS_MODULES:
            cls = _BATCH_CLASS_MODULES[name]
            setattr(stub, cls, type(cls, (), {"__doc__": "Never instantiated: mmtrain batches are dicts."}))
        sys.modules[name] = stub
    try:
        import streaming
        import streaming.base.util  # noqa: F401
    finally:
        for name in stand_ins:
            del sys.modules[name]
            if name in _DATASET_MODULES and "streaming" in sys.modules:
                # the package bound the stand-in as an attribute; a later import binds the real one
                sys.modules["streaming"].__dict__.pop(name.split(".")[1], None)
    return streaming


streaming = _import_streaming()

SHM_NAMESPACE_ENV = "MMTRAIN_SHM_NAMESPACE"


def shm_namespace() -> str:
    """The job's shared-memory namespace: ``$MMTRAIN_SHM_NAMESPACE`` reduced to at most 16 letters
    and digits, or "" (streaming's own names) when unset."""
    return re.sub(r"[^A-Za-z0-9]", "", os.environ.get(SHM_NAMESPACE_ENV, ""))[:16]


def _namespace_shm_names() -> None:
    """Put streaming's /dev/shm blocks and /tmp lock files under the job's namespace.

    streaming names them ``<prefix int>_<name>``, the prefix being the first one no live dataset on
    the node uses. Two multi-rank jobs whose loaders register at the same instant can take the same
    prefix (the ranks of one then read the other's registration). With ``MMTRAIN_SHM_NAMESPACE``
    set, every name starts with it, so jobs with different namespaces never meet. All ranks of a job
    on a node must share its value; it is read on every call, so it may be set after import.
    """
    from streaming.base import dataset, shared, util
    from streaming.base.shared import prefix

    original = prefix._get_path

    def _get_path(prefix_int: int, name: str) -> str:
        namespace = shm_namespace()
        return f"{namespace}_{original(prefix_int, name)}" if namespace else original(prefix_int, name)

    for module in (prefix, dataset, util, shared):
        module._get_path = _get_path


_namespace_shm_names()
MDSWriter, StreamingDataLoader, StreamingDataset = (streaming.MDSWriter, streaming.StreamingDataLoader,
                                                   streaming.StreamingDataset)

STREAMING_VERSION = streaming.__version__
Stream = streaming.Stream
from streaming.base.storage import CloudDownloader, CloudUploader  # noqa: E402


def read_samples(split_dir):
    """Every sample of a local MDS directory, in stored order, read from its shards directly: no
    StreamingDataset, so no shared memory (which a StreamingDataset holds until the process exits)."""
    from streaming.base.format import reader_from_json

    with open(os.path.join(split_dir, "index.json"), encoding="utf-8") as fh:
        shards = json.load(fh)["shards"]
    for info in shards:
        reader = reader_from_json(str(split_dir), None, info)
        for i in range(reader.samples):
            yield reader.get_item(i)

__all__ = ["CloudDownloader", "CloudUploader", "Stream", "MDSWriter", "StreamingDataLoader", "StreamingDataset",
           "read_samples", "shm_namespace", "STREAMING_VERSION"]
