"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad corpus, tokenizer or shard input: the message names the file and what was expected."""
