"""`mmtrain eval-retrieval`: retrieval metrics of any bundle.

eval-retrieval embeds the queries and documents of a held-out split (pair shards from
``mmtrain prepare-pairs``, or a JSONL file split the same way), scores every query against every
document by cosine similarity and reports (see :mod:`mmtrain.eval.metrics`):

* the paper's protocol: top-1 accuracy with the positive among N candidates (N-1 random negatives
  from the pool, fixed seed), for each ``--n-candidates`` N (N <= pool size);
* the information-retrieval metrics users compare (sentence-transformers' InformationRetrievalEvaluator,
  MTEB), over the whole pool: recall@1/5/10/100, MRR@10, nDCG@10 and MAP@100;
* with ``--bm25``, the same metrics of an Okapi BM25 baseline over the same token ids.

Any bundle works: an untrained or only-pretrained one gives the frozen-embedding baseline. The
pooling of a trained embedder is read from its ``embedder`` section (written by `mmtrain export-embedder`);
bundles without one (pretrained LMs: the frozen-embedding baseline) pool with ``--pooling``
(default last; give the embedders' pooling to compare like with like).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mmtrain.data.progress import add_quiet_argument, progress_bar


@torch.no_grad()
def embed_arrays(encode, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 64,
                 device: Any = "cpu", progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """``encode(ids, lengths)`` over batches (sorted by length, so padding is cut) -> [N, d] float32.

    ``progress``: a bar of the batches, titled ``desc``."""
    order = np.argsort(lengths, kind="stable")
    out: List[Optional[np.ndarray]] = [None] * len(order)
    with progress_bar(progress, desc=desc, total=-(-len(order) // batch_size), unit=" batches") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            e = encode(torch.as_tensor(ids[idx], device=device), torch.as_tensor(lengths[idx], device=device))
            for i, row in zip(idx, e.float().cpu().numpy()):
                out[i] = row
            bar.update(1)
    return np.stack(out)


def score_split(encode, split: Dict[str, np.ndarray], n_candidates, seed: int = 0, batch_size: int = 64,
                device: Any = "cpu", progress: bool = False, desc: str = "") -> Dict[str, float]:
    """Embed queries and documents of a loaded split and compute the retrieval report (cosine scores).

    ``progress``: a bar per side, titled ``<desc> queries`` / ``<desc> documents``."""
    from mmtrain.eval.metrics import retrieval_report

    prefix = f"{desc} " if desc else "embedding "
    q = embed_arrays(encode, split["query_ids"], split["query_length"], batch_size, device, progress,
                     prefix + "queries")
    d = embed_arrays(encode, split["document_ids"], split["document_length"], batch_size, device, progress,
                     prefix + "documents")
    return retrieval_report(q @ d.T, np.arange(len(d)), n_candidates, seed)


DEFAULT_N = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def load_eval_split(bundle: str, data: str, split: str, query_field: str, document_field: str,
                    max_pairs: int = 0, seed: int = 0, test_fraction: float = 0.1, val_fraction: float = 0.1):
    """(split arrays, model n_ctx) from pair shards or JSONL, checked against the bundle's tokenizer."""
    import os

    from mmtrain.export.bundle import load_bundle_tokenizer, read_bundle_config
    from mmtrain.data.pairs import check_pairs, load_jsonl_split, load_split

    section = read_bundle_config(bundle)
    tok = load_bundle_tokenizer(bundle)
    n_ctx = int(section["model"]["n_ctx"])
    from mmtrain.data.pair_sources import local_pairs

    data = local_pairs(data, fetch=True)   # a URL of pair shards: their copy in the cache
    if os.path.isdir(data):
        check_pairs(data, tokenizer_sha256=tok.sha256, model_n_ctx=n_ctx, bundle=bundle)
        return load_split(data, split, max_pairs)
    return load_jsonl_split(data, tok, n_ctx, query_field, document_field, split, seed=seed,
                            test_fraction=test_fraction, val_fraction=val_fraction, max_pairs=max_pairs)


def evaluate_bundle(bundle: str, split_arrays: Dict[str, Any], n_candidates: List[int], *, pooling: Optional[str] = None,
                    seed: int = 0, batch_size: int = 64, device: str = "cpu", progress: bool = False,
                    desc: str = "") -> Dict[str, float]:
    """The retrieval report of a bundle's embeddings on a loaded split (``progress``: bars of the
    embedding batches, titled ``desc``)."""
    from mmtrain.export.bundle import load_pretrained, read_bundle_config
    from mmtrain.models.embedding import embed

    section = read_bundle_config(bundle)
    # a trained embedder always pools as it was trained; ``pooling`` is for LM-only bundles
    pooling = section.get("embedder", {}).get("pooling") or pooling or "last"
    model = load_pretrained(bundle, device=device)
    with torch.no_grad():
        return score_split(lambda i, l: embed(model, i, l, pooling), split_arrays, n_candidates, seed,
                           batch_size, device, progress, desc)


