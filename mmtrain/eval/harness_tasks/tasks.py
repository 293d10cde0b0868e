"""Datasets and result processing of mmtrain's lm-evaluation-harness tasks (loaded by the YAML files
beside this one through ``!function``); the documents come from :mod:`mmtrain.eval.harness`."""

from mmtrain.eval.harness import perplexity_dataset, perplexity_results, summary_dataset

__all__ = ["perplexity_dataset", "perplexity_results", "summary_dataset"]
