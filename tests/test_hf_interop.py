"""Hugging Face interop: every causal bundle loads with ``transformers`` (AutoConfig,
AutoModelForCausalLM, AutoModel, AutoTokenizer; trust_remote_code, offline) with mmtrain's logits
and greedy tokens; an embedder exported with ``--format sentence-transformers`` gives mmtrain's
retrieval embeddings through ``SentenceTransformer``; the snippets of docs/export.md run.

Needs the ``hf`` extra (and ``st`` for the sentence-transformers tests); skipped without them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # nothing here may reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import ROOT, train_in_process
from mmtrain import cli
from mmtrain.data.tokenizer import DEMO_TOKENIZER, load_tokenizer
from mmtrain.export import bundle as B
from mmtrain.export import hf as H
from mmtrain.models import build_model

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
transformers = H.import_transformers()

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, N_CTX = 4096, 32
LOCAL = dict(trust_remote_code=True, local_files_only=True)
KINDS = {
    "mixer_flat": dict(kind="mixer"),
    "mixer_heads_tied": dict(kind="mixer", mixer_heads=2, tie_embeddings=True),
    "mixer_expanded": dict(kind="mixer", mixer_expansion=2, final_norm=True),
    "mixer_toeplitz": dict(kind="mixer", mixer_matrix="toeplitz"),
    "mixer_toeplitz_heads": dict(kind="mixer", mixer_heads=2, mixer_matrix="toeplitz", mixing_init="uniform"),
    "hybrid": dict(kind="hybrid", n_heads=4, n_kv_heads=2),
    "hybrid_parallel_tied": dict(kind="hybrid", n_heads=4, hybrid_mode="parallel", tie_embeddings=True),
    "mixer_autoencoder": dict(kind="mixer_autoencoder", compression=2, encoder_layers=1),
}
CAUSAL = [name for name, extra in KINDS.items() if extra["kind"] != "mixer_autoencoder"]


def tiny_model(extra, seed=0):
    torch.manual_seed(seed)
    return build_model({**dict(d_model=32, n_layers=2, n_ctx=N_CTX, vocab_size=VOCAB), **extra}).eval()


def tokens(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{name: bundle dir} of tiny random models of every kind (the flat mixer sharded)."""
    base = tmp_path_factory.mktemp("hf_bundles")
    out = {}
    for name, extra in KINDS.items():
        shard = dict(max_shard_size=100_000) if name == "mixer_flat" else {}
        B.write_bundle(tiny_model(extra), base / name, DEMO_TOKENIZER, **shard)
        out[name] = base / name
    return out


def hf_causal_lm(bundle):
    return transformers.AutoModelForCausalLM.from_pretrained(bundle, **LOCAL).eval()


# --------------------------------------------------------------------------------------------
# transformers: causal LMs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_auto_model_for_causal_lm_has_mmtrains_logits_and_loss(name, bundles):
    bundle = bundles[name]
    config = transformers.AutoConfig.from_pretrained(bundle, **LOCAL)
    assert type(config).__name__ == "MmtrainConfig" and config.model_config["kind"] == KINDS[name]["kind"]
    assert config.max_position_embeddings == N_CTX and config.tie_word_embeddings == ("tied" in name)
    hf, ours = hf_causal_lm(bundle), B.load_pretrained(bundle)
    assert type(hf).__name__ == "MmtrainForCausalLM"
    for ids in (tokens(3, N_CTX), tokens(2, 17, seed=1)):
        with torch.no_grad():
            want, got = ours(ids, labels=ids), hf(ids, labels=ids)
        diff = float((got.logits - want.logits).abs().max())
        print(f"{name}: logits max |diff| {diff:.3g} on {tuple(ids.shape)}")
        assert diff <= 1e-5
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)   # autoencoder: unshifted
    if "tied" in name:
        assert hf.lm_head.weight is hf.get_input_embeddings().weight
    base = transformers.AutoModel.from_pretrained(bundle, **LOCAL).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(tokens(2, N_CTX)).last_hidden_state, ours.hidden_states(tokens(2, N_CTX)),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="outside 1..n_ctx=32"):
        hf(tokens(1, N_CTX + 1))


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generation_equals_mmtrain_generate(name, bundles):
    from mmtrain.eval.generate import encode_prompt, generate

    bundle = bundles[name]
    hf, ours = hf_causal_lm(bundle), B.load_pretrained(bundle)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle, **LOCAL)
    prompt = tokenizer("Return the value of")["input_ids"]
    assert prompt == encode_prompt(load_tokenizer(bundle / "tokenizer.model"), "Return the value of")
    for max_new in (12, 100):     # 100: both stop when the sequence reaches n_ctx
        want = generate(ours, prompt, max_new, temperature=0).tokens
        cached = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)[0, len(prompt):]
        full = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                           use_cache=False)[0, len(prompt):]
        print(f"{name}: greedy {len(want)} tokens equal: {cached.tolist() == want}")
        assert cached.tolist() == want and full.tolist() == want
    assert want[-1] == tokenizer.eos_token_id or len(prompt) + len(want) == N_CTX


