"""End to end: pretrain tiny mixer -> export -> prepare-pairs -> InfoNCE training -> export -> eval-retrieval.

Also: the engine's gradient-cached step equals the plain one, exact resume, and the user errors
(pairs file missing a field, bundle/pairs tokenizer mismatch, N larger than the pool).
"""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, TINY, pretrain_in_process, read_metrics, script_env, split_config_args, train_in_process

from mmtrain import cli
from mmtrain.data.errors import DataError

TINY_RETRIEVAL = ROOT / "configs" / "retrieval" / "tiny.yaml"
DEMO_PAIRS = ROOT / "configs" / "pairs" / "demo.yaml"


def launch_retrieval(args, timeout=300):
    """`python mmtrain/retrieval.py --config configs/retrieval/tiny.yaml ARGS`, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "mmtrain" / "retrieval.py"), "--config", str(TINY_RETRIEVAL)]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"retrieval.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_retrieval(args, check=True):
    """The same run in this process (the Trainer with the contrastive task): returncode 0, or 2 and
    the configuration error's message as the entry script prints it when ``check`` is false."""
    from mmtrain.config import ConfigError
    from mmtrain.train.contrastive import ContrastiveTask
    from mmtrain.train.schema import RetrievalConfig

    configs, overrides = split_config_args(args)
    try:
        train_in_process(RetrievalConfig, ContrastiveTask, [TINY_RETRIEVAL, *configs], overrides)
    except ConfigError as exc:
        if check:
            raise
        return SimpleNamespace(returncode=2, stderr=f"mmtrain retrieval: {exc}")
    return SimpleNamespace(returncode=0, stderr="")


@pytest.fixture(scope="module")
def pipeline(demo_shards, tmp_path_factory):
    """Pretrained tiny mixer bundle, its demo pairs, a retrieval run and its exported embedder."""
    from mmtrain.export.exporter import export

    base = tmp_path_factory.mktemp("retrieval")
    pretrain_in_process(["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={base / 'pre'}",
                         "train.steps=30", "train.lr=1e-2", "train.eval_every=0", "checkpoint.every=0",
                         "engine.peak_flops=1e11"])
    export(str(base / "pre"), str(base / "base"))
    assert cli.main(["prepare-pairs", "--config", str(DEMO_PAIRS), "--bundle", str(base / "base"),
                     "--out", str(base / "pairs"), "n_ctx=0"]) == 0
    common = [f"retrieval.bundle={base / 'base'}", f"data.shard_dir={base / 'pairs'}"]
    launch_retrieval(common + [f"logging.run_dir={base / 'ret'}", "train.steps=200", "train.global_batch_size=32",
                            "train.micro_batch_size=32", "train.eval_every=100", "checkpoint.every=0"])
    assert cli.main(["export-embedder", str(base / "ret"), "--out", str(base / "embedder")]) == 0
    return {"base": base, "common": common}


