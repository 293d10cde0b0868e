"""`mmtrain prepare` / `prepare-pairs` with ``--out`` a store URL (a real S3 API: moto's server, and file://)."""

import json
import shutil
from pathlib import Path

import pytest

from mmtrain.cli import main
from mmtrain.config import load_config
from mmtrain.data import remote as R
from mmtrain.data import shards as S
from mmtrain.data.pairs import check_pairs, prepare_pairs
from mmtrain.data.prepare import demo_prepare_config, prepare
from mmtrain.data.schema import PairsConfig
from mmtrain.data.streaming_compat import read_samples
from mmtrain.data.tokenizer import DEMO_TOKENIZER

DOCS = 300


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Staging directories under the test's tmp_path."""
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))


def download_prefix(server, url, local: Path, skip=()) -> list:
    """Every object under ``url`` into ``local`` (remote.download of each key); the relative keys."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    rels = []
    for key in server.keys(url):
        rel = key[len(prefix) + 1:] if prefix else key
        if rel.split("/")[0] in skip:
            continue
        assert R.download(f"s3://{bucket}/{key}", local / rel)
        rels.append(rel)
    return sorted(rels)


def samples(split_dir):
    return [b"".join(bytes(memoryview(v)) for _, v in sorted(s.items())) for s in read_samples(split_dir)]


def stamps(server, url):
    bucket, _, prefix = url[len("s3://"):].partition("/")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["LastModified"], o["ETag"]) for page in pages for o in page.get("Contents", [])}


def test_prepare_to_a_bucket_holds_the_local_samples_and_a_rerun_sends_nothing(s3_server, tmp_path, capsys):
    url = s3_server.bucket("mmdata") + "/demo"
    summary = prepare(demo_prepare_config(url, [32], max_docs=DOCS, num_proc=1), progress=False)
    assert summary["out"] == url and summary["uploaded"] > 0 and summary["ctx"][32]["status"] == "written"
    keys = s3_server.keys(url)
    assert {"demo/ctx32/meta.json", "demo/tokenizer.model", "demo/ctx32/tokenizer.model",
            "demo/ctx32/train/index.json", "demo/ctx32/val/index.json"} <= set(keys)
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith(".")]   # no marker, lock or temporary file
    got = tmp_path / "got"
    download_prefix(s3_server, url, got)
    S.check_shards(got, 32, verify_hashes=True)
    local = tmp_path / "local"
    prepare(demo_prepare_config(str(local), [32], max_docs=DOCS, num_proc=1), progress=False)
    for split in S.SPLITS:
        assert samples(S.split_dir(got, 32, split)) == samples(S.split_dir(local, 32, split))
    # the same recipe again: up to date from the store's meta.json alone (no staging directory left)
    before = stamps(s3_server, url)
    shutil.rmtree(tmp_path / "cache")
    assert main(["prepare", "--input", "demo", "--out", url, "--n-ctx", "32", "--tokenizer", str(DEMO_TOKENIZER),
                 "--quiet", f"max_docs={DOCS}"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "uploaded 0 files" in out
    assert stamps(s3_server, url) == before


def test_another_recipe_or_tokenizer_on_the_bucket_needs_overwrite(s3_server, tmp_path, capsys):
    url = s3_server.bucket("mmdata") + "/demo"
    prepare(demo_prepare_config(url, [32], max_docs=DOCS, num_proc=1), progress=False)
    args = ["prepare", "--input", "demo", "--out", url, "--n-ctx", "32", "--tokenizer", str(DEMO_TOKENIZER),
            "--quiet", f"max_docs={DOCS}", "seed=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{url}/ctx32 holds complete shards prepared with another recipe" in err and "--overwrite" in err
    assert json.loads(R.fetch_text(url + "/ctx32/meta.json"))["prepare"]["seed"] == 0
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(R.fetch_text(url + "/ctx32/meta.json"))["prepare"]["seed"] == 1
    # one shard root, one tokenizer: another tokenizer for a new context length is refused
    other = tmp_path / "other.model"
    train_args = ["prepare", "--input", "demo", "--out", str(tmp_path / "t"), "--n-ctx", "32", "--vocab-size", "512",
                  "--quiet", "max_docs=200"]
    assert main(train_args) == 0
    shutil.copy(tmp_path / "t" / "tokenizer.model", other)
    assert main(["prepare", "--input", "demo", "--out", url, "--n-ctx", "64", "--tokenizer", str(other), "--quiet",
                 f"max_docs={DOCS}"]) == 2
    assert "One shard root holds one tokenizer" in capsys.readouterr().err
    assert "demo/ctx64/meta.json" not in s3_server.keys(url)


def test_an_interrupted_upload_is_finished_without_tokenizing_again(s3_server, tmp_path):
    url = s3_server.bucket("mmdata") + "/demo"
    cfg = demo_prepare_config(url, [32, 64], max_docs=DOCS, num_proc=1)
    first = prepare(cfg, progress=False)
    # as if killed while uploading: the last objects (meta.json) and a shard never arrived
    client = s3_server.client()
    shard = next(k for k in s3_server.keys(url) if k.startswith("demo/ctx64/train/shard."))
    for key in ("demo/ctx32/meta.json", "demo/ctx64/meta.json", shard):
        client.delete_object(Bucket="mmdata", Key=key)
    before = stamps(s3_server, url)
    again = prepare(cfg, progress=False)
    # the staging directory was complete: nothing tokenized, only the three missing objects sent
    assert {info["status"] for info in again["ctx"].values()} == {"up to date"}
    assert again["uploaded"] == 3 < first["uploaded"]
    after = stamps(s3_server, url)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted(["demo/ctx32/meta.json", "demo/ctx64/meta.json", shard])
    got = tmp_path / "got"
    download_prefix(s3_server, url, got)
    for n in (32, 64):
        S.check_shards(got, n, verify_hashes=True)


def test_parts_on_the_bucket_merge_like_parts_on_disk(s3_server, tmp_path):
    url = s3_server.bucket("mmdata") + "/big"
    local = tmp_path / "local"
    for out in (url, str(local)):
        for i in (1, 0):
            prepare(demo_prepare_config(out, [32], max_docs=DOCS, num_proc=1, part=f"{i}/2"), progress=False)
    keys = set(s3_server.keys(url))
    assert {"big/ctx32/parts/part-00000-of-00002.json", "big/ctx32/parts/part-00001-of-00002.json",
            "big/ctx32/train/part-00001-of-00002/index.json"} <= keys
    assert "big/ctx32/meta.json" not in keys
    merged = prepare(demo_prepare_config(url, [32], merge=True), progress=False)
    assert merged["ctx"][32]["status"] == "merged" and merged["uploaded"] == 5   # 2 indexes, 2 tokenizers, meta
    prepare(demo_prepare_config(str(local), [32], merge=True), progress=False)
    got = tmp_path / "got"
    download_prefix(s3_server, url, got)
    S.check_shards(got, 32, verify_hashes=True)
    for split in S.SPLITS:
        assert samples(S.split_dir(got, 32, split)) == samples(S.split_dir(local, 32, split))
    again = prepare(demo_prepare_config(url, [32], merge=True), progress=False)
    assert again["ctx"][32]["status"] == "up to date" and again["uploaded"] == 0
    rerun = prepare(demo_prepare_config(url, [32], max_docs=DOCS, num_proc=1, part="0/2"), progress=False)
    assert rerun["ctx"][32]["status"] == "up to date" and rerun["uploaded"] == 0


def pairs_config(out, **kw):
    items = {"tokenizer": str(DEMO_TOKENIZER), "n_ctx": 32, "out": str(out), "max_pairs": 300, **kw}
    return load_config(PairsConfig, [], [f"{k}={json.dumps(v)}" for k, v in items.items()])


def test_prepare_pairs_to_a_bucket(s3_server, tmp_path, capsys):
    url = s3_server.bucket("mmpairs") + "/demo"
    meta = prepare_pairs(pairs_config(url), progress=False)
    assert meta["status"] == "written" and meta["uploaded"] > 0
    keys = set(s3_server.keys(url))
    assert {"demo/meta.json", "demo/tokenizer.model", "demo/heldout.jsonl", "demo/train/index.json",
            "demo/test/index.json"} <= keys
    got = tmp_path / "got"
    download_prefix(s3_server, url, got)
    check_pairs(got, verify_hashes=True)
    local = tmp_path / "local"
    prepare_pairs(pairs_config(local), progress=False)
    for split in ("train", "val", "test"):
        assert samples(got / split) == samples(local / split)
    assert main(["prepare-pairs", "--out", url, "--quiet", f"tokenizer={DEMO_TOKENIZER}", "n_ctx=32",
                 "max_pairs=300"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_file_url_works(tmp_path):
    store = tmp_path / "store"
    url = f"file://{store}/demo"
    summary = prepare(demo_prepare_config(url, [32], max_docs=DOCS, num_proc=1), progress=False)
    assert summary["ctx"][32]["status"] == "written"
    S.check_shards(store / "demo", 32, verify_hashes=True)
    assert not list((store / "demo").glob(".*"))
    again = prepare(demo_prepare_config(url, [32], max_docs=DOCS, num_proc=1), progress=False)
    assert again["ctx"][32]["status"] == "up to date" and again["uploaded"] == 0
    meta = prepare_pairs(pairs_config(f"file://{store}/pairs"), progress=False)
    assert meta["uploaded"] > 0
    check_pairs(store / "pairs", verify_hashes=True)
