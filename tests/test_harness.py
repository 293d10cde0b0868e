"""lm-evaluation-harness on bundles (`mmtrain eval-harness`, mmtrain/eval/harness.py) and its agreement
with `mmtrain eval-lm --text` on the same held-out documents."""

import json
import math

import pytest
import torch

from mmtrain.eval import harness as H
from mmtrain.eval.lm import eval_text, rolling_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CTX = 48
LIMIT = 10
#: Body excerpts that fit the test models' n_ctx with the demo tokenizer.
META = {"body_chars": 60}
KINDS = {
    "mixer": dict(kind="mixer"),
    "toeplitz": dict(kind="mixer", mixer_matrix="toeplitz", mixer_heads=2),
    "transformer": dict(kind="transformer", n_heads=2),
}


def needs_harness():
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("lm_eval", reason="the harness extra is not installed (pip install -e '.[harness]')")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Untrained mixer, Toeplitz mixer and transformer bundles (d 32, 2 layers, n_ctx 48, the demo tokenizer)."""
    from mmtrain.data.tokenizer import DEMO_TOKENIZER
    from mmtrain.export import bundle as B
    from mmtrain.models import build_model

    base = tmp_path_factory.mktemp("harness_bundles")
    out = {}
    for name, extra in KINDS.items():
        torch.manual_seed(0)
        model = build_model(dict(d_model=32, n_layers=2, n_ctx=N_CTX, **extra), 4096).eval()
        B.write_bundle(model, base / name, DEMO_TOKENIZER)
        out[name] = base / name
    return out


def test_rolling_windows_score_every_token_once_within_n_ctx_as_the_harness_does():
    for length in (1, 5, 8, 9, 17, 40):
        tokens = list(range(100, 100 + length))
        windows = rolling_windows(tokens, prefix=3, n_ctx=8)
        assert [t for _, targets in windows for t in targets] == tokens
        assert windows[0][0][0] == 3
        for ids, targets in windows:
            assert len(ids) <= 8 and len(targets) <= len(ids)
            # the last len(targets) positions predict the targets: input shifted by one
            assert (ids + [targets[-1]])[len(ids) - len(targets) + 1:] == targets
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        return
    tokens = list(range(100, 137))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 3, 8, 1)]
    # the harness feeds context + continuation[:-1] and scores the continuation
    assert rolling_windows(tokens, 3, 8) == [(list(c) + list(t)[:-1], list(t)) for c, t in theirs]


def test_the_tasks_are_the_demo_val_split_and_fixed_multiple_choice_items():
    from mmtrain.data.corpus import Corpus
    from mmtrain.data.packing import is_validation

    docs = H.held_out_documents()
    every = list(Corpus(["demo"]))
    assert docs == [d for i, d in enumerate(every) if is_validation(i, 0, 0.05)]
    assert 0.03 * len(every) < len(docs) < 0.07 * len(every)
    items = H.summary_items(docs)
    assert items == H.summary_items(docs) and len(items) > 50
    labels = set()
    for item in items:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert all(c.endswith("\n\n") and "\n" not in c.rstrip("\n") for c in item["choices"])
        summary = item["choices"][item["label"]].rstrip("\n")
        assert any(d.startswith(summary + "\n\n") and item["body"] in d for d in docs)
        assert 0 < len(item["body"]) <= H.BODY_CHARS
        labels.add(item["label"])
    assert labels == {0, 1, 2, 3}
    assert all(len(i["body"]) <= 60 for i in H.summary_items(docs, body_chars=60))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_harness_runs_every_kind_and_its_perplexity_is_eval_lm_texts(bundles, kind):
    """Same documents, same scoring: the harness's word / byte perplexity and bits per byte equal
    `eval-lm --text demo --held-out`'s, and its total log-likelihood is -loss x tokens."""
    needs_harness()
    report = H.evaluate(str(bundles[kind]), ["mmtrain_docstrings"], limit=LIMIT, metadata=META)
    ours = eval_text(str(bundles[kind]), ["demo"], held_out=True, max_documents=LIMIT, progress=False)
    ppl = report["results"]["mmtrain_docstrings_ppl"]
    assert report["samples"]["mmtrain_docstrings_ppl"] == LIMIT == ours["documents"]
    assert ours["tokens"] > LIMIT * N_CTX // 2        # several documents need more than one window
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ppl[metric] == pytest.approx(ours[metric], rel=1e-6), metric
    assert math.log(ours["byte_perplexity"]) * ours["bytes"] == pytest.approx(ours["loss"] * ours["tokens"], rel=1e-9)
    acc = report["results"]["mmtrain_docstrings_summary"]["acc"]
    assert report["samples"]["mmtrain_docstrings_summary"] == LIMIT and acc in {i / LIMIT for i in range(LIMIT + 1)}
    assert "add_bos_token=False" in report["command"] and f"max_length={N_CTX}" in report["command"]


def test_eval_harness_command_prints_the_table_json_and_the_lm_eval_command(bundles, tmp_path, capsys):
    needs_harness()
    from mmtrain.cli import main

    out = tmp_path / "harness.json"
    assert main(["eval-harness", str(bundles["mixer"]), "--tasks", "mmtrain_docstrings_ppl", "--limit", "3",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"| mmtrain_docstrings_ppl | 3 | bits_per_byte | {report['results']['mmtrain_docstrings_ppl']['bits_per_byte']:.4f} |" in text
    assert main(["eval-harness", str(bundles["mixer"]), "--print-command"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("lm_eval --model hf --model_args pretrained=") and "prefix_token_id=3" in line
    assert "--tasks mmtrain_docstrings " in line and str(H.TASKS_DIR) in line


def test_bad_input_is_refused_before_the_harness_runs(bundles, tmp_path, capsys):
    from mmtrain.cli import main
    from mmtrain.data.tokenizer import DEMO_TOKENIZER
    from mmtrain.export import bundle as B
    from mmtrain.models import build_model

    # a model whose n_ctx cannot hold the summary task's continuations: named, with a fix
    assert main(["eval-harness", str(bundles["mixer"]), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "more than the model's n_ctx 48" in err and '"body_chars"' in err
    assert main(["eval-harness", str(bundles["mixer"]), "--metadata", "[1]"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert main(["eval-harness", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # not a next-token language model: refused by both commands
    B.write_bundle(build_model(dict(kind="bidirectional_mixer", d_model=16, n_layers=1, n_ctx=16), 4096).eval(),
                   tmp_path / "bidirectional", DEMO_TOKENIZER)
    assert main(["eval-harness", str(tmp_path / "bidirectional")]) == 2
    assert "the harness scores language models (mixer, transformer, hybrid" in capsys.readouterr().err
    assert main(["eval-lm", str(tmp_path / "bidirectional"), "--text", "demo", "--held-out"]) == 2
    assert "--text scores next-token language models" in capsys.readouterr().err
    assert main(["eval-lm", str(bundles["mixer"])]) == 2
    assert "give --data SHARD_DIR" in capsys.readouterr().err
    needs_harness()
    assert main(["eval-harness", str(bundles["mixer"]), "--tasks", "no_such_task", "--limit", "2"]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err
