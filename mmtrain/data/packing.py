"""Train/validation split by document, packing token streams into fixed blocks, and parallel encoding.

Packing modes (one block = one training sample of ``n_ctx`` tokens):

* ``concat``: every document is followed by EOS, the documents of a split are joined in corpus
  order and cut into consecutive blocks of ``n_ctx``; the last, incomplete block is dropped.
  A block may start mid-document. No padding, no wasted compute.
* ``pad``: each document + EOS is one block, truncated to ``n_ctx`` tokens when longer (the EOS is
  then cut off) and right-padded with the pad id when shorter; the real length is stored too.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Deque, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mmtrain.data.tokenizer import Tokenizer

PACKING_MODES = ("concat", "pad")


def is_validation(doc_index: int, seed: int, val_fraction: float) -> bool:
    """Whether document ``doc_index`` (0-based position in the corpus) is held out.

    A seeded hash of the index, so the decision needs no global view of the corpus (streaming),
    is the same for every n_ctx, and does not depend on max_docs or on the other documents.
    """
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ConcatPacker:
    """Joins documents (each followed by EOS) and cuts the stream into blocks of ``n_ctx`` tokens."""

    def __init__(self, n_ctx: int, eos_id: int, dtype: np.dtype):
        self.n_ctx, self.eos_id = n_ctx, eos_id
        self.buffer = np.empty(n_ctx, dtype)
        self.fill = 0

    def add(self, ids: np.ndarray) -> Iterator[Tuple[np.ndarray, int]]:
        """Feed one document's ids (without EOS); yields each completed ``(block, n_ctx)``."""
        for piece in (ids, (self.eos_id,)):
            pos, n = 0, len(piece)
            while pos < n:
                take = min(self.n_ctx - self.fill, n - pos)
                self.buffer[self.fill:self.fill + take] = piece[pos:pos + take]
                self.fill += take
                pos += take
                if self.fill == self.n_ctx:
                    yield self.buffer.copy(), self.n_ctx
                    self.fill = 0

    def dropped(self) -> int:
        """Tokens left over at the end (fewer than one block); they are not written."""
        return self.fill


class PadPacker:
    """One block per document: ids + EOS, truncated to ``n_ctx`` or right-padded with ``pad_id``."""

    def __init__(self, n_ctx: int, eos_id: int, pad_id: int, dtype: np.dtype):
        self.n_ctx, self.eos_id, self.pad_id, self.dtype = n_ctx, eos_id, pad_id, dtype
        self.truncated = 0

    def add(self, ids: np.ndarray) -> Iterator[Tuple[np.ndarray, int]]:
        block = np.full(self.n_ctx, self.pad_id, self.dtype)
        length = min(len(ids) + 1, self.n_ctx)
        keep = min(len(ids), self.n_ctx)
        block[:keep] = ids[:keep]
        if keep < self.n_ctx:
            block[keep] = self.eos_id
        self.truncated += len(ids) + 1 - length
        yield block, length

    def dropped(self) -> int:
        return self.truncated


def make_packer(packing: str, n_ctx: int, eos_id: int, pad_id: int, dtype: np.dtype):
    if packing == "concat":
        return ConcatPacker(n_ctx, eos_id, dtype)
    if packing == "pad":
        return PadPacker(n_ctx, eos_id, pad_id, dtype)
    raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")


# ---------------------------------------------------------------------------------------------
# Parallel encoding: documents are sent to worker processes in chunks; results come back in order.
# ---------------------------------------------------------------------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(model_proto: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_proto)


def encode_chunk(texts: Sequence[str], tokenizer: Optional[Tokenizer] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Encode texts into one flat int32 array plus per-text lengths (cheap to pickle)."""
    tok = tokenizer or _worker_tokenizer
    arrays = tok.encode_numpy(texts, num_threads=1)
    lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    flat = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
    return flat, lengths


def chunk_documents(docs: Iterable[str], max_docs: int = 512, max_chars: int = 1 << 20) -> Iterator[List[str]]:
    chunk: List[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_documents(docs: Iterable[str], tokenizer: Tokenizer, num_proc: int) -> Iterator[np.ndarray]:
    """Yield each document's token ids (int32), in corpus order, encoding on ``num_proc`` processes.

    At most ``2 * num_proc`` chunks are in flight, so memory stays bounded on any corpus size.
    """

    def split(result: Tuple[np.ndarray, np.ndarray]) -> Iterator[np.ndarray]:
        flat, lengths = result
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for i in range(len(lengths)):
            yield flat[offsets[i]:offsets[i + 1]]

    chunks = chunk_documents(docs)
    if num_proc <= 1:
        for chunk in chunks:
            yield from split(encode_chunk(chunk, tokenizer))
        return

    import multiprocessing as mp

    # fork (as torch's DataLoader does): workers start instantly and callers need no
    # `if __name__ == "__main__"` guard; spawn would re-import the caller's main module
    # (e.g. the training script, with torch and deepspeed) in every worker.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.serialized(),)) as pool:
        pending: Deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            while len(pending) >= 2 * num_proc:
                yield from split(pending.popleft().get())
        while pending:
            yield from split(pending.popleft().get())
