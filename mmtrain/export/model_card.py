"""``model_card.md`` of an exported bundle, rendered from its config.json (nothing else)."""

from __future__ import annotations

from typing import Any, Dict, List

_MIXER_MATH = """\
Masked mixer (Badger, arXiv 2409.01482). With `U = LayerNorm(H)` over the width d:

    H = H + TokenMixing(LayerNorm_token(H))        # mixes positions
    H = H + fc_out(GELU(fc_in(LayerNorm_mlp(H))))  # per position
    logits = lm_head(final_norm(H))                 # final_norm only when model.final_norm

Flat token mixing for a length-L input (L <= n_ctx) is `Y = W[:L, :L] @ U + b[:L, None]` per
sequence (W is stored already lower-triangular, so no mask is needed); multi-head mixing projects
with `in_proj`, mixes each head h with `mixing.weight[h]`, concatenates and applies `out_proj`;
expanded mixing is `contract.weight[:L, :e*L] @ GELU(expand.weight[:e*L, :L] @ U + expand.bias[:e*L, None])
+ contract.bias[:L, None]`. Linear layers compute `x @ weight.T + bias`; LayerNorm eps = `norm_eps`;
GELU is the exact (erf) form. There are no positional embeddings."""

_LLAMA_MATH = """\
Llama decoder (RMSNorm, rotary embeddings with rotate_half, SwiGLU MLP, untied LM head unless
tie_embeddings). Tensor names and config.json keys are Hugging Face's, so this loads with
`transformers.LlamaForCausalLM.from_pretrained(<this directory>)` and gives the same logits."""


_HYBRID_MATH = """\
Transformer + masked mixer hybrid ("transfixer"): Llama decoder layers (RMSNorm, rotary
embeddings, SwiGLU MLP) whose token mixing adds a causally masked n_ctx x n_ctx matrix
`Mix(U) = W[:L, :L] @ U + b[:L, None]` (W stored lower-triangular) to the attention:

    sequential:  a = Attn(RMSNorm(h));  h = h + a + Mix(a)
    parallel:    u = RMSNorm(h);        h = h + Attn(u) + Mix(u)
    both:        h = h + SwiGLU(RMSNorm(h))

Tensor names follow Hugging Face's Llama plus `model.layers.{i}.token_mixing.{weight,bias}`, which
`LlamaForCausalLM` does not have: load it with mmtrain, or with `AutoModelForCausalLM` and
`trust_remote_code=True` (the bundle's own modeling file)."""

_BIDIRECTIONAL_MATH = """\
Bidirectional masked mixer: a forward stream (token mixing masked with tril) and a reverse stream
(masked with triu, diagonal 2) over the same embeddings, with a shared MLP, summed after the last
block: `logits = lm_head(final_norm(x + y))`. Position n predicts token n+1 from the tokens <= n and
>= n+2 (a fill-in task, not left-to-right language modelling), so it cannot generate text and its
loss is not comparable with a causal model's."""

_AUTOENCODER_MATH = """\
Masked mixer autoencoder: encoder mixer blocks read the tokens; the last position's final hidden
state e (through an optional bottleneck) is repeated L times and decoded by causal mixer blocks;
`logits = lm_head(final_norm(decoder(repeat(e))))` with an unshifted loss: position t reconstructs
token t. It reconstructs a given text and cannot continue one."""

_MATH = {"mixer": _MIXER_MATH, "transformer": _LLAMA_MATH, "hybrid": _HYBRID_MATH,
         "bidirectional_mixer": _BIDIRECTIONAL_MATH, "mixer_autoencoder": _AUTOENCODER_MATH}
_TITLES = {"mixer": "masked mixer", "transformer": "Llama transformer",
           "hybrid": "transformer + masked mixer hybrid", "bidirectional_mixer": "bidirectional masked mixer",
           "mixer_autoencoder": "masked mixer autoencoder"}
_GENERATIVE = {"mixer", "transformer", "hybrid"}