def test_retrieval_training_improves_recall_over_the_pretrained_model(pipeline, capsys):
    base = pipeline["base"]
    meta = json.loads((base / "pairs" / "meta.json").read_text())
    assert meta["padding"] == "right" and meta["n_ctx"] == 32
    assert meta["splits"]["test"]["pairs"] > 150 and meta["splits"]["val"]["pairs"] > 150
    assert meta["splits"]["train"]["pairs"] > 1500
    config = json.loads((base / "embedder" / "config.json").read_text())["mmtrain"]
    assert config["embedder"]["pooling"] == "mean" and config["source"]["step"] == 200
    records = read_metrics(base / "ret")
    assert records[0]["step"] == 0 and "eval_recall@1" in records[0]
    assert all(r["negatives"] == 31 for r in records if "loss" in r)
    assert (base / "ret" / "tensorboard").is_dir()

    out = base / "eval.json"
    assert cli.main(["eval-retrieval", str(base / "base"), str(base / "embedder"), "--data", str(base / "pairs"),
                     "--n-candidates", "8", "32", "--pooling", "mean", "--bm25", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "recall@1" in table and "BM25" in table and "top1@32" in table
    results = json.loads(out.read_text())["results"]
    before, after = results[str(base / "base")], results[str(base / "embedder")]
    # held-out pairs (never trained on): a run that only memorised its training pairs fails here
    print(f"held-out recall@1 {before['recall@1']:.3f} -> {after['recall@1']:.3f}, mrr@10 {before['mrr@10']:.3f} "
          f"-> {after['mrr@10']:.3f}, top1@32 {before['top1@32']:.3f} -> {after['top1@32']:.3f}")
    assert after["recall@1"] > before["recall@1"] + 0.04
    assert after["mrr@10"] > before["mrr@10"] + 0.04
    assert after["top1@32"] > before["top1@32"] + 0.07
    assert results["BM25"]["recall@1"] > 0.1   # docstring summaries share words with their bodies
    # the run evaluated on the val split, and recall on as many training pairs beside it
    final = [r for r in records if r["step"] == 200 and "eval_recall@1" in r][-1]
    assert cli.main(["eval-retrieval", str(base / "embedder"), "--data", str(base / "pairs"), "--split", "val",
                     "--n-candidates", "8", "--json", str(out)]) == 0
    val = json.loads(out.read_text())["results"][str(base / "embedder")]
    assert final["eval_recall@1"] == pytest.approx(val["recall@1"], abs=1e-9)
    assert 0.0 <= final["eval_train_recall@1"] <= 1.0 and records[0]["eval_train_recall@1"] < final["eval_train_recall@1"]


def test_gradient_cached_engine_step_equals_plain_step_and_resume_is_exact(pipeline):
    base, common = pipeline["base"], pipeline["common"]
    args = common + ["train.steps=4", "train.eval_every=0", "retrieval.extra_negatives=1",
                     "engine.zero_stage=2", "checkpoint.every=2"]
    run_retrieval(args + [f"logging.run_dir={base / 'plain'}"])
    run_retrieval(args + [f"logging.run_dir={base / 'cached'}", "retrieval.grad_cache_chunk=12",
                          "train.stop_at=2"])
    run_retrieval(args + [f"logging.run_dir={base / 'cached'}", "retrieval.grad_cache_chunk=12"])  # resumes at 2
    plain = {r["step"]: r["loss"] for r in read_metrics(base / "plain") if "loss" in r}
    cached = {r["step"]: r["loss"] for r in read_metrics(base / "cached") if "loss" in r}
    assert sorted(cached) == [1, 2, 3, 4] == sorted(plain)
    for step in plain:
        assert cached[step] == pytest.approx(plain[step], rel=1e-4), step   # reduction order only
    assert plain[4] != plain[1]



def test_zero3_run_loads_the_bundle_into_a_partitioned_model(pipeline):
    """At ZeRO 3 the bundle is loaded into a model built under deepspeed.zero.Init (one module
    gathered at a time): the starting evaluation and the losses are those of ZeRO 2."""
    base, common = pipeline["base"], pipeline["common"]
    args = common + ["train.steps=3", "train.eval_every=0", "checkpoint.every=0"]
    for stage in (2, 3):
        run_retrieval(args + [f"logging.run_dir={base / f'zero{stage}'}", f"engine.zero_stage={stage}"])
    runs = {stage: read_metrics(base / f"zero{stage}") for stage in (2, 3)}
    start = {stage: [r for r in runs[stage] if r["step"] == 0][0] for stage in runs}
    assert start[3]["eval_recall@1"] == pytest.approx(start[2]["eval_recall@1"], abs=1e-9)
    assert start[3]["eval_mrr@10"] == pytest.approx(start[2]["eval_mrr@10"], rel=1e-6)
    losses = {stage: [r["loss"] for r in runs[stage] if "loss" in r] for stage in runs}
    assert len(losses[3]) == 3 and losses[3] == pytest.approx(losses[2], rel=1e-4)

def test_pairs_file_missing_a_field_names_file_and_line(tmp_path, pipeline):
    from mmtrain.config import load_config
    from mmtrain.data.schema import PairsConfig
    from mmtrain.data.pairs import prepare_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"summary": "a", "story": "b c"}\n\n{"summary": "d", "text": "e"}\n')
    cfg = load_config(PairsConfig, [], [f"input=[{path}]", "query_field=summary", "document_field=story",
                                        f"bundle={pipeline['base'] / 'base'}", f"out={tmp_path / 'out'}"])
    with pytest.raises(DataError, match=rf"{path}:3: record has no field 'story'"):
        prepare_pairs(cfg)
    assert not (tmp_path / "out").exists()


def test_pairs_from_another_tokenizer_are_refused(tmp_path, pipeline, capsys):
    from mmtrain.data.demo_corpus import demo_documents
    from mmtrain.data.pairs import check_pairs
    from mmtrain.data.tokenizer import train_tokenizer

    tok_path = tmp_path / "other.model"
    train_tokenizer(demo_documents(max_docs=300), {"vocab_size": 600}, out=tok_path)
    pairs = tmp_path / "pairs"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"query": f"query {i}", "document": f"document number {i}"}) + "\n"
                             for i in range(40)))
    assert cli.main(["prepare-pairs", "--input", str(jsonl), "--out", str(pairs), f"tokenizer={tok_path}",
                     "n_ctx=16", "test_fraction=0.3"]) == 0
    bundle = pipeline["base"] / "base"
    with pytest.raises(DataError, match="tokenized with tokenizer sha256"):
        check_pairs(pairs, tokenizer_sha256=json.loads((bundle / "config.json").read_text())
                    ["mmtrain"]["tokenizer"]["sha256"], bundle=str(bundle))
    assert cli.main(["eval-retrieval", str(bundle), "--data", str(pairs)]) == 2
    assert "prepare the pairs with this bundle" in capsys.readouterr().err
    proc = run_retrieval(pipeline["common"][:1] + [f"data.shard_dir={pairs}", f"logging.run_dir={tmp_path / 'r'}"],
                         check=False)
    assert proc.returncode == 2 and "tokenized with tokenizer sha256" in proc.stderr


