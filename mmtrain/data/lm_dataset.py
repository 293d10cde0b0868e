"""Language-model samples from the shards of one context length, through mosaicml-streaming.

``build_lm_loader`` checks the shards (see :func:`mmtrain.data.shards.check_shards`), then
returns a ``StreamingDataLoader`` over an :class:`LMDataset`. Each sample is a dict:

* ``input_ids``: ``torch.long [n_ctx]``
* ``attention_mask``: ``torch.long [n_ctx]``, 1 for real tokens, 0 for padding (``pad`` packing only)

Distributed runs: streaming reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
from the environment (torchrun and the deepspeed launcher set them) and gives each rank a
disjoint share of every epoch; ``batch_size`` is per rank. Shuffling is seeded (``seed``) and
changes every epoch.

Resume: ``loader.state_dict()`` (identical on every rank; save rank 0's) records the epoch and
the number of samples consumed by all ranks; ``load_state_dict`` on a freshly built loader
continues with exactly the next batch. Train with :func:`iterate_forever`, which crosses epoch
boundaries without breaking that guarantee::

    loader = build_lm_loader("data/demo", 512, "train", 8, shuffle=True, seed=0, num_workers=2)
    if resume_state is not None:
        loader.load_state_dict(resume_state)
    for step, batch in zip(range(start_step, steps), iterate_forever(loader)):
        ...
        checkpoint["data"] = loader.state_dict()

Shared memory: every StreamingDataset registers a few /dev/shm blocks under the first free
numeric prefix and keeps them until its process exits (Python's resource tracker removes them
even after SIGKILL). Prefixes in use are skipped, and with local shards (``remote=None``)
streaming does not refuse a ``local`` directory another live dataset uses, so any number of
loaders over the same shards may live in one process (train + val, a loader rebuilt on resume,
one per test). streaming also leaves two lock files per dataset in the temp dir
(``/tmp/<prefix>_barrier_filelock``, ``..._cache_filelock``) that make later runs skip that
prefix; the process that registered a prefix removes them at exit. Leftover blocks of a dead
run are harmless (their prefix is skipped), so mmtrain
never calls ``streaming.base.util.clean_stale_shared_memory()``: it unlinks the blocks of *live*
datasets too, including other jobs' on a shared machine. Two processes that register at the very
same moment can collide (``FileExistsError``); :func:`build_lm_loader` and the pair loaders retry
then. Jobs given different ``MMTRAIN_SHM_NAMESPACE`` values never share a name
(:func:`mmtrain.data.streaming_compat.shm_namespace`); the tests run one namespace per worker.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from mmtrain.data import remote as R
from mmtrain.data import shards as S
from mmtrain.data.errors import DataError
from mmtrain.data.sources import CachedStream, Source, check_sources, source, wrapped_worker_error
from mmtrain.data.streaming_compat import StreamingDataLoader, StreamingDataset


def _remove_files(paths) -> None:
    """streaming leaves two lock files per dataset in the temp dir forever; drop ours at exit."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


class LMDataset(StreamingDataset):
    """A StreamingDataset over ``ctx<n_ctx>/<split>`` of one or more sources (a mixture) yielding
    ``input_ids`` (+ mask; + ``stream``, the index of the sample's source, for a mixture)."""

    def __init__(self, shard_dir: Union[str, Path, Sequence[Source]], n_ctx: int, split: str, *, batch_size: int,
                 shuffle: bool = False, seed: int = 0, meta: Optional[Dict[str, Any]] = None,
                 retries: int = R.DEFAULT_RETRIES, timeout: float = R.DEFAULT_TIMEOUT,
                 **streaming_kwargs: Any):
        srcs = as_sources(shard_dir)
        self.meta = meta if meta is not None else S.read_meta(srcs[0].local, n_ctx)
        self.n_ctx = int(n_ctx)
        self.padded = self.meta["packing"] == "pad"
        self.tag_streams = len(srcs) > 1
        streams = [CachedStream(url=R.child(src.url, f"ctx{int(n_ctx)}", split) if src.url else None,
                                local=str(S.split_dir(src.local, n_ctx, split).resolve()), retries=retries,
                                timeout=timeout, **src.weights())
                   for src in srcs]
        super().__init__(streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                         **streaming_kwargs)
        if self._unique_rank_world.is_local_leader:
            atexit.register(_remove_files, [self._shared_barrier.filelock_path, self._cache_filelock_path])

    def get_item(self, sample_id: int, retry: int = 7) -> Dict[str, torch.Tensor]:
        sample = super().get_item(sample_id, retry)
        tokens = np.asarray(sample["tokens"])
        item = {"input_ids": torch.from_numpy(tokens.astype(np.int64))}
        if self.padded:
            mask = np.zeros(self.n_ctx, np.int64)
            mask[:int(sample["length"])] = 1
            item["attention_mask"] = torch.from_numpy(mask)
        if self.tag_streams:
            shard_id, _ = self.spanner[sample_id]
            item["stream"] = torch.tensor(int(self.stream_per_shard[shard_id]))
        return item

    def on_exception(self, future) -> None:
        """A failed download thread stops the epoch (streaming's own behaviour), and its exception is
        kept for :meth:`__iter__` to raise, instead of being logged as a callback error while the
        epoch ends early without one."""
        exc = future.exception()
        if exc is not None:
            self.thread_failure = exc
            self._event.set()

    def __iter__(self):
        self.thread_failure = None
        try:
            yield from super().__iter__()
        except RuntimeError:
            self._raise_failure()
            raise
        self._raise_failure()

    def _raise_failure(self) -> None:
        failure = next((s.failure for s in self.streams if getattr(s, "failure", None)), None)
        if failure is None and getattr(self, "thread_failure", None) is not None:
            failure = self.thread_failure
            if not isinstance(failure, DataError):
                raise RuntimeError(f"the data loader's download thread failed: {failure!r}") from failure
        if failure is not None:
            raise failure from None