# Config keys that mean nothing for a kind (left out of the card's table).
_MIXER_KEYS = {"mixer_heads", "mixer_expansion", "ffn_mult", "final_norm"}
_LLAMA_KEYS = {"n_heads", "n_kv_heads", "intermediate_size", "rope_theta"}
_VARIANT_KEYS = {"hybrid_mode", "encoder_layers", "decoder_layers", "compression"}
_OTHER_KIND_KEYS = {
    "mixer": _LLAMA_KEYS | _VARIANT_KEYS,
    "transformer": _MIXER_KEYS | _VARIANT_KEYS,
    "hybrid": _MIXER_KEYS | (_VARIANT_KEYS - {"hybrid_mode"}),
    "bidirectional_mixer": _LLAMA_KEYS | _VARIANT_KEYS,
    "mixer_autoencoder": _LLAMA_KEYS | {"hybrid_mode"},
}


def _table(rows: List[List[Any]], header: List[str]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(config: Dict[str, Any]) -> str:
    m = config["mmtrain"]
    model, source, training = m["model"], m.get("source", {}), m.get("training", {})
    kind = model["kind"]
    title = _TITLES.get(kind, kind)
    lines = [f"# {title}: d_model {model['d_model']}, {model['n_layers']} layers, n_ctx {model['n_ctx']}", ""]
    lines += [f"Exported by mmtrain {m['mmtrain_version']} from "
              f"`{source.get('checkpoint', 'a model in memory')}`"
              + (f" (step {source['step']}, {source.get('tokens_seen', 0):,} tokens seen)." if "step" in source else "."),
              ""]
    lines += ["## Load it", "", "```python", "from mmtrain import load_pretrained",
              "model = load_pretrained(\"<this directory>\")   # no training config, no deepspeed",
              "```", "",
              "```bash"]
    if kind in _GENERATIVE:
        lines += ["mmtrain generate <this directory> --prompt \"def \""]
    lines += ["mmtrain eval-lm <this directory> --data <shard_dir>",
              "mmtrain verify <this directory>   # weight sha256 digests (config.json), shapes, tokenizer",
              "```", ""]
    if kind == "transformer":
        lines += ["```python", "from transformers import LlamaForCausalLM   # checks no digests: mmtrain verify first",
                  "hf = LlamaForCausalLM.from_pretrained(\"<this directory>\")", "```", ""]
    elif kind in ("mixer", "hybrid", "mixer_autoencoder"):
        lines += ["```python", "from transformers import AutoModelForCausalLM   # pip install -e \".[hf]\"",
                  "hf = AutoModelForCausalLM.from_pretrained(\"<this directory>\", trust_remote_code=True)",
                  "```", ""]
    lines += ["## Model", ""]
    lines += _table([[k, _fmt(v)] for k, v in model.items() if k not in _OTHER_KIND_KEYS.get(kind, ())] + [["parameters", f"{m['num_params']:,}"],
                                                                   ["stored dtype", m["dtype"]]],
                    ["key", "value"])
    lines += ["", _MATH.get(kind, ""), ""]
    if training:
        lines += ["## Training", ""]
        lines += _table([[k, _fmt(v)] for k, v in training.items()], ["key", "value"])
        lines += [""]
    if source:
        lines += ["## Source checkpoint", ""]
        lines += _table([[k, _fmt(v)] for k, v in source.items()], ["key", "value"])
        lines += [""]
    if m.get("verification"):
        v = m["verification"]
        lines += ["## Verification", "",
                  f"Reloaded from this directory, the model's logits on a fixed batch of {v['tokens']} tokens "
                  f"differ from those of the checkpoint's {v['reference']} weights by at most "
                  f"{v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.1g}).", ""]
    tok = m["tokenizer"]
    lines += ["## Tokenizer", "",
              f"`{tok['file']}` (SentencePiece, sha256 `{tok['sha256']}`), special ids "
              + ", ".join(f"{k}={v}" for k, v in tok["special_ids"].items()) + ".", ""]
    lines += ["## Tensors", "", f"Files: {', '.join(m['weight_files'])}. {m['masked_weights'].capitalize()}."]
    if m.get("tied_weights"):
        lines += ["Tied (stored once): " + ", ".join(f"`{a}` = `{b}`" for a, b in m["tied_weights"].items()) + "."]
    lines += [""]
    lines += _table([[f"`{name}`", info["shape"], info["dtype"], info["description"]]
                     for name, info in m["tensors"].items()], ["name", "shape", "dtype", "meaning"])
    return "\n".join(lines) + "\n"
