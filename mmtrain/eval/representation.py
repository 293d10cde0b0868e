"""`mmtrain analyze-representation`: how much of its input a model's hidden states keep.

The input-representation test of the masked-mixer paper (Badger, arXiv 2409.01482). For an input of L token ids x with embeddings E = W_E[x] [1, L, d]
and the output O = f_k(E) [1, L, d] of the model's first k blocks (before any final norm):

1. start from a random embedding a0 ~ N(0, 1) [1, L, d] (seeded),
2. run ``steps`` steps of plain gradient descent on the input, weights frozen::

       a <- a - lr_t * grad_a D(f_k(a), O),   lr_t linear from lr (first step) to lr_end (last step)

   with D = ``l1``: sum |f_k(a) - O| over positions and width (the paper's choice), or
   ``cosine``: sum over positions of 1 - cos(f_k(a)_t, O_t),
3. map a back to tokens through the Moore-Penrose pseudo-inverse of the embedding matrix
   W_E [V, d]: logits = a · pinv(W_E) [L, V],
4. report the fraction of counted positions whose true token x_t is not among the 5 largest
   logits (the paper's modified Hamming metric): 0 = every token recovered, 1 = none.

Inputs are used at their real length (truncated to the model's n_ctx). With ``pad_to_n_ctx``
they are right-padded with the pad id to n_ctx, as the paper does; pads are then part of O but
not counted by the metric. The model comes from an exported bundle (trained) or from a pretrain
config built with a seed (untrained: the paper's first finding is about untrained models).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mmtrain.config import register_validator
from mmtrain.data.errors import DataError
from mmtrain.data.schema import DataConfig, validate_data
from mmtrain.export.bundle import BundleError
from mmtrain.models.schema import ModelConfig, validate_model

DISTANCES = ("l1", "cosine")
INITS = ("unit", "embedding")
TOP_K = 5
DEFAULT_TOKENIZER = "tokenizer/demo-bpe-4096.model"


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------


def token_logits(embeddings: torch.Tensor, embedding_weight: torch.Tensor,
                 pinv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits = a · pinv(W_E): embeddings [..., d], W_E [V, d] -> [..., V] (``pinv`` [d, V] may be
    passed to avoid recomputing it)."""
    if pinv is None:
        pinv = torch.linalg.pinv(embedding_weight.detach().float())
    return embeddings.float() @ pinv


