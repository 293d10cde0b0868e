"""Generation speed: cached incremental decoding vs a full forward pass per token.

For the shipped d512 / 8-layer mixer and transformer configs at each n_ctx, a random-weight model
continues a random prompt of ``n_ctx - new_tokens`` tokens greedily up to n_ctx (the expensive end
of the context), once with the cache (mixer: each layer's normalised inputs; transformer: KV
cache) and once with a full forward pass per token; both must produce the same tokens. Prints a
markdown table of decoding speed: tokens/s = 1 / median time between consecutive new tokens
(robust to other processes on a shared machine; the prompt's forward pass before the first
token is reported apart as "prefill ms").

    python benchmarks/generate.py                       # n_ctx 512 and 1024, 32 new tokens, CPU
    python benchmarks/generate.py --n-ctx 512 --new-tokens 64 --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmtrain.config import load_config
from mmtrain.train.schema import PretrainConfig
from mmtrain.eval.generate import generate
from mmtrain.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
VOCAB = 4096


def timed_generation(model, prompt, new_tokens, use_cache, device):
    """(tokens, prefill seconds, decode tokens/s = 1 / median gap between new tokens)."""
    stamps = []

    def on_token(_):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache, eos_id=None, on_token=on_token)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return out.tokens, stamps[0] - start, 1.0 / gaps[len(gaps) // 2]


def bench(kind, n_ctx, new_tokens, device, dtype):
    cfg = load_config(PretrainConfig, [str(CONFIGS / f"{kind}-d512-ctx{n_ctx}.yaml")])
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, VOCAB, (n_ctx - new_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    for use_cache in (True, False):   # warm-up: allocator, kernels, caches at full size
        generate(model, prompt, 2, temperature=0, eos_id=None, use_cache=use_cache)
    cached, cached_prefill, cached_rate = timed_generation(model, prompt, new_tokens, True, device)
    uncached, uncached_prefill, uncached_rate = timed_generation(model, prompt, new_tokens, False, device)
    same = "yes" if cached == uncached else f"no ({sum(a == b for a, b in zip(cached, uncached))}/{new_tokens})"
    return dict(kind=kind, n_ctx=n_ctx, params=model.num_params(), cached=cached_rate, uncached=uncached_rate,
                cached_prefill=cached_prefill, uncached_prefill=uncached_prefill, same=same)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-ctx", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--kinds", nargs="+", default=["mixer", "transformer"], choices=["mixer", "transformer"])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated up to n_ctx (default 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {device}, {args.dtype}, {torch.get_num_threads()} CPU threads, greedy, batch 1, "
          f"prompt n_ctx-{args.new_tokens} tokens, {args.new_tokens} new tokens\n")
    print("| model | n_ctx | params | cached tok/s | uncached tok/s | speed-up | prefill ms (cached / uncached) "
          "| same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for n_ctx in args.n_ctx:
        for kind in args.kinds:
            r = bench(kind, n_ctx, args.new_tokens, device, dtype)
            print(f"| {kind} d512 x8 | {n_ctx} | {r['params'] / 1e6:.1f} M | {r['cached']:.1f} | {r['uncached']:.2f} "
                  f"| {r['cached'] / r['uncached']:.1f}x | {1e3 * r['cached_prefill']:.0f} / "
                  f"{1e3 * r['uncached_prefill']:.0f} | {r['same']} |", flush=True)


if __name__ == "__main__":
    main()