def test_a_long_context_mixer_matches_through_the_packed_panels(tmp_path):
    from mmtrain.eval.generate import generate

    # n_ctx 300: mmtrain computes with 128-row packed panels, the Hugging Face model with masked dense matmuls
    B.write_bundle(tiny_model(dict(kind="mixer", n_ctx=300)), tmp_path / "b", DEMO_TOKENIZER)
    hf, ours = hf_causal_lm(tmp_path / "b"), B.load_pretrained(tmp_path / "b")
    ids = tokens(2, 300)
    with torch.no_grad():
        diff = float((hf(ids).logits - ours(ids).logits).abs().max())
    print(f"mixer n_ctx 300: logits max |diff| {diff:.3g}")
    assert diff <= 1e-5
    prompt = [3] + ids[0, :5].tolist()
    assert hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, 6:].tolist() == \
        generate(ours, prompt, 30, temperature=0).tokens


def test_the_autoencoder_reconstructs_and_refuses_to_generate(bundles):
    hf = hf_causal_lm(bundles["mixer_autoencoder"])
    assert hf.label_shift == 0
    with pytest.raises(ValueError, match="cannot continue a prompt"):
        hf.generate(torch.tensor([[3, 100, 101]]), max_new_tokens=2)


def test_padded_prompts_are_refused_and_batches_decode_like_single_prompts(bundles):
    hf = hf_causal_lm(bundles["mixer_expanded"])
    prompts = tokens(2, 5, seed=3)
    batch = hf.generate(prompts, max_new_tokens=6, do_sample=False, num_beams=2)
    alone = torch.cat([hf.generate(p[None], max_new_tokens=6, do_sample=False, num_beams=2) for p in prompts])
    assert torch.equal(batch, alone)
    with pytest.raises(ValueError, match="padded prompts"):
        hf.generate(prompts, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]), max_new_tokens=2)


def test_tokenizer_encodes_and_decodes_as_mmtrain(bundles):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundles["mixer_flat"], **LOCAL)
    ours = load_tokenizer(DEMO_TOKENIZER)
    texts = ["  Return the\tvalue\n\n", "", "</s><s><pad> are text here", "héllo ✓ 日本語 \U0001F600", "x" * 500]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert tokenizer.decode(ours.encode(text)) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 3 and tokenizer.model_max_length == N_CTX


