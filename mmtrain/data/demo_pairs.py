"""The built-in demo pair set: Python standard-library docstrings as (summary, body) pairs.

A PEP 257 docstring starts with a one-line summary, a blank line, then the rest. The summary is
the query and the rest is the document (~2,600 pairs on CPython 3.11, before deduplication).
Documents come from :func:`mmtrain.data.demo_corpus.demo_documents` (sources parsed with ``ast``,
never imported; same order, filters and interpreter dependence).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

from mmtrain.data.demo_corpus import demo_description, demo_documents

DEMO_PAIRS = "demo"
MIN_QUERY_CHARS = 10
MIN_DOCUMENT_CHARS = 20


def split_docstring(text: str) -> Optional[Tuple[str, str]]:
    """(summary line, rest) of a docstring shaped like PEP 257, else None."""
    parts = text.split("\n\n", 1)
    if len(parts) != 2:
        return None
    summary, rest = parts[0].strip(), parts[1].strip()
    if "\n" in summary or len(summary) < MIN_QUERY_CHARS or len(rest) < MIN_DOCUMENT_CHARS:
        return None
    return summary, rest


def demo_pairs(root: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """Yield (query, document) pairs in the demo corpus's fixed order."""
    for text in demo_documents(root=root):
        pair = split_docstring(text)
        if pair is not None:
            yield pair


def demo_pairs_description(root: Optional[str] = None) -> str:
    return "demo pairs (summary line -> rest of the docstring) from " + demo_description(root)