def bm25_report(split_arrays: Dict[str, Any], n_candidates: List[int], seed: int = 0,
                ignore_ids=(0, 3), progress: bool = False) -> Dict[str, float]:
    """BM25 over the token ids of the split (pad and EOS ignored); ``progress``: a bar of the queries."""
    from mmtrain.data.bm25 import BM25
    from mmtrain.eval.metrics import retrieval_report

    def tokens(ids, lengths):
        return [[t for t in row[:n].tolist() if t not in ignore_ids] for row, n in zip(ids, lengths)]

    docs = tokens(split_arrays["document_ids"], split_arrays["document_length"])
    queries = tokens(split_arrays["query_ids"], split_arrays["query_length"])
    with progress_bar(progress, desc="BM25", total=len(queries), unit=" queries") as bar:
        index = BM25(docs)
        rows = []
        for query in queries:   # BM25.score_matrix, one query at a time
            rows.append(index.scores(query))
            bar.update(1)
    scores = np.stack(rows) if rows else np.zeros((0, len(docs)))
    return retrieval_report(scores, np.arange(len(docs)), n_candidates, seed)


def _eval(args) -> int:
    from mmtrain.export.bundle import BundleError
    from mmtrain.data.errors import DataError
    from mmtrain.eval.metrics import check_n_candidates, format_table

    try:
        split = load_eval_split(args.bundle[0], args.data, args.split, args.query_field, args.document_field,
                                args.max_pairs, args.split_seed, args.test_fraction, args.val_fraction)
        for other in args.bundle[1:]:   # every bundle must share the tokenizer of the pairs
            load_eval_split(other, args.data, args.split, args.query_field, args.document_field, 1,
                            args.split_seed, args.test_fraction, args.val_fraction)
        pool = len(split["pair_id"])
        if args.n_candidates is None:
            n_list = [n for n in DEFAULT_N if n <= pool]
        else:
            n_list = list(args.n_candidates)
            for n in n_list:
                check_n_candidates(n, pool)
        rows: Dict[str, Dict[str, float]] = {}
        for bundle in args.bundle:
            rows[bundle] = evaluate_bundle(bundle, split, n_list, pooling=args.pooling, seed=args.seed,
                                           batch_size=args.batch_size, device=args.device,
                                           progress=not args.quiet, desc=f"{bundle} [{args.split}]")
        if args.bm25:
            rows["BM25"] = bm25_report(split, n_list, args.seed, progress=not args.quiet)
    except (BundleError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"mmtrain eval-retrieval: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.data} [{args.split}]: {pool} queries, pool of {pool} documents; top1@N: positive among N "
          f"candidates (seed {args.seed})")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"data": args.data, "split": args.split, "pool": pool, "seed": args.seed,
                       "n_candidates": n_list, "results": rows}, fh, indent=2)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-retrieval", help="retrieval metrics (recall@k, MRR@10, nDCG@10, MAP@100, top-1 among N) of bundles on held-out pairs",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  mmtrain eval-retrieval bundles/mixer bundles/mixer-retrieval --data data/pairs/demo "
               "--n-candidates 32 64 --bm25 --json out.json")
    p.add_argument("bundle", nargs="+", help="exported bundle directories (compared in one table)")
    p.add_argument("--data", required=True, help="pair shard dir or URL (mmtrain prepare-pairs), or a JSONL file")
    p.add_argument("--query-field", default="query", help="JSONL: query key (default query)")
    p.add_argument("--document-field", default="document", help="JSONL: document key (default document)")
    p.add_argument("--split", choices=["test", "val", "all"], default="test",
                   help="held-out test split (default), the val split carved from the training pairs, or all pairs")
    p.add_argument("--n-candidates", type=int, nargs="+", default=None, metavar="N",
                   help="N for top-1 among N (default: 32 64 ... 8192 up to the pool size)")
    p.add_argument("--pooling", choices=["last", "second_to_last", "mean"], default=None,
                   help="pooling of bundles without embedder settings, i.e. pretrained-only LMs (default last); "
                        "exported embedders always use their own")
    p.add_argument("--bm25", action="store_true", help="add an Okapi BM25 baseline row (token ids)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives (default 0)")
    p.add_argument("--max-pairs", type=int, default=0, help="evaluate the first N pairs only (0 = all)")
    p.add_argument("--split-seed", type=int, default=0, help="JSONL: split seed (as prepare-pairs seed)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="JSONL: test fraction (as prepare-pairs)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="JSONL: val fraction (as prepare-pairs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    add_quiet_argument(p)
    p.set_defaults(func=_eval)
