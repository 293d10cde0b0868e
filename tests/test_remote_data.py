"""Shards streamed from an object store (a real S3 API: moto's server on 127.0.0.1) and from a
plain directory used as a remote, and mixtures of datasets by weight.

Every test talks to the store over HTTP, as a user's run does: launched runs (2 ranks, a kill -9,
a run that meets a dead store) find it through ``S3_ENDPOINT_URL`` in their environment, the
runs in this process through the same variable in the test's.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from conftest import (TINY, finish, pretrain_in_process, read_metrics, run_pretrain, start_pretrain,
                      train_losses)

SECRET = "mmtrain-secret-7f3a9c1e5d"   # stands for a real credential: must never be written anywhere


@pytest.fixture()
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MMTRAIN_CACHE", str(root))
    return root


@pytest.fixture()
def bucket_shards(s3_server, demo_shards) -> str:
    """The demo shards (n_ctx 32 and 64) uploaded to s3://mmdata/demo."""
    url = s3_server.bucket("mmdata") + "/demo"
    s3_server.upload_dir(demo_shards, url)
    return url


def batches(loader, limit=None):
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append(batch["input_ids"])
    return out


def build(location, split="train", **kwargs):
    from mmtrain.data.lm_dataset import build_lm_loader

    kwargs.setdefault("shuffle", True)
    return build_lm_loader(location, 32, split, 4, seed=3, num_workers=0, **kwargs)


# ---- samples and order -----------------------------------------------------------------------


def test_bucket_gives_the_samples_of_local_shards_in_the_same_order(bucket_shards, demo_shards, cache_root):
    local = batches(build(str(demo_shards)))
    remote = batches(build(bucket_shards))
    assert len(remote) == len(local) > 10
    assert all(torch.equal(a, b) for a, b in zip(remote, local))
    # the cache mirrors the layout, every shard file present and matching its index
    from mmtrain.data.shards import check_shards

    caches = [p for p in (cache_root / "shards").iterdir()]
    assert len(caches) == 1 and (caches[0] / ".mmtrain-cache.json").is_file()
    check_shards(caches[0], 32, splits=("train",), verify_hashes=True)


def test_resume_mid_epoch_from_the_bucket_continues_exactly(bucket_shards, demo_shards, cache_root):
    full = batches(build(str(demo_shards)))
    first = build(bucket_shards)
    head = []
    for i, batch in enumerate(first):
        head.append(batch["input_ids"])
        if i == 6:
            state = first.state_dict()
            break
    resumed = build(bucket_shards)
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full)) and len(head) + len(rest) == len(full)


def test_a_plain_directory_as_remote_is_copied_into_the_cache(demo_shards, cache_root):
    url = f"file://{demo_shards}"
    remote = batches(build(url))
    assert all(torch.equal(a, b) for a, b in zip(remote, batches(build(str(demo_shards)))))
    cached = list((cache_root / "shards").glob("*/ctx32/train/shard.*.mds"))
    assert cached and all(not p.is_symlink() for p in cached)


def test_missing_remote_context_length_is_named_with_the_prepare_command(bucket_shards, cache_root):
    from mmtrain.data.errors import DataError
    from mmtrain.data.lm_dataset import build_lm_loader

    with pytest.raises(DataError, match=r"(?s)no shards for n_ctx=128 at s3://mmdata/demo/ctx128.*mmtrain prepare --out s3://mmdata/demo"):
        build_lm_loader(bucket_shards, 128, "train", 4, shuffle=False, seed=0, num_workers=0)


def test_shards_of_another_tokenizer_in_the_bucket_are_refused_before_work(bucket_shards, cache_root):
    from mmtrain.data.errors import DataError

    with pytest.raises(DataError, match="tokenizer sha256"):
        build(bucket_shards, expected_tokenizer_hash="0" * 64)


def test_credentials_in_the_url_are_refused(cache_root):
    from mmtrain.data.errors import DataError

    with pytest.raises(DataError, match="credentials do not belong in a data URL") as info:
        build(f"s3://AKIA:{SECRET}@mmdata/demo")
    assert SECRET not in str(info.value)


def test_a_cache_dir_mmtrain_did_not_make_is_refused_not_cleared(bucket_shards, demo_shards, tmp_path, cache_root):
    from mmtrain.data.errors import DataError
    from mmtrain.data.sources import source

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"is not a cache mmtrain made for s3://mmdata/demo"):
        build([source(bucket_shards, str(notes))])
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    batches(build([source(bucket_shards, str(tmp_path / "mine"))]), limit=1)     # a new directory is claimed
    with pytest.raises(DataError, match=r"the cache of s3://mmdata/demo, not of s3://mmdata/other"):
        build([source("s3://mmdata/other", str(tmp_path / "mine"))])


# ---- damage and outages -------------------------------------------------------------------------