def as_sources(shard_dir: Union[str, Path, Sequence[Source]]) -> List[Source]:
    """A directory or URL as a one-source list; a list of sources as it is."""
    if isinstance(shard_dir, (str, Path)):
        return [source(str(shard_dir))]
    return list(shard_dir)


def _launcher_env() -> int:
    """Make the launcher's environment readable by streaming; returns the number of nodes.

    streaming groups ranks into nodes with ``LOCAL_WORLD_SIZE`` (set by torchrun). The deepspeed
    launcher sets ``LOCAL_SIZE`` instead; without the translation every rank would think it leads
    its own node and the ranks of one machine would fight over the same /dev/shm names.
    """
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world % local:
        raise DataError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local}")
    return world // local


def _new_dataset(*args: Any, **kwargs: Any) -> LMDataset:
    return new_streaming_dataset(LMDataset, *args, **kwargs)


def new_streaming_dataset(cls, *args: Any, **kwargs: Any):
    """Create a StreamingDataset; a single process retries when a concurrent one took the same shm prefix."""
    single = int(os.environ.get("WORLD_SIZE", 1)) == 1
    for attempt in range(5):
        try:
            return cls(*args, **kwargs)
        except FileExistsError:  # two processes registered the same /dev/shm prefix at once
            if attempt == 4 or not single:
                raise
            time.sleep(0.05 * (attempt + 1) * (1 + os.getpid() % 7))
    raise AssertionError("unreachable")


def build_lm_loader(shard_dir: Union[str, Path, Sequence[Source]], n_ctx: int, split: str, batch_size: int, *,
                    shuffle: bool, seed: int, num_workers: int,
                    expected_tokenizer_hash: Optional[str] = None,
                    expected_vocab_size: Optional[int] = None,
                    drop_last: bool = True, verify_hashes: bool = False,
                    num_canonical_nodes: int = 0, meta: Optional[Dict[str, Any]] = None,
                    retries: int = R.DEFAULT_RETRIES, timeout: float = R.DEFAULT_TIMEOUT,
                    cache_limit: Optional[Union[int, str]] = None,
                    predownload: Optional[int] = None) -> StreamingDataLoader:
    """Check the shards, then build a resumable ``StreamingDataLoader`` of per-rank batches.

    ``shard_dir``: a directory, a URL (streamed through its cache, :mod:`mmtrain.data.sources`) or
    a list of :class:`~mmtrain.data.sources.Source` (a mixture). Raises :class:`DataError` before
    any work when the shards are missing (the message has the ``mmtrain prepare`` command), made
    for another n_ctx / tokenizer / vocabulary, or damaged; ``meta`` (from
    :func:`~mmtrain.data.sources.check_sources`) says they were checked already.
    Batches are dicts of ``[batch_size, n_ctx]`` long tensors. ``num_canonical_nodes`` fixes
    streaming's sample order (0 = the number of physical nodes, streaming's default, so the order
    then depends on how many nodes run the job).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    srcs = as_sources(shard_dir)
    if meta is None:
        meta = check_sources(srcs, n_ctx, tokenizer_hash=expected_tokenizer_hash, vocab_size=expected_vocab_size,
                             splits=(split,), verify=verify_hashes, retries=retries, timeout=timeout)
    num_nodes = _launcher_env()
    extra: Dict[str, Any] = {}
    if cache_limit:
        extra["cache_limit"] = R.parse_bytes(cache_limit)
    if predownload:
        extra["predownload"] = int(predownload)
    # num_canonical_nodes = physical nodes is streaming's own default; passing it keeps the
    # workers from logging that they chose it.
    try:
        dataset = _new_dataset(srcs, n_ctx, split, batch_size=batch_size, shuffle=shuffle, seed=seed, meta=meta,
                               num_canonical_nodes=num_canonical_nodes or num_nodes, retries=retries,
                               timeout=timeout, **extra)
    except ValueError as exc:
        if isinstance(exc, DataError) or "cache_limit" not in str(exc):
            raise
        raise DataError(f"data.cache_limit {cache_limit}: {exc}") from None
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                               drop_last=drop_last, persistent_workers=False,
                               pin_memory=torch.cuda.is_available())


def iterate_forever(loader: StreamingDataLoader) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield batches endlessly, one epoch after another (each epoch reshuffled by streaming).

    Between any two batches, ``loader.state_dict()`` is exact: a loader rebuilt from it and
    iterated with ``iterate_forever`` yields the same batches as this one from that point on,
    also across epoch boundaries. Raises DataError if an epoch yields no batch twice in a row
    (fewer samples than one batch per rank with drop_last).
    """
    empty_epochs = 0
    while True:
        produced = False
        try:
            for batch in loader:
                produced = True
                yield batch
        except DataError as exc:   # from a worker process: its message without the traceback
            raise wrapped_worker_error(exc) from None
        empty_epochs = 0 if produced else empty_epochs + 1
        # A resumed state that sits exactly at the end of an epoch gives one empty pass.
        if empty_epochs >= 2:
            ds = loader.dataset
            raise DataError(f"{ds.streams[0].local}: an epoch yields no batch "
                            f"({ds.size} samples, batch_size {loader.batch_size} per rank, drop_last); "
                            "use a smaller batch size or more data")