def top_k_misses(embeddings: torch.Tensor, embedding_weight: torch.Tensor, ids: torch.Tensor,
                 counted: Optional[torch.Tensor] = None, k: int = TOP_K,
                 pinv: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """(positions whose true token is not in the top-k of ``token_logits``, counted positions).

    embeddings [L, d] (or [B, L, d]), ids [L] (or [B, L]) the true tokens, counted [L] bool
    (None = all positions). ``misses / positions`` is the paper's metric (0 = perfect).
    """
    logits = token_logits(embeddings, embedding_weight, pinv)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices              # [..., L, k]
    hit = (top == ids.to(top.device)[..., None]).any(dim=-1)                 # [..., L]
    counted = torch.ones_like(hit) if counted is None else counted.to(hit.device).bool()
    return int((~hit & counted).sum()), int(counted.sum())


# --------------------------------------------------------------------------------------------
# Recovering an input from the output of the first k blocks
# --------------------------------------------------------------------------------------------


def representation_distance(output: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """D(f_k(a), O) for [1, L, d] tensors: ``l1`` sum |difference|; ``cosine`` sum over positions of
    1 - cosine similarity (over the width)."""
    if distance == "l1":
        return (output - target).abs().sum()
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(output, target, dim=-1)).sum()
    raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


def recover_input(model, target: torch.Tensor, k: int, steps: int = 500, lr: float = 0.02,
                  lr_end: float = 0.002, distance: str = "l1", seed: int = 0,
                  a0_std: float = 1.0) -> Tuple[torch.Tensor, float, float]:
    """Gradient descent on the input: returns (a [1, L, d], distance at a0, distance at the end).

    target O [1, L, d] = ``model.block_outputs(E, k)``; a0 ~ N(0, a0_std^2) drawn from ``seed``.
    The model's weights get no gradient.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = a0_std * torch.randn(target.shape, generator=generator, dtype=torch.float32)
    a = a.to(target.device, target.dtype)
    first = last = float("nan")
    for step in range(steps):
        a.requires_grad_(True)
        loss = representation_distance(model.block_outputs(a, k), target, distance)
        (grad,) = torch.autograd.grad(loss, a)
        if step == 0:
            first = float(loss.detach())
        rate = lr + (lr_end - lr) * (step / max(steps - 1, 1))
        a = (a - rate * grad).detach()
    with torch.no_grad():
        last = float(representation_distance(model.block_outputs(a, k), target, distance))
    return a, first, last


def analyze(model, inputs: Sequence[Sequence[int]], layers: Sequence[int], steps: int = 500, lr: float = 0.02,
            lr_end: float = 0.002, distance: str = "l1", seed: int = 0, pad_to_n_ctx: bool = False,
            pad_id: int = 0, init: str = "unit", progress=None) -> List[Dict[str, Any]]:
    """One row per k in ``layers``: the metric over all ``inputs`` (lists of token ids), summed
    over inputs as misses / counted positions, plus the start/end distances and seconds.

    Each input is analysed alone (its own a0, seeded ``seed + index``). ``init``: ``unit`` = the
    paper's a0 ~ N(0, 1) with the given learning rates; ``embedding`` = a0 ~ N(0, s^2) and both
    learning rates times s, where s = std(W_E), so the search starts at the scale of the model's
    real embeddings (under the gpt init, std 0.02, they are 50x smaller than N(0, 1)).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    weight = model.embedding.weight.detach().float()
    pinv = torch.linalg.pinv(weight)
    device = weight.device
    scale = float(weight.std()) if init == "embedding" else 1.0
    rows = []
    for k in layers:
        start = time.perf_counter()
        misses = positions = 0
        first = last = 0.0
        for index, ids in enumerate(inputs):
            ids = list(ids)[:model.n_ctx]
            counted = torch.ones(len(ids), dtype=torch.bool)
            if pad_to_n_ctx and len(ids) < model.n_ctx:
                counted = torch.cat([counted, torch.zeros(model.n_ctx - len(ids), dtype=torch.bool)])
                ids = ids + [pad_id] * (model.n_ctx - len(ids))
            x = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.no_grad():
                target = model.block_outputs(model.embedding(x).float(), k)
            a, d0, d1 = recover_input(model, target, k, steps, lr * scale, lr_end * scale, distance,
                                      seed + index, a0_std=scale)
            m, n = top_k_misses(a[0], weight, x[0], counted, pinv=pinv)
            misses, positions, first, last = misses + m, positions + n, first + d0, last + d1
        row = {"layers": int(k), "metric": misses / positions if positions else float("nan"),
               "misses": misses, "positions": positions, "distance_start": first, "distance_end": last,
               "a0_std": scale, "seconds": time.perf_counter() - start}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# --------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------


def parse_layers(values: Optional[Sequence[str]], num_blocks: int) -> List[int]:
    """``None`` -> [num_blocks]; ``['all']`` -> 1..num_blocks; else the given k (each 1..num_blocks)."""
    if not values:
        return [num_blocks]
    if list(values) == ["all"]:
        return list(range(1, num_blocks + 1))
    try:
        layers = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--layers: expected block counts (integers 1..{num_blocks}) or `all`, "
                         f"got {' '.join(values)}") from None
    bad = [k for k in layers if not 1 <= k <= num_blocks]
    if bad:
        raise ValueError(f"--layers {' '.join(map(str, bad))}: the model has {num_blocks} blocks, "
                         f"so each k must be in 1..{num_blocks}")
    return sorted(set(layers))