def test_a_corrupt_object_is_named_before_its_samples_are_used_and_never_cached(s3_server, bucket_shards,
                                                                                  demo_shards, cache_root):
    from mmtrain.data.errors import DataError

    shard = demo_shards / "ctx32" / "train" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                       # same size, one flipped byte
    s3_server.client().put_object(Bucket="mmdata", Key="demo/ctx32/train/shard.00000.mds", Body=bytes(data))
    loader = build(bucket_shards)
    with pytest.raises(DataError, match=r"s3://mmdata/demo/ctx32/train/shard\.00000\.mds: sha1 \w+ does not match"):
        batches(loader)
    assert not list((cache_root / "shards").glob("*/ctx32/train/shard.00000.mds"))
    assert not list((cache_root / "shards").glob("*/ctx32/train/.*"))


def test_a_damaged_file_in_a_warm_cache_is_downloaded_again(bucket_shards, demo_shards, cache_root):
    batches(build(bucket_shards))
    cached = next((cache_root / "shards").glob("*/ctx32/train/shard.00000.mds"))
    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF
    cached.write_bytes(bytes(data))
    again = batches(build(bucket_shards, verify_hashes=True))     # as training does (data.verify_shards)
    assert all(torch.equal(a, b) for a, b in zip(again, batches(build(str(demo_shards)))))
    assert cached.read_bytes() == (demo_shards / "ctx32" / "train" / "shard.00000.mds").read_bytes()


def test_store_down_retries_then_names_the_shard_and_endpoint_and_works_once_back(s3_server, bucket_shards,
                                                                                   demo_shards, cache_root):
    import time

    from mmtrain.data.errors import DataError

    loader = build(bucket_shards, retries=2)           # the indexes are in the cache; no shard yet
    s3_server.stop()
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        batches(loader)
    waited = time.monotonic() - start
    message = str(info.value)
    assert "s3://mmdata/demo/ctx32/train/shard.00000.mds: the store did not answer after 3 attempts" in message
    assert s3_server.endpoint in message
    assert 3 <= waited < 60                            # backoff 1 + 2 s, bounded
    assert not list((cache_root / "shards").glob("*/ctx32/train/shard.*"))
    assert not list((cache_root / "shards").glob("*/ctx32/train/.*"))
    s3_server.start()                                  # back (moto keeps nothing: upload again)
    s3_server.bucket("mmdata")
    s3_server.upload_dir(demo_shards, bucket_shards)
    assert all(torch.equal(a, b) for a, b in zip(batches(build(bucket_shards)), batches(build(str(demo_shards)))))


# ---- training runs from the bucket ---------------------------------------------------------------


def tiny(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}", "train.steps=6",
            "checkpoint.every=2", "train.eval_every=0", "engine.peak_flops=1e11", "data.download_retry=1",
            *extra]


