"""`mmtrain generate`: sample text from a bundle, streaming tokens to stdout.

The mixer, the transformer and the hybrid decode incrementally by default (``use_cache=True``;
the bidirectional mixer and the mixer autoencoder cannot generate and are refused): the prompt
goes through ``model.forward_step`` once, then each new token costs one step over the cached
state of the earlier positions (mixer: every layer's normalised inputs, O(L * d) per layer;
transformer: a KV cache; hybrid: both). ``use_cache=False`` runs a full forward pass over the
whole sequence for every token (the reference the cached path is tested against).

A sequence never grows past the model's ``n_ctx`` (the length it was trained on): generation stops
there with a message saying so. The prompt is prefixed with EOS, the end-of-document token that
precedes every document in the packed training data (``add_doc_start=False`` to skip it), and
generation stops when the model emits EOS (unless ``stop_at_eos=False``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

STOP_EOS, STOP_MAX_TOKENS, STOP_N_CTX = "eos", "max_new_tokens", "n_ctx"


@dataclass
class Generation:
    tokens: List[int]        # the new tokens (EOS included when it stopped generation)
    stop_reason: str         # eos | max_new_tokens | n_ctx
    seconds: float           # wall time of the decoding loop (prompt processing included)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [V] with everything outside the top-k / nucleus (top-p) set to -inf (keeps >= 1)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: Optional[torch.Generator]) -> int:
    """One token id from next-token logits [V]; temperature 0 = greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generation_refusal(model) -> str:
    """Why ``model`` cannot continue a text ('' when it can): models that read tokens after the
    predicted one (bidirectional mixer) or reconstruct their input (autoencoder) set
    ``generation_unsupported`` to the reason."""
    reason = getattr(model, "generation_unsupported", "")
    return f"cannot generate with model.kind={model.kind!r}: {reason}" if reason else ""


@torch.no_grad()
def generate(model, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True, eos_id: Optional[int] = 3,
             on_token: Optional[Callable[[int], None]] = None) -> Generation:
    """Continue ``prompt`` (token ids, 1..n_ctx of them) by up to ``max_new_tokens`` tokens.

    Stops at ``eos_id`` (None: never), after ``max_new_tokens``, or when the sequence reaches the
    model's n_ctx. ``on_token`` is called with every new token as soon as it is sampled.
    Deterministic for a given ``seed``. ValueError for a model that cannot generate
    (:func:`generation_refusal`).
    """
    refusal = generation_refusal(model)
    if refusal:
        raise ValueError(refusal)
    n_ctx = model.n_ctx
    if not 1 <= len(prompt) <= n_ctx:
        raise ValueError(f"the prompt is {len(prompt)} tokens; it must be 1..{n_ctx} (the model's n_ctx)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    new: List[int] = []
    start = time.perf_counter()
    cache = model.init_cache(1) if use_cache else None
    pending = torch.tensor([ids], device=device)   # tokens not yet fed to the model
    reason = STOP_MAX_TOKENS
    while len(new) < max_new_tokens:
        if len(ids) >= n_ctx:
            reason = STOP_N_CTX
            break
        if use_cache:
            logits = model.forward_step(pending, cache)[0, -1]
        else:
            logits = model(torch.tensor([ids], device=device)).logits[0, -1]
        token = sample_token(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id:
            reason = STOP_EOS
            break
        pending = torch.tensor([[token]], device=device)
    return Generation(tokens=new, stop_reason=reason, seconds=time.perf_counter() - start)


class TextStreamer:
    """Prints the text of new tokens as they come, decoding prompt + new tokens together (so the
    spaces SentencePiece encodes inside pieces come out right) and holding back an incomplete
    UTF-8 sequence of byte-fallback pieces until it is complete."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], out=None):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out or sys.stdout
        self.printed = len(tokenizer.decode(self.ids))

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def encode_prompt(tokenizer, text: str, add_doc_start: bool = True) -> List[int]:
    return ([tokenizer.eos_id] if add_doc_start else []) + tokenizer.encode(text)


def sampling_problems(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> List[str]:
    """What is wrong with sampling settings (empty when they are usable)."""
    problems = []
    if max_new_tokens < 0:
        problems.append(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 = all tokens), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    return problems


def _run(args) -> int:
    from mmtrain.export.bundle import BundleError, load_bundle_tokenizer, load_pretrained

    problems = sampling_problems(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if problems:
        print("mmtrain generate: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.bundle, device=args.device)
        tokenizer = load_bundle_tokenizer(args.bundle)
    except (BundleError, FileNotFoundError) as exc:
        print(f"mmtrain generate: {exc}", file=sys.stderr)
        return 2
    refusal = generation_refusal(model)
    if refusal:
        print(f"mmtrain generate: {args.bundle}: {refusal}", file=sys.stderr)
        return 2
    prompt = encode_prompt(tokenizer, args.prompt, not args.no_doc_start)
    if len(prompt) > model.n_ctx:
        print(f"mmtrain generate: the prompt is {len(prompt)} tokens"
              f"{' (with the document-start EOS)' if not args.no_doc_start else ''}, longer than the "
              f"model's n_ctx={model.n_ctx}; shorten it to at most {model.n_ctx} tokens", file=sys.stderr)
        return 2
    if not prompt:
        print("mmtrain generate: empty prompt (give --prompt text, or drop --no-doc-start)", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    result = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                      eos_id=None if args.ignore_eos else tokenizer.eos_id,
                      on_token=TextStreamer(tokenizer, prompt))
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(result.tokens)
    rate = n / result.seconds if result.seconds > 0 else float("inf")
    why = {STOP_EOS: "end of document (EOS)", STOP_MAX_TOKENS: f"--max-new-tokens {args.max_new_tokens}",
           STOP_N_CTX: f"reached the model's n_ctx={model.n_ctx} tokens (prompt {len(prompt)} + {n} new); "
                       "it cannot see further back, so generation stops here"}[result.stop_reason]
    print(f"[{n} tokens, {rate:.1f} tokens/s, {'uncached' if args.no_cache else 'cached'}; stopped: {why}]",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="sample text from a bundle (cached incremental decoding), streamed to stdout",
        description="Continue a prompt with an exported model. The mixer caches each layer's normalised "
                    "inputs, the transformer keys/values, so each new token costs one incremental step.")
    p.add_argument("bundle", help="directory written by `mmtrain export`")
    p.add_argument("--prompt", default="", help="text to continue (default: empty = start a document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="full forward pass per token (slow; for checking)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after an end-of-document token")
    p.add_argument("--no-doc-start", action="store_true",
                   help="do not put the document-start EOS in front of the prompt")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=_run)
