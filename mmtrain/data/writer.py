"""Writing the shards: one pass over the corpus fills every ctx directory, installed atomically.

Each ``<out>/ctx<N>`` is written into ``<out>/.ctx<N>.tmp-<pid>`` (MDS splits, a copy of the
tokenizer, then meta.json last) and renamed into place only when every requested n_ctx is done;
a replaced directory is swapped out in one atomic exchange and deleted after
(:func:`mmtrain.files.publish_dir`). A failed run removes its temporary directories; a killed
run leaves one that the next run deletes (its pid is gone).
Nothing named ``ctx<N>`` is ever incomplete.

With ``part`` (``mmtrain prepare --part I/N``, :mod:`mmtrain.data.parts`) only the part's documents
are tokenized and each split goes to ``ctx<N>/<split>/part-IIIII-of-NNNNN``, with the part's record
written last instead of meta.json. :func:`mmtrain.data.remote.upload_output` sends a finished output to an object store,
resumably, the file that marks completion last.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from omegaconf import DictConfig

from mmtrain.data import shards as S
from mmtrain.data.corpus import Corpus
from mmtrain.data.errors import DataError
from mmtrain.data.packing import encode_documents, is_validation, make_packer, token_dtype
from mmtrain.data.progress import progress_bar
from mmtrain.data.tokenizer import Tokenizer

SHARD_SIZE_LIMIT = 1 << 26  # bytes per MDS shard file (64 MiB)


def clean_stale(out: Path) -> None:
    """Finish what killed runs left in ``out`` (:func:`mmtrain.files.clean_stale`: temporary dirs
    of dead pids are removed, an ``.old`` copy that is the only copy is restored). Call it while
    holding :func:`mmtrain.files.output_lock` on ``out``."""
    from mmtrain import files

    for target in files.leftover_targets(out, "ctx*"):
        files.clean_stale(target)


class _SplitWriter:
    """Packs one split of one n_ctx and writes its samples with an MDSWriter."""

    def __init__(self, directory: Path, n_ctx: int, packing: str, tok: Tokenizer, dtype: np.dtype):
        from mmtrain.data.streaming_compat import MDSWriter

        columns = {"tokens": f"ndarray:{dtype.name}:{n_ctx}"}
        if packing == "pad":
            columns["length"] = "int32"
        self.pad = packing == "pad"
        self.packer = make_packer(packing, n_ctx, tok.eos_id, tok.pad_id, dtype)
        self.writer = MDSWriter(out=str(directory), columns=columns, compression=None,
                                hashes=[S.SHARD_HASH], size_limit=SHARD_SIZE_LIMIT)
        self.samples = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        for block, length in self.packer.add(ids):
            # Fixed dtype and shape: the MDS encoding of the array is exactly its bytes. Passing
            # bytes skips streaming's per-sample parsing of the column type (4x faster writes).
            sample = {"tokens": block.tobytes()}
            if self.pad:
                sample["length"] = np.int32(length).tobytes()
            self.writer.write(sample)
            self.samples += 1
            self.tokens += length

    def finish(self) -> Dict[str, int]:
        self.writer.finish()
        stats = {"samples": self.samples, "tokens": self.tokens,
                 "dropped_tokens": self.packer.dropped()}
        if self.pad:
            stats["pad_tokens"] = self.samples * self.packer.n_ctx - self.tokens
        return stats

    def abort(self) -> None:
        try:
            self.writer.cancel_future_jobs()
        except Exception:
            pass


def _meta(n_ctx: int, cfg: DictConfig, tok: Tokenizer, tok_source_path: str, dtype: np.dtype,
          splits: Dict[str, Dict[str, int]], corpus: Corpus, recipe: Dict[str, Any]) -> Dict[str, Any]:
    from mmtrain.data.streaming_compat import STREAMING_VERSION

    return {
        "format_version": S.FORMAT_VERSION,
        "n_ctx": n_ctx,
        "packing": cfg.packing,
        "token_dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id, "unk_id": tok.unk_id,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_path": tok_source_path,
        "tokenizer_file": S.TOKENIZER_NAME,
        "splits": splits,
        "source": corpus.describe(),
        "prepare": recipe,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "streaming_version": STREAMING_VERSION,
    }


def _check_both_splits_get_documents(corpus: Corpus, seed: int, val_fraction: float) -> None:
    """Before any tokenizing: read documents until each split has one (usually a handful), so a
    corpus of one huge document fails in a moment instead of after tokenizing all of it."""
    seen, n = set(), 0
    for n, _ in enumerate(corpus, 1):
        seen.add("val" if is_validation(n - 1, seed, val_fraction) else "train")
        if len(seen) == len(S.SPLITS):
            return
    if n == 0:
        raise DataError(f"the corpus is empty: no non-empty documents in {corpus.describe()}")
    missing = [s for s in S.SPLITS if s not in seen]
    raise DataError(f"the {missing[0]} split would get no documents: the corpus has {n} document{'s' if n != 1 else ''} "
                    f"(val_fraction {val_fraction}, by document). Use more documents, split long ones (a "
                    f"plain-text `delimiter`, one document per line of a .jsonl), or change val_fraction.")


def _selected(corpus: Corpus, part: Optional[Tuple[int, int]], indices: deque, bar) -> Iterator[str]:
    """The documents to tokenize (all, or those of ``part``), their corpus positions appended to
    ``indices`` in the same order (the encoder yields in order)."""
    from mmtrain.data.parts import in_part

    for index, doc in enumerate(corpus):
        if part is not None:
            bar.update(1)
            if not in_part(doc, part):
                continue
        indices.append(index)
        yield doc


def write_shards(cfg: DictConfig, corpus: Corpus, tok: Tokenizer, n_ctx_list: List[int], out: Path,
                 recipe: Dict[str, Any], progress: bool = True,
                 part: Optional[Tuple[int, int]] = None) -> Dict[int, Dict[str, Any]]:
    """Tokenize the corpus once and write ``<out>/ctx<N>`` for every N in ``n_ctx_list``; with
    ``part`` = (I, N), only that part of each (:mod:`mmtrain.data.parts`). Returns n_ctx -> meta
    (a part: its record)."""
    from mmtrain.data import parts as P

    dtype = token_dtype(tok.vocab_size)
    if part is None:
        tmp_dirs = {n: out / f".ctx{n}.tmp-{os.getpid()}" for n in n_ctx_list}
    else:
        tmp_dirs = {n: P.tmp_dir(out, n, part) for n in n_ctx_list}
    writers: Dict[Tuple[int, str], _SplitWriter] = {}
    docs = {split: {"documents": 0, "document_tokens": 0} for split in S.SPLITS}
    _check_both_splits_get_documents(corpus, int(cfg.seed), float(cfg.val_fraction))
    try:
        for n, tmp in tmp_dirs.items():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for split in S.SPLITS:
                writers[n, split] = _SplitWriter(tmp / split, n, cfg.packing, tok, dtype)
        seed, val_fraction = int(cfg.seed), float(cfg.val_fraction)  # plain values: OmegaConf access is slow
        indices: deque = deque()
        with progress_bar(progress, desc="tokenizing + packing", unit=" docs",
                          total=cfg.max_docs or None) as bar:
            for ids in encode_documents(_selected(corpus, part, indices, bar), tok, int(cfg.num_proc)):
                index = indices.popleft()   # the document's position in the whole corpus
                split = "val" if is_validation(index, seed, val_fraction) else "train"
                docs[split]["documents"] += 1
                docs[split]["document_tokens"] += len(ids) + 1
                for n in n_ctx_list:
                    writers[n, split].add(ids)
                if part is None:
                    bar.update(1)
                if index % 256 == 0:
                    bar.set_postfix(tokens=sum(d["document_tokens"] for d in docs.values()), refresh=False)
        if part is None and docs["train"]["documents"] + docs["val"]["documents"] == 0:
            raise DataError(f"the corpus is empty: no non-empty documents in {corpus.describe()}")
        results: Dict[int, Dict[str, Any]] = {}
        tok_path = str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else str((out / S.TOKENIZER_NAME).resolve())
        with progress_bar(progress, desc="writing shards", total=len(tmp_dirs) * len(S.SPLITS),
                          unit=" splits") as finishing:
            for n, tmp in tmp_dirs.items():
                splits = {}
                for split in S.SPLITS:
                    finishing.set_postfix(ctx=n, split=split, refresh=False)
                    stats = writers[n, split].finish()
                    if stats["samples"] == 0 and part is None:   # a part may hold none: the merge checks the sum
                        d = docs[split]
                        raise DataError(
                            f"the {split} split of n_ctx={n} would have no samples ({d['documents']} "
                            f"documents, {d['document_tokens']} tokens; a block needs {n}). Use more "
                            f"documents, a larger val_fraction, a smaller n_ctx, or packing=pad.")
                    stats.update(docs[split])
                    stats["bytes"] = S.split_bytes(tmp / split)
                    splits[split] = {k: stats[k] for k in ("documents", "document_tokens", "samples", "tokens",
                                                           "dropped_tokens", "pad_tokens", "bytes") if k in stats}
                    finishing.update(1)
                meta = _meta(n, cfg, tok, tok_path, dtype, splits, corpus, recipe)
                if part is not None:
                    meta = {"kind": "prepare-part", "part": {"index": part[0], "count": part[1]}, **meta}
                    results[n] = meta
                    continue
                (tmp / S.TOKENIZER_NAME).write_bytes(tok.serialized())
                S.write_json_atomic(tmp / S.META_NAME, meta)  # last: marks the directory complete
                results[n] = meta
        for n, tmp in tmp_dirs.items():
            if part is None:
                S.replace_dir(tmp, S.ctx_dir(out, n))
            else:
                P.install(tmp, out, n, part, results[n], tok.serialized())
                shutil.rmtree(tmp, ignore_errors=True)
        return results
    except BaseException:
        for w in writers.values():
            w.abort()
        for tmp in tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Uploading a finished output to an object store
# ---------------------------------------------------------------------------------------------


STAGING_OUT = "out"


def staging_dir(url: str) -> Path:
    """The local directory an output to ``url`` is written into before the upload (claimed as the
    cache of that URL: :func:`mmtrain.data.remote.claim_cache`); the output is its ``out``, the
    upload records sit beside it."""
    from mmtrain.data import remote as R

    return R.claim_cache(R.default_cache_dir(url, "prepare"), url)