@pytest.fixture(scope="module")
def local_losses(demo_shards, tmp_path_factory) -> dict:
    """{step: loss} of :func:`tiny` on the local demo shards, trained once in this process: what
    every run from the bucket must log."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    pretrain_in_process(tiny(demo_shards, run_dir))
    return train_losses(run_dir)


def assert_close(a: dict, b: dict, rel=1e-6):
    assert sorted(a) == sorted(b)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a[step], b[step])


def written_files(*roots):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                yield path


def test_two_ranks_from_the_bucket_train_like_one_rank_from_local_shards_and_write_no_secret(
        s3_server, bucket_shards, local_losses, tmp_path, cache_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)        # moto accepts any key
    proc = run_pretrain(tiny(bucket_shards, tmp_path / "remote", "data.num_workers=1"), launcher="torchrun",
                        nproc=2, env={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert_close(train_losses(tmp_path / "remote"), local_losses)
    config = (tmp_path / "remote" / "config.yaml").read_text()
    assert "shard_dir: s3://mmdata/demo" in config
    from mmtrain import cli

    assert cli.main(["export", str(tmp_path / "remote"), "--out", str(tmp_path / "bundle")]) == 0
    # the secret is in the environment of every rank, and in nothing the run wrote or printed
    assert SECRET not in proc.stdout + proc.stderr
    files = list(written_files(tmp_path / "remote", cache_root, tmp_path / "bundle"))
    assert any(p.suffix == ".safetensors" for p in files) and any("tfevents" in p.name for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_kill_9_then_resume_from_the_bucket_reuses_the_warm_cache(s3_server, bucket_shards, local_losses,
                                                                   tmp_path, cache_root):
    run_dir = tmp_path / "run"
    proc = start_pretrain(tiny(bucket_shards, run_dir), env={"MMTRAIN_FAULT": "kill_at_step:5"})
    rc, output = finish(proc)
    assert rc == -signal.SIGKILL, output[-3000:]
    cached = {p: (p.stat().st_ino, p.stat().st_mtime_ns)
              for p in (cache_root / "shards").rglob("shard.*.mds")}
    assert len(cached) == 1                            # the train shard (no evaluation before step 6)
    pretrain_in_process(tiny(bucket_shards, run_dir))       # the relaunch (in this process)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cached} == cached   # nothing downloaded again
    assert_close(train_losses(run_dir), local_losses)


def test_a_run_whose_store_is_down_stops_with_a_clear_error_and_resumes_once_it_is_back(
        s3_server, bucket_shards, demo_shards, local_losses, tmp_path, cache_root):
    run_dir = tmp_path / "run"
    pretrain_in_process(tiny(bucket_shards, run_dir, "train.stop_at=2"))
    s3_server.stop()
    proc = run_pretrain(tiny(bucket_shards, run_dir), check=False)   # launched: the exit code and stderr a user sees
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "s3://mmdata/demo/ctx32/meta.json: the store did not answer after 2 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr
    s3_server.start()
    s3_server.bucket("mmdata")
    s3_server.upload_dir(demo_shards, bucket_shards)
    pretrain_in_process(tiny(bucket_shards, run_dir))
    assert_close(train_losses(run_dir), local_losses)


# ---- mixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> Path:
    """Other documents of the demo corpus (a different val split seed), the same tokenizer."""
    from mmtrain.data.prepare import demo_prepare_config, prepare

    out = tmp_path_factory.mktemp("second")
    prepare(demo_prepare_config(str(out), [32], max_docs=300, seed=5), progress=False)
    return out


def mixture(a, b, pa=0.75, pb=0.25):
    from mmtrain.data.sources import source

    return [source(str(a), name="a", proportion=pa), source(str(b), name="b", proportion=pb)]


def test_a_two_stream_mixture_gives_the_requested_proportions(demo_shards, second_dataset):
    from mmtrain.data.lm_dataset import build_lm_loader

    loader = build_lm_loader(mixture(demo_shards, second_dataset), 32, "train", 4, shuffle=True, seed=0,
                             num_workers=0)
    streams = torch.cat([b["stream"] for b in loader])
    n = len(streams)
    share = float((streams == 0).float().mean())
    assert n > 500
    assert abs(share - 0.75) < 3 * math.sqrt(0.75 * 0.25 / n), (share, n)
    # and the samples of each stream are its own
    first_a = next(iter(build_lm_loader(str(demo_shards), 32, "train", 4, shuffle=False, seed=0, num_workers=0)))
    assert first_a["input_ids"].shape == (4, 32)


def test_a_mixture_resumes_mid_epoch_exactly(demo_shards, second_dataset):
    from mmtrain.data.lm_dataset import build_lm_loader

    def make():
        return build_lm_loader(mixture(demo_shards, second_dataset), 32, "train", 4, shuffle=True, seed=1,
                               num_workers=0)

    full = [(b["input_ids"], b["stream"]) for b in make()]
    first = make()
    head = []
    for i, b in enumerate(first):
        head.append((b["input_ids"], b["stream"]))
        if i == 9:
            state = first.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = [(b["input_ids"], b["stream"]) for b in resumed]
    assert len(head) + len(rest) == len(full)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(head + rest, full))


def test_a_mixture_trains_and_reports_each_stream(demo_shards, second_dataset, tmp_path):
    streams = (f"data.streams=[{{name: docs, shard_dir: {demo_shards}, proportion: 0.7}}, "
               f"{{name: more, shard_dir: {second_dataset}, proportion: 0.3}}]")
    trainer = pretrain_in_process(["--config", TINY, "data.shard_dir=data/demo", streams,
                                   f"logging.run_dir={tmp_path / 'mix'}", "train.steps=2", "train.eval_every=0",
                                   "engine.peak_flops=1e11"])
    evals = [r for r in read_metrics(trainer.run_dir) if "eval_loss_ctx32" in r]
    last = evals[-1]
    for name in ("docs", "more"):
        assert 0 < last[f"eval_loss_ctx32/{name}"] < 20
        assert f"eval_loss_ctx16/{name}" in last
    lo, hi = sorted([last["eval_loss_ctx32/docs"], last["eval_loss_ctx32/more"]])
    assert lo <= last["eval_loss_ctx32"] <= hi
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(trainer.run_dir) / "tensorboard")).Reload()
    assert {"eval/docs/loss_ctx32", "eval/more/loss_ctx32"} <= set(acc.Tags()["scalars"])
    config = (Path(trainer.run_dir) / "config.yaml").read_text()
    assert "proportion: 0.7" in config and "name: more" in config
    hp = trainer.hparams()
    assert hp["data.streams.docs.proportion"] == 0.7 and hp["data.streams.more.shard_dir"] == str(second_dataset)


def test_streams_of_another_tokenizer_are_refused_before_work(demo_shards, tmp_path):
    from mmtrain.config import ConfigError
    from mmtrain.data.prepare import demo_prepare_config, prepare

    other = tmp_path / "other"
    prepare(demo_prepare_config(str(other), [32], tokenizer="", max_docs=300,
                                tokenizer_spec={"vocab_size": 512}), progress=False)
    streams = (f"data.streams=[{{name: a, shard_dir: {demo_shards}}}, {{name: b, shard_dir: {other}}}]")
    with pytest.raises(ConfigError, match=r"stream 'b' .*every stream of a mixture must be prepared with the same tokenizer"):
        pretrain_in_process(["--config", TINY, "data.shard_dir=data/demo", streams,
                             f"logging.run_dir={tmp_path / 'run'}", "train.steps=1"])
    assert not (tmp_path / "run").exists()
