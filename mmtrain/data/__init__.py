"""The data pipeline: corpus -> tokenizer -> packed MDS shards -> resumable LM batches, and the
(query, document) pair shards of retrieval training.

* :mod:`mmtrain.data.corpus`, :mod:`mmtrain.data.demo_corpus`: streaming corpus readers and the
  built-in demo corpus (standard-library docstrings).
* :mod:`mmtrain.data.tokenizer`: SentencePiece training and loading.
* :mod:`mmtrain.data.prepare`: ``mmtrain prepare`` and its Python API :func:`~mmtrain.data.prepare.prepare`.
* :mod:`mmtrain.data.shards`: layout, ``meta.json``, :func:`~mmtrain.data.shards.check_shards`.
* :mod:`mmtrain.data.lm_dataset`: :func:`~mmtrain.data.lm_dataset.build_lm_loader`,
  :func:`~mmtrain.data.lm_dataset.iterate_forever`.
* :mod:`mmtrain.data.pairs`: ``mmtrain prepare-pairs``, pair shards, loaders and splits;
  :mod:`mmtrain.data.bm25`: the BM25 index (hard negatives, the eval baseline).
* :mod:`mmtrain.data.streaming_compat`: the one place that imports mosaicml-streaming.
* :mod:`mmtrain.data.schema`: the ``data``, ``prepare`` and ``pairs`` config sections.

Submodules are imported on use (torch and streaming take seconds to import).
"""

from mmtrain.data.errors import DataError

__all__ = ["DataError"]
