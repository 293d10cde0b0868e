"""TensorBoard that compares runs, read back through a real TensorBoard server's HTTP API.

One log directory holds a tiny pretraining run that was resumed (its first process got to step 5,
its last checkpoint is step 3: the resumed process redoes 4..6) and a tiny retrieval
run that starts from it. The server must show every scalar once with the values of metrics.jsonl,
one HParams row per run (hyperparameters from the config, metrics = the final values, the resumed
run once), the greedy samples of each evaluation (the last one equal to what the final model
generates) and the retrieval metrics table.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, free_port, pretrain_in_process, read_metrics, train_in_process

from mmtrain.train import monitor as mon

TENSORBOARD = Path(sys.executable).parent / "tensorboard"
TINY_RETRIEVAL = ROOT / "configs" / "retrieval" / "tiny.yaml"
DEMO_PAIRS = ROOT / "configs" / "pairs" / "demo.yaml"
LM, RET = "mixer/tensorboard", "retrieval/tensorboard"   # TensorBoard run names (relative to the logdir)
ALL_STATUSES = ["STATUS_FAILURE", "STATUS_RUNNING", "STATUS_SUCCESS", "STATUS_UNKNOWN"]   # as the dashboard asks


@pytest.fixture(scope="module")
def tb_runs(demo_shards, tmp_path_factory):
    from mmtrain import cli
    from mmtrain.export.exporter import export
    from mmtrain.train.contrastive import ContrastiveTask
    from mmtrain.train.schema import RetrievalConfig

    base = tmp_path_factory.mktemp("tensorboard")
    logdir = base / "runs"
    lm, ret = logdir / "mixer", logdir / "retrieval"
    args = ["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={lm}", "train.steps=6",
            "train.eval_every=3", "checkpoint.every=3", "engine.peak_flops=1e11"]
    pretrain_in_process(args + ["train.stop_at=5"])    # evaluates at 3 and 5, checkpoints 3 and 5
    # as if killed after step 5, before its checkpoint: the resumed run redoes 4 and 5
    shutil.rmtree(lm / "checkpoints" / "step_00000005")
    (lm / "checkpoints" / "latest").write_text("step_00000003")
    trainer = pretrain_in_process(args)
    final_samples = mon.samples_markdown(trainer.task.generate_samples(trainer.engine.module))   # the step-6 model
    export(str(lm), str(base / "bundle"))
    assert cli.main(["prepare-pairs", "--config", str(DEMO_PAIRS), "--bundle", str(base / "bundle"),
                     "--out", str(base / "pairs"), "n_ctx=0", "max_pairs=500"]) == 0
    train_in_process(RetrievalConfig, ContrastiveTask, [TINY_RETRIEVAL],
                     [f"retrieval.bundle={base / 'bundle'}", f"data.shard_dir={base / 'pairs'}",
                      f"logging.run_dir={ret}", "train.steps=4", "train.eval_every=2", "checkpoint.every=0",
                      "retrieval.eval_max_pairs=48", "retrieval.eval_train_pairs=48", "train.lr=2e-3"])
    return SimpleNamespace(logdir=logdir, lm=lm, ret=ret, final_samples=final_samples,
                           tokenizer_vocab=trainer.task.vocab_size)


class Server:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params):
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def session_groups(self):
        return self.post("/data/plugin/hparams/session_groups",
                         {"experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [],
                          "startIndex": 0, "sliceSize": 1000})["sessionGroups"]


@pytest.fixture(scope="module", params=["python", "rust"])
def server(request, tb_runs):
    """A TensorBoard server on the runs, with its Python loader (``--load_fast=false``) or its
    default Rust one (``--load_fast=true``: the ``tensorboard-data-server`` package)."""
    if not TENSORBOARD.is_file():
        pytest.skip(f"no tensorboard executable next to {sys.executable}")
    if request.param == "rust":
        try:
            from tensorboard_data_server import server_binary

            if not server_binary():
                raise ImportError
        except ImportError:
            pytest.skip("tensorboard-data-server (TensorBoard's Rust loader) has no binary for this platform")
    port = free_port()
    log = tempfile.TemporaryFile()   # the server's output (read when it fails)
    proc = subprocess.Popen([str(TENSORBOARD), "--logdir", str(tb_runs.logdir), "--host", "127.0.0.1",
                             "--port", str(port), f"--load_fast={'true' if request.param == 'rust' else 'false'}",
                             "--reload_interval=0"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        srv = Server(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:   # loaded: each run's session end info, the last event of its files, is read
            if proc.poll() is not None:
                raise AssertionError(f"tensorboard exited {proc.returncode}:\n{server_output(log)}")
            try:
                groups = srv.session_groups()
                if len(groups) == 2 and all(s.get("status") == "STATUS_SUCCESS" for g in groups for s in g["sessions"]):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"tensorboard did not serve both runs within 60 s:\n{server_output(log)}")
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_output(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def series(records, key):
    return [(r["step"], r[key]) for r in records if key in r and r[key] is not None]


def test_scalars_are_served_once_per_step_with_the_values_of_metrics_jsonl(server, tb_runs):
    tags = server.get("/data/plugin/scalars/tags")
    assert set(tags) == {LM, RET}
    checks = {LM: (tb_runs.lm, {"train/loss": "loss", "train/lr": "lr", "train/grad_norm": "grad_norm",
                                "train/tokens_seen": "tokens_seen", "perf/mfu": "mfu",
                                "eval/loss_ctx32": "eval_loss_ctx32", "eval/loss_ctx16": "eval_loss_ctx16"}),
              RET: (tb_runs.ret, {"train/loss": "loss", "retrieval/temperature": "temperature",
                                  "eval/recall@1": "eval_recall@1", "eval/mrr@10": "eval_mrr@10",
                                  "eval/train_recall@1": "eval_train_recall@1"})}
    for run, (run_dir, pairs) in checks.items():
        records = read_metrics(run_dir)
        for tag, key in pairs.items():
            assert tag in tags[run], f"{run}: no scalar {tag}; has {sorted(tags[run])}"
            served = [(step, value) for _, step, value in server.get("/data/plugin/scalars/scalars", run=run, tag=tag)]
            expected = series(records, key)
            assert [s for s, _ in served] == [s for s, _ in expected], (run, tag)
            assert [v for _, v in served] == pytest.approx([v for _, v in expected], rel=1e-6), (run, tag)
    # the resumed run: every step once, the first process's evaluation at step 5 purged
    loss_steps = [s for _, s, _ in server.get("/data/plugin/scalars/scalars", run=LM, tag="train/loss")]
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    assert [s for _, s, _ in server.get("/data/plugin/scalars/scalars", run=LM, tag="eval/loss_ctx32")] == [3, 6]
    assert [s for _, s, _ in server.get("/data/plugin/scalars/scalars", run=RET, tag="eval/recall@1")] == [0, 2, 4]


def test_hparams_dashboard_has_one_row_per_run_with_its_config_and_final_metrics(server, tb_runs):
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {h["name"]: h for h in experiment["hparamInfos"]}
    for name in ("model.kind", "model.d_model", "model.n_layers", "model.n_ctx", "model.mixer_heads", "train.lr",
                 "train.global_batch_size", "train.micro_batch_size", "train.steps", "train.seed",
                 "engine.precision", "engine.zero_stage", "retrieval.temperature", "run.world_size"):
        assert name in hparams, f"no hyperparameter {name}"
    for watched in ("logging.run_dir", "checkpoint.resume", "train.stop_at", "train.eval_every"):
        assert watched not in hparams   # how a run is watched and saved, not what it trains
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"train/loss", "eval/loss_ctx32", "eval/loss_ctx16", "eval/recall@1", "eval/mrr@10"} <= metrics

    groups = {g["name"]: g for g in server.session_groups()}
    assert sorted(groups) == [LM, RET]   # the resumed run is one session, not two
    assert [len(g["sessions"]) for g in groups.values()] == [1, 1]
    lm, ret = groups[LM], groups[RET]
    lm_hp = lm["hparams"]
    assert lm_hp["model.kind"] == "mixer" and lm_hp["model.d_model"] == 32 and lm_hp["model.n_ctx"] == 32
    assert lm_hp["train.lr"] == pytest.approx(3e-3) and lm_hp["train.global_batch_size"] == 8
    assert lm_hp["engine.zero_stage"] == 1 and lm_hp["engine.precision"] == "fp32"
    assert lm_hp["model.tie_embeddings"] is False and lm_hp["model.vocab_size"] == tb_runs.tokenizer_vocab
    ret_hp = ret["hparams"]
    assert ret_hp["model.kind"] == "mixer" and ret_hp["train.lr"] == pytest.approx(2e-3)
    assert ret_hp["retrieval.pooling"] == "mean" and ret_hp["retrieval.symmetric"] is True

    for group, run_dir, keys in ((lm, tb_runs.lm, {"train/loss": "loss", "eval/loss_ctx32": "eval_loss_ctx32",
                                                   "eval/loss_ctx16": "eval_loss_ctx16"}),
                                 (ret, tb_runs.ret, {"train/loss": "loss", "eval/recall@1": "eval_recall@1",
                                                     "eval/mrr@10": "eval_mrr@10"})):
        values = {m["name"]["tag"]: m for m in group["sessions"][0]["metricValues"]}
        records = read_metrics(run_dir)
        for tag, key in keys.items():
            step, value = series(records, key)[-1]
            assert values[tag]["trainingStep"] == step and values[tag]["value"] == pytest.approx(value, rel=1e-6)


def text_entries(server, run, tag):
    """(step, raw text) of every text event (``markdown=false``: the text itself, HTML-escaped in a table cell)."""
    out = []
    for event in server.get("/data/plugin/text/text", run=run, tag=tag, markdown="false"):
        cell = event["text"].split("<td>", 1)[1].rsplit("</td>", 1)[0]
        out.append((event["step"], html.unescape(cell)))
    return out


def test_samples_and_retrieval_tables_are_served_as_text_at_every_evaluation(server, tb_runs):
    tags = server.get("/data/plugin/text/tags")
    samples_tag, table_tag = f"{mon.SAMPLES}/text_summary", f"{mon.RETRIEVAL_TABLE}/text_summary"
    assert samples_tag in tags[LM] and samples_tag not in tags[RET] and table_tag in tags[RET]
    samples = text_entries(server, LM, samples_tag)
    assert [s for s, _ in samples] == [3, 6]    # the first process's step-5 samples purged
    assert samples[-1][1] == tb_runs.final_samples
    assert "**1. Return the**" in samples[0][1] and "\n    Create a" in samples[0][1]
    rendered = server.get("/data/plugin/text/text", run=LM, tag=samples_tag)[0]["text"]
    assert "<strong>1. Return the</strong>" in rendered and "<pre><code>Return the" in rendered

    tables = text_entries(server, RET, table_tag)
    assert [s for s, _ in tables] == [0, 2, 4]
    records = {r["step"]: r for r in read_metrics(tb_runs.ret) if "eval_recall@1" in r}
    for step, text in tables:
        assert text.startswith(f"step {step}: val split, 48 queries, pool 48")
        for key in ("recall@1", "recall@100", "mrr@10", "ndcg@10", "map@100", "top1@8", "train_recall@1"):
            assert f"| {key.replace('_', chr(92) + '_')} | {records[step]['eval_' + key]:.4f} |" in text
    rendered = server.get("/data/plugin/text/text", run=RET, tag=table_tag)[-1]["text"]
    assert "<th>metric</th>" in rendered and "<td>recall@1</td>" in rendered and "<td>train_mrr@10</td>" in rendered


# ---- without a server ---------------------------------------------------------------------------


def test_run_hparams_flatten_the_config_to_scalars():
    config = {"model": {"kind": "mixer", "d_model": 32, "final_norm": False}, "train": {"lr": 1e-3, "stop_at": 4,
              "eval_n_ctx": [16]}, "logging": {"run_dir": "/x"}, "checkpoint": {"every": 3}, "data": {"num_workers": 2}}
    from mmtrain.config import setting_roles
    from mmtrain.train.schema import PretrainConfig

    watch = [k for k, role in setting_roles(PretrainConfig).items() if role == "watch"]
    assert mon.run_hparams(config, {"run.world_size": 2}, watch) == {
        "model.kind": "mixer", "model.d_model": 32, "model.final_norm": False, "train.lr": 1e-3,
        "run.world_size": 2}
    summary = mon.session_start_summary({"a.flag": True, "a.n": 3, "a.s": "x"})
    from tensorboard.plugins.hparams import metadata

    info = metadata.parse_session_start_info_plugin_data(summary.value[0].metadata.plugin_data.content)
    assert info.hparams["a.flag"].bool_value is True and info.hparams["a.n"].number_value == 3.0
    assert info.hparams["a.s"].string_value == "x"


@pytest.mark.parametrize("kind, zero_stage, reason", [
    ("mixer", 1, ""), ("transformer", 2, ""), ("mixer", 3, "engine.zero_stage 3"),
    ("bidirectional_mixer", 1, "cannot generate"), ("mixer_autoencoder", 0, "cannot generate")])
def test_samples_only_for_models_that_generate_and_not_under_zero3(kind, zero_stage, reason):
    from mmtrain.config import load_config
    from mmtrain.models import build_model
    from mmtrain.train.lm import LMTask
    from mmtrain.train.schema import PretrainConfig

    cfg = load_config(PretrainConfig, [str(TINY)], [f"model.kind={kind}", f"engine.zero_stage={zero_stage}"])
    task = LMTask()
    task.cfg = cfg
    refusal = task.sample_refusal(build_model(cfg.model, 64))
    assert (reason in refusal) if reason else refusal == ""


def test_samples_markdown_keeps_generated_text_verbatim():
    text = mon.samples_markdown([("Return *the*", " x | y\n`z`\x04", "3 tokens")])
    assert text == "**1. Return \\*the\\*** (3 tokens)\n\n    Return *the* x | y\n    `z`\\x04"
    assert mon.retrieval_table({"recall@1": 0.25}, "step 2") == \
        "step 2\n\n| metric | value |\n|---|---|\n| recall@1 | 0.2500 |"


def test_generate_samples_restores_train_mode_and_uses_no_random_numbers(tmp_path):
    from mmtrain.config import load_config
    from mmtrain.data.shards import TOKENIZER_NAME
    from mmtrain.models import build_model
    from mmtrain.train.lm import LMTask
    from mmtrain.train.schema import PretrainConfig

    shard_dir = tmp_path / "shards"
    (shard_dir / "ctx32").mkdir(parents=True)
    (shard_dir / "ctx32" / TOKENIZER_NAME).write_bytes((ROOT / "tokenizer" / "demo-bpe-4096.model").read_bytes())
    cfg = load_config(PretrainConfig, [str(TINY)], [f"data.shard_dir={shard_dir}", "logging.sample_tokens=5"])
    task = LMTask()
    task.cfg, task.n_ctx, task.tokenizer = cfg, 32, None
    model = build_model(cfg.model, 4096).train()
    state = torch.get_rng_state()
    samples = task.generate_samples(model)
    assert model.training and torch.equal(state, torch.get_rng_state())
    assert [s[0] for s in samples] == ["Return the", "Create a"]
    assert all(s[2].startswith("5 tokens, greedy") or "stopped: eos" in s[2] for s in samples)
    assert task.generate_samples(model) == samples   # greedy: the same text again