def test_files_are_self_contained_and_mmtrain_does_not_import_transformers(bundles, tmp_path):
    allowed = {"modeling_mmtrain.py": {"torch", "transformers"}, "tokenization_mmtrain.py": {"transformers",
                                                                                           "sentencepiece"}}
    for file, third_party in allowed.items():
        tree = ast.parse((bundles["hybrid"] / file).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported - set(sys.stdlib_module_names) == third_party, (file, imported)
    code = ("import sys, torch; from mmtrain.models import build_model; from mmtrain.export import bundle as B; "
            "import mmtrain.export.exporter; from mmtrain.data.tokenizer import DEMO_TOKENIZER; "
            "m = build_model(dict(kind='hybrid', d_model=16, n_layers=1, n_ctx=8, vocab_size=4096, n_heads=2)); "
            f"B.write_bundle(m, {str(tmp_path / 'b')!r}, DEMO_TOKENIZER); "
            "bad = [x for x in ('transformers', 'sentence_transformers') if x in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b" / "modeling_mmtrain.py").is_file()


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------


def sentence_transformers():
    return pytest.importorskip("sentence_transformers",
                               reason="sentence-transformers is not installed (pip install -e '.[st]')")


def mmtrain_embeddings(bundle, texts):
    """What eval-retrieval computes for ``texts``: pair tokenization (truncated to n_ctx, EOS last),
    right padding, the embedder's pooling (mmtrain.eval.retrieval.embed_arrays)."""
    from mmtrain.data.pairs import encode_padded
    from mmtrain.eval.retrieval import embed_arrays
    from mmtrain.models.embedding import embed

    section = B.read_bundle_config(bundle)
    ids, lengths = encode_padded(B.load_bundle_tokenizer(bundle), texts, section["model"]["n_ctx"],
                                 section["embedder"].get("append_eos", True))
    model = B.load_pretrained(bundle)
    return embed_arrays(lambda i, n: embed(model, i, n, section["embedder"]["pooling"]), ids, lengths)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    """A 2-step contrastive run (ZeRO 0) from a tiny mixer bundle on 300 synthetic pairs (a few
    longer than n_ctx); returns (base dir, pairs JSONL)."""
    from mmtrain.train.contrastive import ContrastiveTask
    from mmtrain.train.schema import RetrievalConfig

    base = tmp_path_factory.mktemp("hf_retrieval")
    B.write_bundle(tiny_model(KINDS["mixer_flat"]), base / "base", DEMO_TOKENIZER)
    lines = [{"query": f"what is item {i} of kind {i % 7}?",
              "document": f"Item {i} has the value {i * 13}. " * (1 if i % 25 else 12)} for i in range(300)]
    (base / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["prepare-pairs", "--input", str(base / "pairs.jsonl"), "--bundle", str(base / "base"),
                     "--out", str(base / "pairs"), "n_ctx=0"]) == 0
    train_in_process(RetrievalConfig, ContrastiveTask, [ROOT / "configs" / "retrieval" / "tiny.yaml"],
                     [f"retrieval.bundle={base / 'base'}", f"data.shard_dir={base / 'pairs'}",
                      f"logging.run_dir={base / 'run'}", "train.steps=2", "train.eval_every=0", "checkpoint.every=0",
                      "engine.zero_stage=0"])
    return base, base / "pairs.jsonl"


@pytest.fixture(scope="module")
def st_embedder(retrieval_run):
    base, _ = retrieval_run
    assert cli.main(["export-embedder", str(base / "run"), "--out", str(base / "st"),
                     "--format", "sentence-transformers"]) == 0
    return base / "st"


def test_export_embedder_for_sentence_transformers_gives_eval_retrievals_embeddings(retrieval_run, st_embedder):
    st = sentence_transformers()
    from mmtrain.data.pairs import PAIR_SPLITS, clean_and_split, jsonl_pairs
    from mmtrain.eval.retrieval import embed_arrays, load_eval_split
    from mmtrain.models.embedding import embed

    _, pairs_file = retrieval_run
    model = st.SentenceTransformer(str(st_embedder), device="cpu", **LOCAL)
    assert B.read_bundle_config(st_embedder)["embedder"]["pooling"] == "mean"
    assert model.max_seq_length == N_CTX
    # the queries and documents as eval-retrieval reads them from the JSONL file (split "all"),
    # embedded as eval-retrieval embeds them
    split = load_eval_split(str(st_embedder), str(pairs_file), "all", "query", "document")
    splits, _ = clean_and_split(jsonl_pairs([str(pairs_file)], "query", "document"), 0, 0.1, 0.1)
    pairs = [p for s in PAIR_SPLITS for p in splits[s]]
    assert (split["document_length"] == N_CTX).any()          # some documents are truncated
    ours = B.load_pretrained(st_embedder)
    for column, texts in (("query", [q for q, _ in pairs]), ("document", [d for _, d in pairs])):
        want = embed_arrays(lambda i, n: embed(ours, i, n, "mean"), split[f"{column}_ids"], split[f"{column}_length"])
        got = model.encode(texts, normalize_embeddings=True, batch_size=32)
        cosine = (got * want).sum(1)
        print(f"sentence-transformers, {column} texts: min cosine {cosine.min():.7f} over {len(texts)}")
        assert cosine.min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("kind, pooling", [("mixer", "last"), ("hybrid", "second_to_last"),
                                           ("transformer", "second_to_last"), ("transformer", "mean"),
                                           ("mixer_toeplitz", "mean")])
def test_every_pooling_and_kind_round_trips(kind, pooling, tmp_path):
    st = sentence_transformers()
    model = {"mixer": dict(kind="mixer"), "hybrid": dict(kind="hybrid", n_heads=4),
             "transformer": dict(kind="transformer", n_heads=4, n_kv_heads=2),
             "mixer_toeplitz": dict(kind="mixer", mixer_heads=2, mixer_matrix="toeplitz")}[kind]
    config = B.write_bundle(tiny_model(model), tmp_path / "b", DEMO_TOKENIZER)
    config["mmtrain"]["embedder"] = {"pooling": pooling, "append_eos": True, "n_ctx": N_CTX}
    B.rewrite_config(tmp_path / "b", config)
    H.write_sentence_transformers(tmp_path / "b", config)
    texts = ["Return the value.", "", "A long document, " * 30, "héllo ✓"]
    got = st.SentenceTransformer(str(tmp_path / "b"), device="cpu", **LOCAL).encode(texts, normalize_embeddings=True)
    cosine = (got * mmtrain_embeddings(tmp_path / "b", texts)).sum(1)
    print(f"{kind} {pooling}: min cosine {cosine.min():.7f}")
    assert cosine.min() >= 0.9999


def test_sentence_transformers_format_is_refused_where_it_cannot_hold(bundles, retrieval_run, tmp_path, capsys):
    base, _ = retrieval_run
    config = json.loads((bundles["mixer_autoencoder"] / "config.json").read_text())
    config["mmtrain"]["embedder"] = {"pooling": "mean"}
    with pytest.raises(ValueError, match="depend on the padding of the batch"):
        H.write_sentence_transformers(tmp_path, config)
    with pytest.raises(ValueError, match="not an embedder bundle"):
        H.write_sentence_transformers(tmp_path, json.loads((bundles["mixer_flat"] / "config.json").read_text()))
    # the default format is the plain bundle: no sentence-transformers files, tokenizer set for embedding
    assert cli.main(["export-embedder", str(base / "run"), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "modules.json").exists()
    settings = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert settings["add_eos_token"] and not settings["add_doc_start"]


# --------------------------------------------------------------------------------------------
# The documented snippets (docs/export.md, linked from the README)
# --------------------------------------------------------------------------------------------

README_SECTION = "## Use with Hugging Face / sentence-transformers"
DOC = ROOT / "docs" / "export.md"


def readme_snippets():
    text = DOC.read_text(encoding="utf-8")
    assert README_SECTION in text, f"docs/export.md has no section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1]
    section = re.split(r"^## ", section, flags=re.M)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run(bundles, st_embedder, tmp_path, capsys):
    snippets = readme_snippets()
    assert len(snippets) >= 2
    shutil.copytree(bundles["mixer_flat"], tmp_path / "mixer")
    paths = {"bundles/mixer": tmp_path / "mixer", "bundles/embedder-st": st_embedder}
    for snippet in snippets:
        if "sentence_transformers" in snippet:
            sentence_transformers()
        for placeholder, path in paths.items():
            snippet = snippet.replace(f'"{placeholder}"', repr(str(path)))
        assert "bundles/" not in snippet, snippet
        exec(compile(snippet, "docs/export.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
