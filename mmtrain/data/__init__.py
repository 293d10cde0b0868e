"""The data pipeline: corpus -> tokenizer -> packed MDS shards -> resumable LM batches.

* :mod:`mmtrain.data.corpus`, :mod:`mmtrain.data.demo_corpus`: streaming corpus readers and the
  built-in demo corpus (standard-library docstrings).
* :mod:`mmtrain.data.prepare`: ``mmtrain prepare`` and its Python API :func:`~mmtrain.data.prepare.prepare`.
* :mod:`mmtrain.data.shards`: layout, ``meta.json``, :func:`~mmtrain.data.shards.check_shards`.
* :mod:`mmtrain.data.lm_dataset`: :func:`~mmtrain.data.lm_dataset.build_lm_loader`,
  :func:`~mmtrain.data.lm_dataset.iterate_forever`.
* :mod:`mmtrain.data.streaming_compat`: the one place that imports mosaicml-streaming.

Submodules are imported on use (torch and streaming take seconds to import).
"""

from mmtrain.data.errors import DataError

__all__ = ["DataError"]