@dataclass
class UntrainedModelConfig:
    """A pretrain config as an untrained model reads it: its ``model`` and ``data`` sections are
    checked as pretraining checks them; the training sections are accepted as they are, unchecked,
    since nothing here trains (the pretrain schema itself belongs to the training package above)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: Any = None
    engine: Any = None
    logging: Any = None
    checkpoint: Any = None


def validate_untrained(cfg: DictConfig) -> List[str]:
    """The model and data checks of a pretrain config (load_config has checked each value's range)."""
    return validate_model(cfg.model, ranges=False) + validate_data(cfg.data)


register_validator(UntrainedModelConfig, validate_untrained)


def untrained_model(config_files: Sequence[str], overrides: Sequence[str], vocab_size: int, seed: int,
                    embedding_std: Optional[float] = None):
    """The model of a pretrain config, freshly initialised with ``torch.manual_seed(seed)``.

    ``embedding_std``: re-draw the input embedding from N(0, embedding_std^2) (the paper's mixer,
    like mmtrain's mixer family by default, keeps PyTorch's nn.Embedding default N(0, 1); its
    Llama, like mmtrain's transformer, uses 0.02). ``model.embedding_init_std=S`` as an override
    does the same through the model's own init.
    """
    from mmtrain.config import load_config
    from mmtrain.models import build_model

    cfg = load_config(UntrainedModelConfig, config_files, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size)
    if embedding_std is not None:
        with torch.no_grad():
            model.embedding.weight.normal_(0.0, embedding_std)
    return model, cfg


def config_tokenizer_path(cfg, given: Optional[str]) -> str:
    """The tokenizer for an untrained model: ``given``, the config's data.tokenizer, the shard dir's
    tokenizer.model, or the shipped demo tokenizer (first that is set / exists)."""
    if given:
        return given
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    shard_tokenizer = Path(cfg.data.shard_dir) / "tokenizer.model"
    return str(shard_tokenizer) if shard_tokenizer.is_file() else DEFAULT_TOKENIZER


def inputs_from_data(path: str, tokenizer, n_ctx: int, samples: int) -> List[List[int]]:
    """Token ids of the first ``samples`` inputs of ``path``: a directory written by ``mmtrain
    prepare`` (blocks of ``<path>/ctx<N>/val``, N = n_ctx if present, else the smallest N >= n_ctx,
    else the largest; cut to n_ctx), or a text file (documents separated by blank lines)."""
    source = Path(path)
    if source.is_dir():
        from mmtrain.data.shards import existing_ctx
        from mmtrain.eval.lm import read_blocks

        available = existing_ctx(str(source))
        if not available:
            raise DataError(f"--data {path}: a directory without ctx<N>/ shards (expected the output of "
                            "`mmtrain prepare`, or give a text file)")
        longer = [n for n in available if n >= n_ctx]
        n = n_ctx if n_ctx in available else (min(longer) if longer else max(available))
        blocks = read_blocks(str(source), n, "val", samples, tokenizer.sha256, tokenizer.vocab_size, samples)
        ids = torch.cat([b for b, _ in blocks])[:samples, :n_ctx]
        return [row.tolist() for row in ids]
    if source.is_file():
        text = source.read_text(encoding="utf-8")
        documents = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not documents:
            raise DataError(f"--data {path}: the file holds no text")
        return [tokenizer.encode(d)[:n_ctx] for d in documents[:samples]]
    raise DataError(f"--data {path}: no such file or directory (expected a shard directory or a text file)")


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| blocks k | metric (top-5 miss fraction) | misses / positions | D(a0) | D(a_end) | seconds |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['metric']:.3f} | {r['misses']} / {r['positions']} | "
                     f"{r['distance_start']:.4g} | {r['distance_end']:.4g} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, Any]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["layers"] for r in rows], [r["metric"] for r in rows], marker="o")
    ax.set_xlabel("blocks k")
    ax.set_ylabel("top-5 miss fraction (0 = perfect)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _check_args(args) -> None:
    positional = list(args.overrides or [])
    bundles = [v for v in positional if "=" not in v]
    args.overrides = [v for v in positional if "=" in v]
    args.bundle = bundles[0] if len(bundles) == 1 else None
    problems = []
    if len(bundles) > 1:
        problems.append(f"one bundle directory expected, got {len(bundles)}: {' '.join(bundles)}")
    elif bool(args.bundle) == bool(args.config):
        problems.append("give either a bundle directory or --config (an untrained model), not both or neither")
    if bool(args.text) == bool(args.data):
        problems.append("give either --text or --data")
    if args.steps < 1:
        problems.append(f"--steps {args.steps}: expected >= 1")
    if args.max_length < 0:
        problems.append(f"--max-length {args.max_length}: expected >= 0 (0 = n_ctx)")
    if args.samples < 1:
        problems.append(f"--samples {args.samples}: expected >= 1")
    if not (args.lr > 0 and args.lr_end > 0):
        problems.append(f"--lr {args.lr} / --lr-end {args.lr_end}: expected positive learning rates")
    if args.overrides and not args.config:
        problems.append(f"key=value overrides ({' '.join(args.overrides)}) only apply with --config")
    if args.embedding_std is not None and (not args.config or args.embedding_std <= 0):
        problems.append(f"--embedding-std {args.embedding_std}: only with --config, and > 0")
    if problems:
        raise ValueError("; ".join(problems))


def _run(args) -> int:
    from mmtrain.export.bundle import load_bundle_tokenizer, load_pretrained
    from mmtrain.data.tokenizer import load_tokenizer

    try:
        _check_args(args)
        if args.bundle:
            model = load_pretrained(args.bundle, device=args.device, dtype=torch.float32)
            tokenizer = load_bundle_tokenizer(args.bundle)
            source = f"{model.kind} bundle {args.bundle} (trained)"
        else:
            from mmtrain.config import load_config

            cfg = load_config(UntrainedModelConfig, args.config, args.overrides or [])
            tokenizer = load_tokenizer(config_tokenizer_path(cfg, args.tokenizer))
            model, _ = untrained_model(args.config, args.overrides or [], tokenizer.vocab_size, args.seed,
                                       args.embedding_std)
            model = model.to(args.device)
            embedding = "" if args.embedding_std is None else f", embedding N(0, {args.embedding_std}^2)"
            source = f"{model.kind} from {', '.join(args.config)} (untrained, seed {args.seed}{embedding})"
        layers = parse_layers(args.layers, model.num_blocks)
        length = min(args.max_length or model.n_ctx, model.n_ctx)
        if args.text:
            inputs = [tokenizer.encode(t)[:length] for t in args.text]
        else:
            inputs = [i[:length] for i in inputs_from_data(args.data, tokenizer, model.n_ctx, args.samples)]
        if any(len(i) == 0 for i in inputs):
            raise ValueError("an input encodes to no tokens")
    except (BundleError, DataError, FileNotFoundError, ValueError, NotImplementedError) as exc:
        print(f"mmtrain analyze-representation: {exc}", file=sys.stderr)
        return 2
    if not supports_block_outputs(model):
        print(f"mmtrain analyze-representation: model.kind={model.kind!r} does not implement run_blocks "
              "(running its first k blocks on given embeddings), so it cannot be analysed", file=sys.stderr)
        return 2
    length_note = ("padded to n_ctx (pads not counted)" if args.pad_to_n_ctx
                   else f"real length (truncated to {length} tokens)")
    print(f"{source}\nn_ctx {model.n_ctx}, d_model {model.d_model}, {model.num_blocks} blocks; "
          f"{len(inputs)} input(s) of {', '.join(str(len(i)) for i in inputs)} tokens, {length_note}\n"
          f"{args.steps} steps of gradient descent on the input, lr {args.lr} -> {args.lr_end}, "
          f"{args.distance} distance, a0 init {args.init}, seed {args.seed}\n", flush=True)
    rows = analyze(model, inputs, layers, args.steps, args.lr, args.lr_end, args.distance, args.seed,
                   args.pad_to_n_ctx, tokenizer.pad_id, args.init,
                   progress=lambda r: print(f"k={r['layers']}: metric {r['metric']:.3f} ({r['seconds']:.1f} s)",
                                            file=sys.stderr, flush=True))
    print(format_table(rows))
    report = {"source": source, "kind": model.kind, "n_ctx": model.n_ctx, "d_model": model.d_model,
              "num_blocks": model.num_blocks, "inputs": [len(i) for i in inputs], "pad_to_n_ctx": args.pad_to_n_ctx,
              "embedding_std": args.embedding_std, "init": args.init, "steps": args.steps, "lr": args.lr,
              "lr_end": args.lr_end, "distance": args.distance, "seed": args.seed, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot, source)
    return 0


def supports_block_outputs(model) -> bool:
    """Whether the model's class implements ``run_blocks`` (the base class only raises)."""
    from mmtrain.models.layers import CausalLM

    return type(model).run_blocks is not CausalLM.run_blocks


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze-representation", help="how accurately a model's hidden states represent its input",
        description="Recover the input of the first k blocks from their output by gradient descent on the "
                    "input, map it back to tokens through pinv(W_E) and report the fraction of tokens not in "
                    "the top-5 (0 = perfect; Badger, arXiv 2409.01482).")
    p.add_argument("overrides", nargs="*", metavar="BUNDLE | key=value",
                   help="the directory written by `mmtrain export` (a trained model), or with --config "
                        "key=value overrides of that config")
    p.add_argument("--config", action="append", metavar="YAML",
                   help="analyse an untrained model of this pretrain config instead of a bundle (repeatable)")
    p.add_argument("--embedding-std", type=float, metavar="S",
                   help="with --config: draw the input embedding from N(0, S^2) instead of the config's init "
                        "(the paper's mixer: 1.0, PyTorch's nn.Embedding default)")
    p.add_argument("--tokenizer", help="with --config: SentencePiece .model (default: the config's data.tokenizer, "
                                       f"<data.shard_dir>/tokenizer.model, or {DEFAULT_TOKENIZER})")
    p.add_argument("--text", action="append", help="an input text (repeatable: each is analysed separately)")
    p.add_argument("--data", metavar="PATH", help="a shard directory (`mmtrain prepare`; its val blocks) or a "
                                                  "text file (documents separated by blank lines)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="with --data: use the first K inputs (default 1)")
    p.add_argument("--layers", nargs="+", metavar="K",
                   help="numbers of blocks k to analyse, or `all` (1..n_layers); default: all blocks at once")
    p.add_argument("--steps", type=int, default=500, help="gradient-descent steps (default 500)")
    p.add_argument("--lr", type=float, default=0.02, help="first learning rate (default 0.02)")
    p.add_argument("--lr-end", type=float, default=0.002, help="last learning rate, linear decay (default 0.002)")
    p.add_argument("--distance", choices=DISTANCES, default="l1", help="l1 (default, the paper's) or cosine")
    p.add_argument("--init", choices=INITS, default="unit",
                   help="unit (default, the paper's): a0 ~ N(0, 1); embedding: a0 ~ N(0, s^2) and both learning "
                        "rates times s, s = std of the embedding matrix")
    p.add_argument("--max-length", type=int, default=0, metavar="N",
                   help="use at most N tokens of each input (default: the model's n_ctx)")
    p.add_argument("--pad-to-n-ctx", action="store_true",
                   help="right-pad every input with the pad id to n_ctx as the paper does (pads not counted); "
                        "default: the real length")
    p.add_argument("--seed", type=int, default=0, help="seed of a0 (input i uses seed + i) and of the untrained init")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="also plot the metric against k")
    p.set_defaults(func=_run)