def test_n_larger_than_the_pool_is_refused(pipeline, capsys):
    base = pipeline["base"]
    pool = json.loads((base / "pairs" / "meta.json").read_text())["splits"]["test"]["pairs"]
    assert cli.main(["eval-retrieval", str(base / "base"), "--data", str(base / "pairs"),
                     "--n-candidates", "32", str(pool + 1)]) == 2
    assert f"N={pool + 1} is larger than the pool of {pool} documents" in capsys.readouterr().err


def test_hard_negatives_and_a_learned_temperature_train_and_export(pipeline, tmp_path, capsys):
    base = pipeline["base"]
    pairs = tmp_path / "pairs-hn"
    assert cli.main(["prepare-pairs", "--config", str(DEMO_PAIRS), "--bundle", str(base / "base"),
                     "--out", str(pairs), "n_ctx=0", "max_pairs=400", "hard_negatives=2"]) == 0
    common = [pipeline["common"][0], f"data.shard_dir={pairs}", "train.eval_every=0", "checkpoint.every=0",
              "retrieval.eval_train_pairs=0"]
    run_retrieval(common + [f"logging.run_dir={tmp_path / 'r'}", "train.steps=3", "retrieval.hard_negatives=2",
                            "retrieval.learn_temperature=true", "retrieval.temperature=0.05", "train.lr=1e-3"])
    records = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert [r["negatives"] for r in records] == [16 - 1 + 2 * 16] * 3   # in-batch + 2 mined per query
    temps = [r["temperature"] for r in records]
    assert temps[0] != pytest.approx(temps[-1], abs=1e-6) and all(t >= 0.01 for t in temps)
    assert cli.main(["export-embedder", str(tmp_path / "r"), "--out", str(tmp_path / "emb")]) == 0
    embedder = json.loads((tmp_path / "emb" / "config.json").read_text())["mmtrain"]["embedder"]
    assert embedder["learned_temperature"] is True and embedder["temperature"] == pytest.approx(temps[-1], rel=0.05)
    # export-embedder's --out: never a file, a non-empty directory (without --overwrite) or the run itself
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    for out, flags, needle in [(tmp_path / "afile", [], "exists and is not a directory"),
                               (tmp_path / "emb", [], "exists and is not empty"),
                               (tmp_path / "r", ["--overwrite"], "contains the checkpoint")]:
        assert cli.main(["export-embedder", str(tmp_path / "r"), "--out", str(out), *flags]) == 2
        assert needle in capsys.readouterr().err
    assert (tmp_path / "r" / "checkpoints" / "latest").is_file() and (tmp_path / "afile").read_text() == "x"
    # more mined negatives than the shards hold: a clear error before training
    proc = run_retrieval(common + [f"logging.run_dir={tmp_path / 'r2'}", "retrieval.hard_negatives=3"], check=False)
    assert proc.returncode == 2 and "hard_negatives=3" in proc.stderr


def test_pairs_from_a_bucket_train_and_evaluate_like_the_local_pairs(pipeline, s3_server, tmp_path, monkeypatch):
    base, common = pipeline["base"], pipeline["common"]
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    url = s3_server.bucket("mmpairs") + "/demo"
    s3_server.upload_dir(base / "pairs", url)
    args = [f"retrieval.bundle={base / 'base'}", "train.steps=3", "train.eval_every=0", "checkpoint.every=0"]
    run_retrieval(common + args + [f"logging.run_dir={tmp_path / 'local'}"])
    run_retrieval(args + [f"data.shard_dir={url}", f"logging.run_dir={tmp_path / 'remote'}"])
    local = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "local") if "loss" in r}
    remote = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "remote") if "loss" in r}
    assert sorted(remote) == [1, 2, 3] and remote == local
    copies = list((tmp_path / "cache" / "pairs").iterdir())
    assert len(copies) == 1 and (copies[0] / "meta.json").read_bytes() == (base / "pairs" / "meta.json").read_bytes()
    out = {}
    for name, data in (("local", base / "pairs"), ("remote", url)):
        assert cli.main(["eval-retrieval", str(base / "embedder"), "--data", str(data), "--n-candidates", "8",
                         "--json", str(tmp_path / f"{name}.json")]) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"][str(base / "embedder")]
    assert out["remote"] == out["local"]
    # a pair shard damaged in the bucket is named, and never copied
    key = next(k for k in s3_server.keys(url) if k.startswith("demo/test/shard."))
    s3_server.client().put_object(Bucket="mmpairs", Key=key, Body=b"x" * 16)
    shutil.rmtree(tmp_path / "cache")
    rc = run_retrieval(args + [f"data.shard_dir={url}", f"logging.run_dir={tmp_path / 'bad'}"], check=False)
    assert rc.returncode == 2 and f"s3://mmpairs/{key}: 16 bytes downloaded, index.json says" in rc.stderr
    assert not list((tmp_path / "cache").glob("pairs/*/" + key[len("demo/"):]))
