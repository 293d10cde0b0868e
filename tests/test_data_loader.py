"""LM dataset / loader: batches, seeded shuffling, exact resume (workers, epochs, 2 ranks), shard checks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtrain.config import load_config
from mmtrain.data.schema import PrepareConfig
from mmtrain.data import DataError
from mmtrain.data import shards as S
from mmtrain.data.lm_dataset import build_lm_loader, iterate_forever
from mmtrain.data.prepare import demo_prepare_config, prepare
from mmtrain.data.tokenizer import DEMO_TOKENIZER, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
N_CTX = 32
BATCH = 4


def make_cfg(**kw):
    return load_config(PrepareConfig, [], [f"{k}={json.dumps(v)}" for k, v in kw.items()])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    # what the trainer's auto_prepare runs (with a max_docs cap to stay small)
    prepare(demo_prepare_config(str(out), [N_CTX], max_docs=60, val_fraction=0.1, num_proc=1), progress=False)
    return out


def loader(shard_dir, num_workers=0, seed=0, **kw):
    return build_lm_loader(shard_dir, N_CTX, "train", BATCH, shuffle=True, seed=seed, num_workers=num_workers, **kw)


def take(stream, n):
    return [next(stream)["input_ids"].clone() for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def batches_per_epoch(shard_dir):
    return sum(1 for _ in loader(shard_dir))


def test_batches_are_long_tensors_of_n_ctx_and_an_epoch_covers_every_sample_once(shard_dir):
    meta = S.read_meta(shard_dir, N_CTX)
    samples = meta["splits"]["train"]["samples"]
    batches = list(loader(shard_dir, drop_last=False))
    assert all(set(b) == {"input_ids"} for b in batches)
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["input_ids"].shape == (BATCH, N_CTX)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape[0] == samples
    in_order = torch.cat([b["input_ids"] for b in build_lm_loader(
        shard_dir, N_CTX, "train", BATCH, shuffle=False, seed=0, num_workers=0, drop_last=False)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, in_order.tolist()))
    assert not torch.equal(rows, in_order)  # shuffled
    assert len(list(loader(shard_dir))) == samples // BATCH  # drop_last


def test_shuffling_is_seeded_and_changes_every_epoch(shard_dir):
    n = batches_per_epoch(shard_dir)
    a = take(iterate_forever(loader(shard_dir, seed=1)), 2 * n)
    b = take(iterate_forever(loader(shard_dir, seed=1)), 2 * n)
    c = take(iterate_forever(loader(shard_dir, seed=2)), n)
    assert same(a, b)
    assert not same(a[:n], c)
    assert not same(a[:n], a[n:])  # epoch 2 is reshuffled ...
    everything = {tuple(r) for b in loader(shard_dir, drop_last=False) for r in b["input_ids"].tolist()}
    for epoch in (a[:n], a[n:]):  # ... each epoch: distinct samples (drop_last leaves out < BATCH)
        rows = [tuple(r) for r in torch.cat(epoch).tolist()]
        assert len(set(rows)) == len(rows) and set(rows) <= everything


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_with_exactly_the_next_batches(shard_dir, num_workers):
    reference = take(iterate_forever(loader(shard_dir, num_workers)), 12)
    first = loader(shard_dir, num_workers)
    stream = iterate_forever(first)
    head = take(stream, 5)
    state = first.state_dict()
    del stream, first
    resumed = loader(shard_dir, num_workers)
    resumed.load_state_dict(state)
    tail = take(iterate_forever(resumed), 7)
    assert same(head + tail, reference)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_across_the_epoch_boundary(shard_dir, num_workers):
    n = batches_per_epoch(shard_dir)
    total = n + 4
    reference = take(iterate_forever(loader(shard_dir, num_workers)), total)
    for k in (n - 1, n, n + 1):
        first = loader(shard_dir, num_workers)
        stream = iterate_forever(first)
        head = take(stream, k)
        state = first.state_dict()
        del stream, first
        resumed = loader(shard_dir, num_workers)
        resumed.load_state_dict(state)
        tail = take(iterate_forever(resumed), total - k)
        assert same(head + tail, reference), f"resume after {k} batches (epoch has {n})"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_read_disjoint_batches_and_resume_exactly(shard_dir, tmp_path):
    n = batches_per_epoch(shard_dir) // 2  # batches per rank per epoch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "scripts" / "data_resume_two_ranks.py"),
           str(shard_dir), str(N_CTX), str(tmp_path), "2", str(n - 1), str(n + 3)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["state"] == r1["state"]  # any rank's state_dict restores all ranks
    for r in (r0, r1):
        assert r["resumed"] == r["reference"]
    epoch0 = [tuple(row) for b in r0["reference"][:n] for row in b]
    epoch0_other = [tuple(row) for b in r1["reference"][:n] for row in b]
    assert len(epoch0) == n * BATCH
    assert not set(epoch0) & set(epoch0_other)  # ranks split each epoch


def test_pad_mode_batches_carry_an_attention_mask(tmp_path):
    prepare(make_cfg(input=["demo"], out=str(tmp_path), n_ctx=[N_CTX], tokenizer=str(DEMO_TOKENIZER), max_docs=40,
                     packing="pad", val_fraction=0.2, num_proc=1), progress=False)
    batch = next(iter(build_lm_loader(tmp_path, N_CTX, "val", 2, shuffle=False, seed=0, num_workers=0)))
    assert set(batch) == {"input_ids", "attention_mask"}
    mask, ids = batch["attention_mask"], batch["input_ids"]
    assert mask.dtype == torch.long and mask.shape == ids.shape == (2, N_CTX)
    assert ((ids == 0) | (mask == 1)).all() and (ids[mask == 0] == 0).all()


# --- checks that fail before any work ---------------------------------------------------------


@pytest.fixture()
def shard_copy(shard_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(shard_dir, dst)
    return dst


def test_missing_shards_say_which_prepare_command_to_run(shard_dir, tmp_path):
    with pytest.raises(DataError) as err:
        build_lm_loader(tmp_path / "nothing", 128, "train", 2, shuffle=True, seed=0, num_workers=0)
    assert f"mmtrain prepare --input demo --out {tmp_path / 'nothing'} --n-ctx 128" in str(err.value)
    with pytest.raises(DataError) as err:  # a sibling ctx dir exists: reuse its inputs and tokenizer
        S.check_shards(shard_dir, 64)
    assert (f"mmtrain prepare --input demo --out {shard_dir} --n-ctx 64 --tokenizer "
            f"{shard_dir / 'tokenizer.model'} max_docs=60 val_fraction=0.1") in str(err.value)


def test_a_directory_without_meta_json_is_incomplete(shard_copy):
    (shard_copy / f"ctx{N_CTX}" / "meta.json").unlink()
    with pytest.raises(DataError, match="incomplete shard directory .*no meta.json"):
        S.check_shards(shard_copy, N_CTX)


def test_n_ctx_mismatch_is_an_error(shard_copy):
    os.rename(shard_copy / f"ctx{N_CTX}", shard_copy / "ctx64")
    with pytest.raises(DataError, match=f"written for n_ctx={N_CTX}, expected n_ctx=64"):
        build_lm_loader(shard_copy, 64, "train", 2, shuffle=True, seed=0, num_workers=0)


def test_tokenizer_hash_and_vocab_mismatch_are_errors(shard_dir):
    good = load_tokenizer(DEMO_TOKENIZER).sha256
    S.check_shards(shard_dir, N_CTX, tokenizer_hash=good, vocab_size=4096)
    with pytest.raises(DataError, match=f"tokenizer sha256 {good}.*expected tokenizer has sha256 {'0' * 64}"):
        build_lm_loader(shard_dir, N_CTX, "train", 2, shuffle=True, seed=0, num_workers=0,
                        expected_tokenizer_hash="0" * 64)
    with pytest.raises(DataError, match="vocab_size 4096, expected 8192"):
        build_lm_loader(shard_dir, N_CTX, "train", 2, shuffle=True, seed=0, num_workers=0,
                        expected_vocab_size=8192)


def shard_file(root):
    return next((root / f"ctx{N_CTX}" / "train").glob("shard.*.mds"))


def test_a_truncated_shard_file_is_an_error(shard_copy):
    path = shard_file(shard_copy)
    size = path.stat().st_size
    os.truncate(path, size - 10)
    with pytest.raises(DataError, match=f"{size - 10} bytes on disk, index.json says {size}.*truncated"):
        build_lm_loader(shard_copy, N_CTX, "train", 2, shuffle=True, seed=0, num_workers=0)


def test_corrupt_shard_files_are_errors(shard_copy):
    path = shard_file(shard_copy)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # sample count in the header
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt MDS header"):
        S.check_shards(shard_copy, N_CTX)
    data[0] ^= 0xFF
    data[-5] ^= 0xFF  # a token in the last sample: same size, valid header
    path.write_bytes(bytes(data))
    S.check_shards(shard_copy, N_CTX)  # the cheap check cannot see it ...
    with pytest.raises(DataError, match="sha1 .* does not match index.json"):
        S.check_shards(shard_copy, N_CTX, verify_hashes=True)  # ... the hash check does
    (shard_copy / f"ctx{N_CTX}" / "val" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="val/index.json: corrupt index"):
        S.check_shards(shard_copy, N_CTX)


def test_an_epoch_without_a_single_batch_is_an_error(shard_dir):
    samples = S.read_meta(shard_dir, N_CTX)["splits"]["val"]["samples"]
    tiny = build_lm_loader(shard_dir, N_CTX, "val", samples + 1, shuffle=False, seed=0, num_workers=0)
    with pytest.raises(DataError, match="an epoch yields no batch"):
        next(iterate_forever(tiny))


def test_the_deepspeed_launcher_environment_is_translated_for_streaming(monkeypatch):
    from mmtrain.data.lm_dataset import _launcher_env

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")  # recorded, so the variable set below is undone too
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what `deepspeed --num_gpus 2` sets
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _launcher_env() == 2  # nodes
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"


def test_streaming_stand_ins_last_only_while_streaming_imports():
    """mmtrain skips streaming's ready-made datasets while importing it, but a later import of one
    gets the real module (not an empty stand-in), and transformers is not loaded for nothing."""
    code = ("import sys; import mmtrain.data.streaming_compat as c; "
            "assert 'transformers' not in sys.modules and 'streaming.text' not in sys.modules; "
            "import streaming.text; print(hasattr(streaming.text, 'StreamingC4'), c.StreamingDataset.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "streaming.base.dataset"]


def test_the_shared_memory_namespace_prefixes_every_name_streaming_creates(shard_dir, monkeypatch):
    """Jobs with different MMTRAIN_SHM_NAMESPACE values never share a /dev/shm or lock-file name
    (what lets the suite run on several xdist workers and two multi-rank jobs start at once)."""
    from mmtrain.data.streaming_compat import shm_namespace

    monkeypatch.setenv("MMTRAIN_SHM_NAMESPACE", "unit-test_ns 42")
    assert shm_namespace() == "unittestns42"
    before = set(os.listdir("/dev/shm"))
    loader = build_lm_loader(shard_dir, N_CTX, "val", 2, shuffle=False, seed=0, num_workers=0)
    next(iter(loader))
    created = set(os.listdir("/dev/shm")) - before
    assert created and all(name.startswith("unittestns42_") for name in created), sorted(created)
    dataset = loader.dataset
    assert os.path.basename(dataset._cache_filelock_path).startswith("unittestns42_")
    monkeypatch.delenv("MMTRAIN_SHM_NAMESPACE")
    assert shm_namespace() == ""
