"""`mmtrain eval-lm`: loss, perplexity and bits per byte of a bundle on validation shards.

For each context length L the ``n_ctx``-token blocks of ``<shard_dir>/ctx<N>/<split>`` are cut into
``N // L`` consecutive blocks of L tokens (the tail of ``N % L`` tokens is dropped), exactly as
training evaluates shorter lengths; every block is scored on its own (position t predicts token
t+1; padding is never a target). A mixer built for ``n_ctx`` runs any L <= n_ctx exactly; the
transformer runs any L <= n_ctx too (causal attention). A model whose ``label_shift`` is 0 (the mixer
autoencoder) is scored the way it is trained: position t against token t (reconstruction).

- loss: mean next-token cross-entropy in nats over all target tokens,
- perplexity: exp(loss),
- bits per byte: total cross-entropy in bits / UTF-8 bytes of the target tokens' text (byte-fallback
  pieces count 1, special tokens such as the end-of-document EOS 0, and the space SentencePiece adds
  in front of a document's first piece 0), comparable across tokenizers.

Deterministic: samples are read in shard order without shuffling and summed in float64.

**Documents** (``--text INPUT ...``, :func:`eval_text`): raw documents, read as ``mmtrain prepare
--input`` reads them (``--held-out``: only those ``prepare`` puts in the val split), each scored on
its own as mmtrain's training data presents a document, after an EOS, and as lm-evaluation-harness's
``loglikelihood_rolling`` scores it: every token of the document is a target (the first one predicted
from the EOS), in disjoint windows of n_ctx targets (:func:`rolling_windows`). Reported: the token-level
loss (nats per document token) and perplexity exp(loss), and the harness's three numbers over the same
log-likelihoods: word perplexity exp(-LL / words), byte perplexity exp(-LL / bytes) and bits per byte
-LL / (bytes ln 2), with words and UTF-8 bytes counted on the raw text (the harness's wikitext rule).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mmtrain.export.bundle import BundleError, load_bundle_tokenizer, load_pretrained, read_bundle_config
from mmtrain.data.errors import DataError
from mmtrain.data.progress import add_quiet_argument, progress_bar


def token_bytes(tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token id: UTF-8 bytes of its text, and whether it starts with SentencePiece's space mark."""
    sp = tokenizer.sp
    n = tokenizer.vocab_size
    lengths = torch.zeros(n, dtype=torch.float64)
    leading_space = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            lengths[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
            leading_space[i] = piece.startswith("\u2581")
    return lengths, leading_space


def target_bytes(ids: torch.Tensor, table: Tuple[torch.Tensor, torch.Tensor], eos_id: int,
                 shift: int = 1) -> torch.Tensor:
    """Bytes of each target token ids[:, shift:] ([B, L-shift], float64); a document's first piece
    (after an EOS) loses the dummy-prefix space the tokenizer added."""
    lengths, leading_space = table
    targets = ids[:, shift:]
    previous = torch.cat((torch.full_like(ids[:, :1], -1), ids), dim=1)[:, shift:-1]  # -1: not seen
    return lengths[targets] - (leading_space[targets] & (previous == eos_id)).double()


def cut_blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, N] -> [B * (N // length), length]: each row cut into consecutive blocks, the tail of
    ``N % length`` dropped. Training's evaluation and eval-lm both cut this way."""
    k = x.shape[1] // length
    return x[:, :k * length].reshape(-1, length)


@torch.no_grad()
def evaluate_blocks(model, blocks: Iterable[Tuple[torch.Tensor, torch.Tensor]], lengths: Sequence[int],
                    table: Tuple[torch.Tensor, torch.Tensor], eos_id: int, progress: bool = False,
                    total: Optional[int] = None) -> List[Dict[str, Any]]:
    """Score batches of (input_ids [B, N], attention_mask [B, N]) at every L in ``lengths``.

    ``progress``: one bar per L counting its scored batches (of ``total``, when known)."""
    device = next(model.parameters()).device
    shift = getattr(model, "label_shift", 1)   # logits at t are scored against token t + shift
    sums = {L: {"nll": 0.0, "tokens": 0, "bytes": 0.0, "sequences": 0} for L in lengths}
    blocks = iter(blocks)
    first = next(blocks, None)   # reading starts (and checks the shards) before any bar is drawn
    bars = [progress_bar(progress and first is not None, desc=f"eval n_ctx={L}", total=total, unit=" batches",
                         position=i) for i, L in enumerate(lengths)]
    try:
        for ids, mask in itertools.chain([first] if first is not None else [], blocks):
            for L, bar in zip(lengths, bars):
                x, m = cut_blocks(ids, L), cut_blocks(mask, L)
                logits = model(x.to(device)).logits.float()
                nll = F.cross_entropy(logits[:, :L - shift].reshape(-1, logits.shape[-1]),
                                      x[:, shift:].reshape(-1).to(device),
                                      reduction="none").double().cpu().view(x.shape[0], L - shift)
                counted = (m[:, shift:] == 1)
                s = sums[L]
                s["nll"] += float((nll * counted).sum())
                s["tokens"] += int(counted.sum())
                s["bytes"] += float((target_bytes(x, table, eos_id, shift) * counted).sum())
                s["sequences"] += x.shape[0]
                bar.update(1)
    finally:
        for bar in bars:
            bar.close()
    results = []
    for L, s in sums.items():
        loss = s["nll"] / s["tokens"] if s["tokens"] else float("nan")
        results.append({"n_ctx": L, "loss": loss, "perplexity": math.exp(loss) if s["tokens"] else float("nan"),
                        "bits_per_byte": s["nll"] / math.log(2) / s["bytes"] if s["bytes"] else float("nan"),
                        "tokens": s["tokens"], "bytes": int(s["bytes"]), "sequences": s["sequences"]})
    return results


def read_blocks(shard_dir, n_ctx: int, split: str, batch_size: int, tokenizer_sha256: str,
                vocab_size: int, max_sequences: int = 0):
    """Batches (input_ids, attention_mask) of the split in shard order, checked against the bundle."""
    from mmtrain.data.lm_dataset import build_lm_loader

    loader = build_lm_loader(shard_dir, n_ctx, split, batch_size, shuffle=False, seed=0, num_workers=0,
                             expected_tokenizer_hash=tokenizer_sha256, expected_vocab_size=vocab_size,
                             drop_last=False)
    seen = 0
    for batch in loader:
        ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.long()
        if max_sequences:
            ids, mask = ids[:max_sequences - seen], mask[:max_sequences - seen]
        seen += ids.shape[0]
        yield ids, mask
        if max_sequences and seen >= max_sequences:
            return


def source_ctx(shard_dir: str, model_n_ctx: int, lengths: Sequence[int], shard_ctx: Optional[int]) -> int:
    """Which ``ctx<N>`` shards to read: ``shard_ctx`` if given, else the model's n_ctx. (A URL is
    not listed: its ``ctx<N>`` is looked for when read.)"""
    from mmtrain.data.remote import is_remote
    from mmtrain.data.shards import existing_ctx

    n = shard_ctx or model_n_ctx
    available = [n] if is_remote(shard_dir) else existing_ctx(shard_dir)
    if n not in available:
        raise DataError(f"no shards for n_ctx={n} in {shard_dir} (found: "
                        f"{', '.join(f'ctx{a}' for a in available) or 'none'}); prepare them with "
                        f"`mmtrain prepare ... --n-ctx {n}` or pick one with --shard-ctx")
    too_long = [L for L in lengths if L > n or L > model_n_ctx or L < 2]
    if too_long:
        raise DataError(f"--n-ctx {', '.join(map(str, too_long))}: every length must be in 2..{min(n, model_n_ctx)} "
                        f"(model n_ctx {model_n_ctx}, shard blocks of {n} tokens)")
    return n


def batch_count(shard_dir: str, n_ctx: int, split: str, batch_size: int, max_sequences: int = 0) -> Optional[int]:
    """How many batches :func:`read_blocks` yields (from meta.json's sample count); None if unknown."""
    from mmtrain.data.shards import read_meta

    try:
        samples = int(read_meta(shard_dir, n_ctx)["splits"][split]["samples"])
    except (DataError, KeyError, TypeError, ValueError):
        return None
    if max_sequences:
        samples = min(samples, max_sequences)
    return -(-samples // batch_size)


def eval_lm(bundle: str, shard_dir: str, lengths: Optional[Sequence[int]] = None, split: str = "val",
            batch_size: int = 16, max_sequences: int = 0, shard_ctx: Optional[int] = None,
            device: str = "cpu", progress: bool = True) -> Dict[str, Any]:
    """Evaluate a bundle on ``<shard_dir>/ctx<N>/<split>``; returns {"results": [per-length dicts], ...}.

    ``progress``: a bar per context length (drawn only on a terminal, by rank 0:
    :mod:`mmtrain.data.progress`)."""
    section = read_bundle_config(bundle)
    model_n_ctx = section["model"]["n_ctx"]
    lengths = sorted(set(lengths or [model_n_ctx]))
    n = source_ctx(shard_dir, model_n_ctx, lengths, shard_ctx)
    model = load_pretrained(bundle, device=device)
    tokenizer = load_bundle_tokenizer(bundle)
    from mmtrain.data.remote import is_remote
    from mmtrain.data.sources import check_sources, source

    src = source(shard_dir)     # a URL: its cache, filled with meta.json and the index first
    check_sources([src], n, tokenizer_hash=tokenizer.sha256, vocab_size=model.vocab_size, splits=(split,))
    blocks = read_blocks([src], n, split, batch_size, tokenizer.sha256, model.vocab_size, max_sequences)
    results = evaluate_blocks(model, blocks, lengths, token_bytes(tokenizer), tokenizer.eos_id, progress,
                              batch_count(str(src.local), n, split, batch_size, max_sequences))
    data = shard_dir if is_remote(shard_dir) else str(Path(shard_dir).resolve())
    return {"bundle": str(Path(bundle).resolve()), "data": data, "split": split,
            "shard_n_ctx": n, "model": section["model"]["kind"], "results": results}


def rolling_windows(tokens: Sequence[int], prefix: int, n_ctx: int) -> List[Tuple[List[int], List[int]]]:
    """Windows that score every token of ``tokens`` once: ``[(input ids, target ids)]``; the last
    ``len(targets)`` positions of the input predict the targets. The first window is
    ``[prefix] + tokens[:n_ctx - 1]`` predicting ``tokens[:n_ctx]``; each later one predicts the next
    up to n_ctx tokens from the (at most) n_ctx tokens before the last of them
    (lm-evaluation-harness's ``get_rolling_token_windows`` with context_len 1, made disjoint)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(n_ctx, len(tokens))
    windows = [([prefix] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + n_ctx)
        windows.append((tokens[max(0, end - n_ctx - 1):end - 1], tokens[done:end]))
        done = end
    return windows


def read_documents(inputs: Sequence[str], text_field: str = "text", held_out: bool = False,
                   seed: int = 0, val_fraction: float = 0.05, max_documents: int = 0) -> List[str]:
    """Documents of ``inputs`` as ``mmtrain prepare`` reads them (stripped, empty ones skipped), with
    ``held_out`` only those it puts in the val split at ``seed`` / ``val_fraction``."""
    from mmtrain.data.corpus import Corpus
    from mmtrain.data.packing import is_validation

    docs = []
    for i, text in enumerate(Corpus(list(inputs), text_field=text_field)):
        if held_out and not is_validation(i, seed, val_fraction):
            continue
        docs.append(text)
        if max_documents and len(docs) >= max_documents:
            break
    if not docs:
        raise DataError(f"no {'held-out ' if held_out else ''}documents in {', '.join(map(str, inputs))}")
    return docs


@torch.no_grad()
def score_documents(model, tokenizer, documents: Sequence[str], n_ctx: int, batch_size: int = 16,
                    progress: bool = False) -> Dict[str, float]:
    """Total log-likelihood (float64) and count of every token of every document, each document
    after an EOS, in :func:`rolling_windows` of n_ctx."""
    device = next(model.parameters()).device
    windows = [w for text in documents for w in rolling_windows(tokenizer.encode(text), tokenizer.eos_id, n_ctx)]
    windows.sort(key=lambda w: -len(w[0]))   # similar lengths together: less padding
    total, tokens = 0.0, 0
    with progress_bar(progress, desc="eval documents", total=len(windows), unit=" windows") as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            x = torch.full((len(batch), max(len(ids) for ids, _ in batch)), tokenizer.pad_id, dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                x[row, :len(ids)] = torch.tensor(ids)   # right padding: a causal model's real positions never see it
            logp = torch.log_softmax(model(x.to(device)).logits.double(), dim=-1).cpu()
            for row, (ids, targets) in enumerate(batch):
                positions = torch.arange(len(ids) - len(targets), len(ids))
                total += float(logp[row, positions, torch.tensor(targets)].sum())
                tokens += len(targets)
            bar.update(len(batch))
    return {"loglikelihood": total, "tokens": tokens}


def word_count(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity (its wikitext rule)."""
    return len(re.split(r"\s+", text))


def not_a_language_model(section: Dict[str, Any]) -> Optional[str]:
    """What a bundle's config section holds when it is not a next-token language model ("a retrieval
    embedder", "a <kind> model"), else None."""
    from mmtrain.export.hf import GENERATIVE_KINDS

    if section.get("embedder"):
        return "a retrieval embedder"
    kind = section["model"]["kind"]
    return None if kind in GENERATIVE_KINDS else f"a {kind} model"


def eval_text(bundle: str, inputs: Sequence[str], held_out: bool = False, text_field: str = "text",
              seed: int = 0, val_fraction: float = 0.05, max_documents: int = 0, batch_size: int = 16,
              device: str = "cpu", progress: bool = True) -> Dict[str, Any]:
    """Score raw documents with a bundle (module docstring, "Documents")."""
    from mmtrain.export.hf import GENERATIVE_KINDS

    section = read_bundle_config(bundle)
    kind = section["model"]["kind"]
    other = not_a_language_model(section)
    if other:
        raise BundleError(f"{bundle}: --text scores next-token language models ({', '.join(GENERATIVE_KINDS)}); "
                          f"this bundle holds {other}")
    documents = read_documents(inputs, text_field, held_out, seed, val_fraction, max_documents)
    model = load_pretrained(bundle, device=device)
    tokenizer = load_bundle_tokenizer(bundle)
    n_ctx = int(section["model"]["n_ctx"])
    scored = score_documents(model, tokenizer, documents, n_ctx, batch_size, progress)
    ll, tokens = scored["loglikelihood"], scored["tokens"]
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    words = sum(word_count(d) for d in documents)
    loss = -ll / tokens
    return {"bundle": str(Path(bundle).resolve()), "data": [str(i) for i in inputs], "held_out": held_out,
            "model": kind, "n_ctx": n_ctx, "documents": len(documents), "tokens": tokens, "bytes": n_bytes,
            "words": words, "loglikelihood": ll, "loss": loss, "perplexity": math.exp(loss),
            "word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
            "bits_per_byte": -ll / n_bytes / math.log(2)}


def format_text_table(report: Dict[str, Any]) -> str:
    r = report
    return "\n".join([
        "| documents | tokens | loss | perplexity | word perplexity | byte perplexity | bits/byte |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['documents']:,} | {r['tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
        f"{r['word_perplexity']:.2f} | {r['byte_perplexity']:.4f} | {r['bits_per_byte']:.4f} |"])


def format_table(report: Dict[str, Any]) -> str:
    rows = ["| n_ctx | sequences | tokens | loss | perplexity | bits/byte |", "|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        rows.append(f"| {r['n_ctx']} | {r['sequences']:,} | {r['tokens']:,} | {r['loss']:.4f} | "
                    f"{r['perplexity']:.2f} | {r['bits_per_byte']:.4f} |")
    return "\n".join(rows)


def _run_text(args) -> int:
    try:
        report = eval_text(args.bundle, args.text, held_out=args.held_out, text_field=args.text_field,
                           seed=args.seed, val_fraction=args.val_fraction, max_documents=args.max_sequences,
                           batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    except (BundleError, DataError, FileNotFoundError) as exc:
        print(f"mmtrain eval-lm: {exc}", file=sys.stderr)
        return 2
    print(f"{report['model']} bundle {report['bundle']} (n_ctx {report['n_ctx']})\n"
          f"{'held-out ' if report['held_out'] else ''}documents of {', '.join(report['data'])}, each after EOS, "
          f"in windows of n_ctx\n")
    print(format_text_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _run(args) -> int:
    if args.text:
        return _run_text(args)
    if not args.data:
        print("mmtrain eval-lm: give --data SHARD_DIR (validation shards) or --text INPUT (raw documents)",
              file=sys.stderr)
        return 2
    try:
        report = eval_lm(args.bundle, args.data, args.n_ctx, split=args.split, batch_size=args.batch_size,
                         max_sequences=args.max_sequences, shard_ctx=args.shard_ctx, device=args.device,
                         progress=not args.quiet)
    except (BundleError, DataError, FileNotFoundError) as exc:
        print(f"mmtrain eval-lm: {exc}", file=sys.stderr)
        return 2
    print(f"{report['model']} bundle {report['bundle']}\n{report['split']} split of "
          f"{report['data']}/ctx{report['shard_n_ctx']}\n")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-lm", help="loss, perplexity and bits per byte of a bundle on validation shards",
        description="Evaluate an exported bundle on <data>/ctx<N>/<split> at one or more context lengths, or "
                    "on raw documents (--text) the way lm-evaluation-harness scores rolling perplexity.")
    p.add_argument("bundle", help="directory written by `mmtrain export`")
    p.add_argument("--data", metavar="SHARD_DIR", help="directory written by `mmtrain prepare`")
    p.add_argument("--text", nargs="+", metavar="INPUT",
                   help="instead of shards: raw documents (files, directories, globs or `demo`, as `mmtrain "
                        "prepare --input` reads them), each scored after EOS in windows of n_ctx, as "
                        "lm-evaluation-harness scores rolling perplexity")
    p.add_argument("--held-out", action="store_true",
                   help="with --text: only the documents `mmtrain prepare` holds out (its val split)")
    p.add_argument("--text-field", default="text", help="with --text: JSON key / Parquet column (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="with --held-out: prepare's val_fraction (0.05)")
    p.add_argument("--seed", type=int, default=0, help="with --held-out: prepare's split seed (0)")
    p.add_argument("--n-ctx", type=int, nargs="+", metavar="L",
                   help="context lengths to evaluate (each <= the model's n_ctx); default: the model's n_ctx")
    p.add_argument("--shard-ctx", type=int, default=None, metavar="N",
                   help="read <data>/ctx<N> (default: the model's n_ctx); blocks are cut to each L")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass (default 16)")
    p.add_argument("--max-sequences", type=int, default=0, metavar="K",
                   help="use only the first K blocks (with --text: documents) (default: all)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_quiet_argument(p)
    p.set_defaults(func=_run)
