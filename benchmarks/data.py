"""Streaming data-loader throughput vs the rate at which the default pretraining config consumes data.

1. Shards: ``--shard-dir`` when it holds ``ctx<n_ctx>/`` (default ``data/demo``, written by
   ``mmtrain prepare`` or the first ``python mmtrain/pretrain.py``); otherwise the demo corpus is
   prepared into a temporary directory with the shipped tokenizer (and removed afterwards).
2. Consumption: the default pretraining config (``PretrainConfig()``: d 256, 4-layer mixer,
   n_ctx 128, global batch 16 = micro-batch 8 x 2 accumulation steps, ZeRO 1, fp32) trains a few
   steps through the DeepSpeed engine in a forked process (random tokens: the model's cost does
   not depend on their values); tokens/s = global batch * n_ctx / median step time.
3. Loader: ``build_lm_loader`` (mosaicml-streaming ``StreamingDataset`` + ``StreamingDataLoader``,
   shuffled, the training split, micro-batch size) with num_workers 0, 1, 2: time to the first
   batch (worker start-up) and samples/s and tokens/s over the next ``--batches`` batches (or to
   the end of the epoch), measured alone, without training running beside it. Each setting reads
   the local shards, then (``--remote``, the default) the same ``ctx<n_ctx>`` directory uploaded
   to a bucket of an S3 server on 127.0.0.1 (moto's server mode), through the per-node cache:
   * cold cache: a new, empty cache directory, so every shard the measurement reads is downloaded
     during it (the time to the first batch includes fetching meta.json, the tokenizer, the index
     and the first shard);
   * warm cache: the same cache again, completed first (untimed) with any shard the cold pass did
     not reach, so nothing but meta.json and the index is fetched.
   The caches live in a temporary directory (``MMTRAIN_CACHE`` points there meanwhile, so
   ~/.cache is not touched) that is removed afterwards. Loopback S3 measures the client and cache
   path (requests, verification, file writes), not a network.

Ratio = loader tokens/s / training tokens/s (target: >= 10x, so the loader never limits training).

    python benchmarks/data.py                  # data/demo (or a temporary demo preparation)
    python benchmarks/data.py --quick          # 30 batches per setting, 2 training steps
    python benchmarks/data.py --no-remote      # local shards only (no S3 server)
    python benchmarks/data.py --shard-dir data/tinystories --n-ctx 512

Writes ``<out-dir>/data.{md,csv}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from _common import (ROOT, LoopbackS3, fmt, machine_info, markdown_table, median, preload_engine_modules,
                     quiet_deepspeed, report, run_isolated, single_process_env, timed_repeats)

#: Bucket and prefix the shards are uploaded to for the remote rows.
BUCKET, PREFIX = "mmtrain-bench", "demo"
SOURCES = {"local": "local directory", "cold": "S3 bucket (loopback), cold cache",
           "warm": "S3 bucket (loopback), warm cache"}


def training_rate(n_ctx: int, vocab_size: int, warmup: int, steps: int, threads: int) -> Dict[str, Any]:
    """Tokens/s of the default pretraining config through the engine (runs in a forked process)."""
    import torch

    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig
    from mmtrain.train.engine import build_engine, init_distributed
    from mmtrain.models import build_model

    if threads:
        torch.set_num_threads(threads)
    single_process_env()
    init_distributed("cpu")
    quiet_deepspeed()
    cfg = load_config(PretrainConfig, [], [f"model.n_ctx={n_ctx}", "engine.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size)
    engine, _ = build_engine(cfg, model, world_size=1)
    micro, gas = cfg.train.micro_batch_size, engine.gradient_accumulation_steps()
    input_ids = torch.randint(0, vocab_size, (micro, n_ctx))

    def step():
        for _ in range(gas):
            out = engine(input_ids, labels=input_ids)
            engine.backward(out.loss)
            engine.step()

    step_s = median(timed_repeats(step, torch.device("cpu"), warmup, steps))
    tokens = cfg.train.global_batch_size * n_ctx
    return dict(step_s=step_s, tokens_per_s=tokens / step_s, samples_per_s=cfg.train.global_batch_size / step_s,
                micro_batch_size=micro, global_batch_size=cfg.train.global_batch_size,
                description=(f"{cfg.model.kind} d {cfg.model.d_model} x {cfg.model.n_layers}, n_ctx {n_ctx}, "
                             f"global batch {cfg.train.global_batch_size} = {micro} x {gas}, "
                             f"ZeRO {cfg.engine.zero_stage}, {cfg.engine.precision}"))


def loader_rate(location: Union[Path, Sequence[Any]], n_ctx: int, batch_size: int, num_workers: int,
                batches: int) -> Dict[str, Any]:
    """Start-up time and steady samples/s, tokens/s of one StreamingDataLoader over the train split
    of ``location`` (a directory, or a list of :class:`~mmtrain.data.sources.Source`)."""
    from mmtrain.data.lm_dataset import build_lm_loader

    start = time.perf_counter()
    loader = build_lm_loader(location, n_ctx, "train", batch_size, shuffle=True, seed=0, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    first_s = time.perf_counter() - start
    samples = tokens = count = 0
    start = time.perf_counter()
    for batch in iterator:
        samples += batch["input_ids"].shape[0]
        tokens += batch["input_ids"].numel()
        count += 1
        if count >= batches:
            break
    seconds = time.perf_counter() - start
    del iterator, loader
    if count == 0:
        raise RuntimeError(f"{location}: the train split yields only one batch of {batch_size}; use --batch smaller")
    return dict(num_workers=num_workers, first_batch_s=first_s, batches=count, samples_per_s=samples / seconds,
                tokens_per_s=tokens / seconds)


def complete_cache(url: str, cache: Path, n_ctx: int, split: str) -> Tuple[int, int]:
    """Download into ``cache`` the shards of ``split`` it lacks (each checked against its index);
    returns (shard files that were already there, shards in the split)."""
    from mmtrain.data import remote as R
    from mmtrain.data import shards as S
    from mmtrain.data.sources import source, sync

    counts = sync(source(url, str(cache)), n_ctx, (split,), verify=True)
    sdir = S.split_dir(cache, n_ctx, split)
    shards = S.read_index(sdir)["shards"]
    for info in shards:
        raw = info.get("raw_data") or {}
        path = sdir / str(raw["basename"])
        if not path.is_file():
            R.download(R.child(url, f"ctx{n_ctx}", split, raw["basename"]), path,
                       expect=(raw.get("bytes"), (raw.get("hashes") or {}).get(S.SHARD_HASH)))
    return counts["cached"], len(shards)


def remote_rates(shard_dir: Path, n_ctx: int, batch_size: int, workers: Sequence[int],
                 batches: int) -> List[Dict[str, Any]]:
    """Cold- and warm-cache loader rates, per num_workers setting, of ``shard_dir``'s ``ctx<n_ctx>``
    uploaded to a bucket of a loopback S3 server; every cache (and the server) is removed after."""
    from mmtrain.data import shards as S
    from mmtrain.data.sources import source

    work = Path(tempfile.mkdtemp(prefix="mmtrain-data-bench-s3-"))
    saved_cache = os.environ.get("MMTRAIN_CACHE")
    os.environ["MMTRAIN_CACHE"] = str(work / "default-cache")
    try:
        with LoopbackS3(work / "moto.log") as s3:
            url = f"{s3.bucket(BUCKET)}/{PREFIX}"
            s3.upload_dir(S.ctx_dir(shard_dir, n_ctx), f"{url}/ctx{n_ctx}")
            records = []
            for w in workers:
                cache = Path(tempfile.mkdtemp(prefix=f"cache-w{w}-", dir=work))
                cold = loader_rate([source(url, str(cache))], n_ctx, batch_size, w, batches)
                cached, total = complete_cache(url, cache, n_ctx, "train")
                records.append(dict(cold, source=SOURCES["cold"], shards_in_cache_at_start=0,
                                    shards_downloaded=cached, shards_total=total))
                warm = loader_rate([source(url, str(cache))], n_ctx, batch_size, w, batches)
                records.append(dict(warm, source=SOURCES["warm"], shards_in_cache_at_start=total,
                                    shards_downloaded=0, shards_total=total))
            return sorted(records, key=lambda r: r["source"] != SOURCES["cold"])
    finally:
        if saved_cache is None:
            os.environ.pop("MMTRAIN_CACHE", None)
        else:
            os.environ["MMTRAIN_CACHE"] = saved_cache
        shutil.rmtree(work, ignore_errors=True)


def ensure_shards(args) -> Optional[Path]:
    """Point args.shard_dir at shards for args.n_ctx; returns a temporary directory to remove."""
    from mmtrain.data.shards import ctx_dir

    if (ctx_dir(args.shard_dir, args.n_ctx) / "meta.json").is_file():
        return None
    from mmtrain.data.prepare import demo_prepare_config, prepare

    tmp = Path(tempfile.mkdtemp(prefix="mmtrain-data-bench-"))
    overrides = {"max_docs": args.max_docs} if args.max_docs else {}
    print(f"  no shards for n_ctx {args.n_ctx} in {args.shard_dir}: preparing the demo corpus into {tmp}",
          file=sys.stderr, flush=True)
    prepare(demo_prepare_config(str(tmp), [args.n_ctx], **overrides), progress=False)
    args.shard_dir = tmp
    return tmp


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30 batches per setting, 2 timed training steps")
    p.add_argument("--shard-dir", type=Path, default=ROOT / "data" / "demo",
                   help="output of `mmtrain prepare` (default data/demo; prepared into a temp dir if absent)")
    p.add_argument("--n-ctx", type=int, default=128, help="context length (default 128, the default config's)")
    p.add_argument("--batch", type=int, default=8, help="loader batch size (default 8, the default micro-batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers settings (default 0 1 2)")
    p.add_argument("--batches", type=int, help="timed batches per setting after the first (default 300)")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 5)")
    p.add_argument("--remote", action=argparse.BooleanOptionalAction, default=True,
                   help="also read the shards from a bucket of a loopback S3 server (moto), with a cold and a warm "
                        "cache (default on; --no-remote: local shards only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for training (0 = torch's default)")
    p.add_argument("--max-docs", type=int, default=0, help="documents used when preparing the demo corpus (0 = all)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="where data.{md,csv} go (default runs/benchmarks)")
    args = p.parse_args(argv)
    args.batches = args.batches or (30 if args.quick else 300)
    args.train_steps = args.train_steps or (2 if args.quick else 5)
    problems = [f"--{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}"
                for k in ("n_ctx", "batch", "batches", "train_steps") if getattr(args, k) < 1]
    problems += [f"--workers: must be >= 0, got {w}" for w in args.workers if w < 0]
    if problems:
        p.error("\n  " + "\n  ".join(problems))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    quiet_deepspeed()
    preload_engine_modules()
    info = machine_info()
    tmp = ensure_shards(args)
    try:
        from mmtrain.data.shards import read_meta

        vocab_size = int(read_meta(args.shard_dir, args.n_ctx)["vocab_size"])
        # Training first, in a forked process: this process has then run no tensor work before forking.
        train = run_isolated(training_rate, args.n_ctx, vocab_size, 1, args.train_steps, args.threads)
        if "error" in train:
            raise RuntimeError(f"training-rate measurement failed: {train['error']}")
        loaders = [dict(loader_rate(args.shard_dir, args.n_ctx, args.batch, w, args.batches), source=SOURCES["local"])
                   for w in args.workers]
        if args.remote:
            loaders += remote_rates(args.shard_dir, args.n_ctx, args.batch, args.workers, args.batches)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    records = [dict(what=f"streaming loader, num_workers {r['num_workers']}",
                    ratio_vs_training=r["tokens_per_s"] / train["tokens_per_s"], **r) for r in loaders]
    records.append(dict(what="training consumption (default config)", source="—", tokens_per_s=train["tokens_per_s"],
                        samples_per_s=train["samples_per_s"], step_s=train["step_s"]))
    rows = [[r["what"], r["source"], fmt(r["samples_per_s"]), fmt(r["tokens_per_s"]),
             fmt(r["first_batch_s"], 2) if "first_batch_s" in r else "—",
             f"{r['ratio_vs_training']:.1f}x" if "ratio_vs_training" in r else "1.0x"] for r in records]
    text = markdown_table(["what", "source", "samples/s", "tokens/s", "first batch (s)", "ratio vs training"], rows,
                          align="llrrrr")
    setup = (f"shards {args.shard_dir} (ctx{args.n_ctx}, train split), batch {args.batch}, {args.batches} timed "
             f"batches per setting; training: {train['description']}, median of {args.train_steps} steps")
    if args.remote:
        setup += (f"; bucket: s3://{BUCKET}/{PREFIX} on a loopback moto S3 server, a new cache directory per "
                  "num_workers setting (cold), then the same one completed (warm)")
    report(args.out_dir, "data", info, setup, text, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
