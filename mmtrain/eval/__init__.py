"""Evaluation: eval-lm, retrieval evaluation and metrics, frozen-embedding retrieval, generation,
representation analysis and run reports."""
