"""Progress bars of prepare, prepare-pairs, export, eval-lm, eval-retrieval and frozen-retrieval: drawn on a
terminal by rank 0, silent with --quiet, when stderr is not a terminal, or on another rank."""

from __future__ import annotations

import io
import re
import sys

import pytest

from conftest import ROOT

from mmtrain import cli
from mmtrain.data.progress import NullBar, progress_bar, show_progress
from mmtrain.data.tokenizer import DEMO_TOKENIZER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what is written to it."""

    def isatty(self):
        return True


class Pipe(io.StringIO):
    def isatty(self):
        return False


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def run_cli(argv, stderr):
    """``mmtrain <argv>`` with ``stderr`` as sys.stderr; its exit code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", stderr)
        return cli.main([str(a) for a in argv])


def finished(text: str, desc: str, total: int) -> bool:
    """Whether tqdm drew the bar ``desc`` complete at ``total``/``total``."""
    return re.search(rf"{re.escape(desc)}: 100%\|[^|\r\n]*\| {total}/{total} ", text) is not None


# ---- the helper ------------------------------------------------------------------------------


def test_a_bar_is_drawn_only_when_wanted_on_a_terminal_by_rank_zero(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress_bar(True, total=3, desc="work", unit=" items") as bar:
        assert not isinstance(bar, NullBar)
        bar.update(3)
    assert finished(term.getvalue(), "work", 3)

    for case in ("quiet", "pipe", "rank 1"):
        stream = Pipe() if case == "pipe" else Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("RANK", "1" if case == "rank 1" else "0")
        assert not show_progress(case != "quiet")
        with progress_bar(case != "quiet", total=3, desc="work") as bar:
            assert isinstance(bar, NullBar), case
            bar.update(2)
            bar.set_postfix(split="val", refresh=False)
            bar.set_description("other")
        assert bar.n == 2 and stream.getvalue() == "", case


def test_the_null_bar_iterates_what_it_wraps(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Pipe())
    bar = progress_bar(True, iter("abc"), desc="letters")
    assert isinstance(bar, NullBar) and list(bar) == ["a", "b", "c"] and bar.n == 3
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert list(progress_bar(True, iter("abc"), desc="letters")) == ["a", "b", "c"]


# ---- prepare / prepare-pairs (no model) ------------------------------------------------------


def prepare_args(out):
    return ["prepare", "--input", "demo", "--out", out, "--n-ctx", "32", "--max-docs", "40",
            "--tokenizer", DEMO_TOKENIZER, "--num-proc", "1", "val_fraction=0.2"]


@pytest.mark.parametrize("case", ["terminal", "quiet", "rank 1"])
def test_prepare_shows_its_bars_on_a_terminal_only(case, tmp_path, capsys, monkeypatch):
    if case == "rank 1":
        monkeypatch.setenv("RANK", "1")
    term = Terminal()
    assert run_cli(prepare_args(tmp_path / "out") + (["--quiet"] if case == "quiet" else []), term) == 0
    assert capsys.readouterr().out.count("written") == 2      # it did the work: both splits of ctx32
    if case == "terminal":
        assert finished(term.getvalue(), "tokenizing + packing", 40)
        assert finished(term.getvalue(), "writing shards", 2)
    else:
        assert term.getvalue() == ""


def test_prepare_is_silent_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert cli.main([str(a) for a in prepare_args(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("written") == 2 and captured.err == ""


def test_prepare_shows_the_tokenizer_training_bar(tmp_path, capsys):
    term = Terminal()
    args = ["prepare", "--input", "demo", "--out", tmp_path / "out", "--n-ctx", "32", "--max-docs", "60",
            "--vocab-size", "500", "--num-proc", "1", "val_fraction=0.2"]
    assert run_cli(args, term) == 0
    assert "(trained, vocab 500" in capsys.readouterr().out
    assert re.search(r"training tokenizer: 60 docs ", term.getvalue())


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """Demo pairs at n_ctx 32 with the demo tokenizer (the session bundles' tokenizer), made quietly."""
    out = tmp_path_factory.mktemp("progress") / "pairs"
    assert run_cli(["prepare-pairs", "--config", ROOT / "configs" / "pairs" / "demo.yaml", "--out", out,
                    "n_ctx=32", "max_pairs=200", "test_fraction=0.2", "--quiet"], Terminal()) == 0
    return out


@pytest.mark.parametrize("quiet", [False, True])
def test_prepare_pairs_shows_reading_mining_and_writing_bars(quiet, tmp_path, capsys):
    term = Terminal()
    args = ["prepare-pairs", "--config", ROOT / "configs" / "pairs" / "demo.yaml", "--out", tmp_path / "p",
            "n_ctx=32", "max_pairs=200", "hard_negatives=2"] + (["--quiet"] if quiet else [])
    assert run_cli(args, term) == 0
    printed = capsys.readouterr().out
    sizes = [int(n) for n in re.search(r"wrote .*: (\d+) train / (\d+) val / (\d+) test pairs", printed).groups()]
    if quiet:
        assert term.getvalue() == ""
        return
    text = term.getvalue()
    assert finished(text, "reading pairs", 200)
    assert finished(text, "tokenizing pairs", 2 * sum(sizes))   # queries and documents of the kept pairs
    assert finished(text, "mining 2 BM25 hard negatives", sizes[0])   # the training queries
    assert finished(text, "writing pair shards", sum(sizes))


# ---- eval-lm, eval-retrieval, frozen-retrieval (a bundle of the session) ----------------------


def eval_lm_args(exported_bundles, demo_shards):
    return ["eval-lm", exported_bundles["mixer_zero1"], "--data", demo_shards, "--n-ctx", "16", "32",
            "--max-sequences", "8", "--batch-size", "4"]


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_lm_shows_a_bar_per_context_length(quiet, exported_bundles, demo_shards, capsys):
    term = Terminal()
    assert run_cli(eval_lm_args(exported_bundles, demo_shards) + (["--quiet"] if quiet else []), term) == 0
    assert "| 16 | 16 |" in capsys.readouterr().out         # 8 blocks of 32 are 16 of 16
    if quiet:
        assert term.getvalue() == ""
    else:
        assert finished(term.getvalue(), "eval n_ctx=16", 2)  # 8 sequences in batches of 4
        assert finished(term.getvalue(), "eval n_ctx=32", 2)


def test_eval_lm_is_silent_when_stderr_is_not_a_terminal(exported_bundles, demo_shards, capsys):
    assert cli.main([str(a) for a in eval_lm_args(exported_bundles, demo_shards)]) == 0
    captured = capsys.readouterr()
    assert "| 32 | 8 |" in captured.out and captured.err == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_retrieval_shows_embedding_and_bm25_bars(quiet, exported_bundles, demo_pairs, capsys):
    bundle = exported_bundles["mixer_zero1"]
    term = Terminal()
    args = ["eval-retrieval", bundle, "--data", demo_pairs, "--bm25", "--n-candidates", "8", "--batch-size", "16"]
    assert run_cli(args + (["--quiet"] if quiet else []), term) == 0
    pool = int(re.search(r"\[test\]: (\d+) queries", capsys.readouterr().out).group(1))
    if quiet:
        assert term.getvalue() == ""
        return
    batches = -(-pool // 16)
    assert finished(term.getvalue(), f"{bundle} [test] queries", batches)
    assert finished(term.getvalue(), f"{bundle} [test] documents", batches)
    assert finished(term.getvalue(), "BM25", pool)


@pytest.mark.parametrize("quiet", [False, True])
def test_frozen_retrieval_shows_its_embedding_bars(quiet, exported_bundles, demo_pairs, tmp_path, capsys):
    term = Terminal()
    args = ["frozen-retrieval", "--config", ROOT / "configs" / "frozen_retrieval" / "demo.yaml",
            f"embeddings.bundle={exported_bundles['mixer_zero1']}", f"embeddings.pairs={demo_pairs}",
            f"out_dir={tmp_path / 'fr'}", "embeddings.batch_size=32", "device=cpu", "--embed-only"]
    assert run_cli(args + (["--quiet"] if quiet else []), term) == 0
    sizes = dict((s, int(n)) for s, n in re.findall(r"embedded (\w+): (\d+) queries", capsys.readouterr().out))
    assert set(sizes) == {"train", "val", "test"}      # every split of the pair shards
    if quiet:
        assert term.getvalue() == ""
        return
    for split, n in sizes.items():
        for side in ("queries", "documents"):
            assert finished(term.getvalue(), f"embedding {split} {side}", -(-n // 32)), (split, side)


@pytest.mark.parametrize("quiet", [False, True])
def test_export_shows_its_stages(quiet, trained_runs, tmp_path, capsys):
    term = Terminal()
    args = ["export", trained_runs["mixer_zero1"], "--out", tmp_path / "bundle"] + (["--quiet"] if quiet else [])
    assert run_cli(args, term) == 0
    assert "verified: reloaded logits match" in capsys.readouterr().out
    if quiet:
        assert term.getvalue() == ""
    else:
        assert finished(term.getvalue(), "export", 4)
