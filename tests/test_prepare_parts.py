"""`mmtrain prepare --part I/N` and `--merge`: parts in any order join into the dataset one prepare writes."""

import json
from collections import Counter

import pytest

from conftest import TINY, pretrain_in_process, train_losses
from mmtrain.cli import main
from mmtrain.config import ConfigError
from mmtrain.data import DataError
from mmtrain.data import parts as P
from mmtrain.data import shards as S
from mmtrain.data.prepare import demo_prepare_config, prepare
from mmtrain.data.streaming_compat import read_samples
from mmtrain.data.tokenizer import DEMO_TOKENIZER

DOCS = 300


def run_parts(out, order, count=2, n_ctx=(32,), **kw):
    for i in order:
        summary = prepare(demo_prepare_config(str(out), list(n_ctx), max_docs=DOCS, num_proc=1,
                                              part=f"{i}/{count}", **kw), progress=False)
        assert all(info["status"] == "written" for info in summary["ctx"].values())
    return prepare(demo_prepare_config(str(out), list(n_ctx), merge=True), progress=False)


def samples(out, n_ctx, split):
    """Each stored sample as comparable bytes (tokens, and the length with pad packing)."""
    return [b"".join(bytes(memoryview(v)) for _, v in sorted(s.items()))
            for s in read_samples(S.split_dir(out, n_ctx, split))]


def test_parts_in_any_order_merge_into_identical_checked_shards(tmp_path, capsys):
    reverse = run_parts(tmp_path / "reverse", [1, 0], n_ctx=(32, 64))
    for i in (0, 1):   # in order, through the command line
        assert main(["prepare", "--input", "demo", "--out", str(tmp_path / "ordered"), "--n-ctx", "32", "64",
                     "--tokenizer", str(DEMO_TOKENIZER), "--part", f"{i}/2", "--num-proc", "1", "--quiet",
                     f"max_docs={DOCS}"]) == 0
    assert "part 1/2" in capsys.readouterr().out
    assert main(["prepare", "--out", str(tmp_path / "ordered"), "--n-ctx", "32", "64", "--merge"]) == 0
    assert "merged" in capsys.readouterr().out
    for n in (32, 64):
        assert reverse["ctx"][n]["status"] == "merged"
        metas = [S.check_shards(tmp_path / d, n, verify_hashes=True) for d in ("reverse", "ordered")]
        assert metas[0]["splits"] == metas[1]["splits"]
        assert metas[0]["prepare"]["parts"] == 2 and "part" not in metas[0]["prepare"]
        for split in S.SPLITS:
            got = samples(tmp_path / "reverse", n, split)
            assert got and got == samples(tmp_path / "ordered", n, split)
            index = json.loads((S.split_dir(tmp_path / "reverse", n, split) / "index.json").read_text())
            assert {i["raw_data"]["basename"].split("/")[0] for i in index["shards"]} == \
                {"part-00000-of-00002", "part-00001-of-00002"}
    assert (tmp_path / "reverse" / S.TOKENIZER_NAME).read_bytes() == DEMO_TOKENIZER.read_bytes()
    # a second merge and a rerun part are up to date
    again = prepare(demo_prepare_config(str(tmp_path / "reverse"), [32, 64], merge=True), progress=False)
    assert {info["status"] for info in again["ctx"].values()} == {"up to date"}
    rerun = prepare(demo_prepare_config(str(tmp_path / "reverse"), [32], max_docs=DOCS, num_proc=1, part="1/2"),
                    progress=False)
    assert rerun["ctx"][32]["status"] == "up to date"


def test_pad_parts_hold_the_samples_of_one_prepare(tmp_path):
    run_parts(tmp_path / "parts", [1, 0, 2], count=3, packing="pad")
    prepare(demo_prepare_config(str(tmp_path / "plain"), [32], max_docs=DOCS, num_proc=1, packing="pad"),
            progress=False)
    merged, plain = S.read_meta(tmp_path / "parts", 32), S.read_meta(tmp_path / "plain", 32)
    assert merged["splits"] == {s: {**plain["splits"][s], "bytes": merged["splits"][s]["bytes"]} for s in S.SPLITS}
    for split in S.SPLITS:
        assert Counter(samples(tmp_path / "parts", 32, split)) == Counter(samples(tmp_path / "plain", 32, split))


def test_concat_parts_hold_the_documents_of_one_prepare(tmp_path):
    run_parts(tmp_path / "parts", [0, 1])
    prepare(demo_prepare_config(str(tmp_path / "plain"), [32], max_docs=DOCS, num_proc=1), progress=False)
    merged, plain = S.read_meta(tmp_path / "parts", 32), S.read_meta(tmp_path / "plain", 32)
    for split in S.SPLITS:
        for key in ("documents", "document_tokens"):
            assert merged["splits"][split][key] == plain["splits"][split][key]
        # each part drops its own last partial block: at most one block per part fewer
        assert plain["splits"][split]["samples"] - 2 <= merged["splits"][split]["samples"] <= \
            plain["splits"][split]["samples"]
    # the documents of each part: those whose text hashes to it, split by their index in the whole corpus
    records = [json.loads(P.record_path(tmp_path / "parts", 32, (i, 2)).read_text()) for i in (0, 1)]
    assert sum(r["splits"]["train"]["documents"] + r["splits"]["val"]["documents"] for r in records) == DOCS
    assert min(r["splits"]["train"]["documents"] for r in records) > DOCS // 4


def test_merge_names_the_missing_parts(tmp_path, capsys):
    out = tmp_path / "out"
    prepare(demo_prepare_config(str(out), [32], max_docs=DOCS, num_proc=1, part="1/3"), progress=False)
    assert main(["prepare", "--out", str(out), "--n-ctx", "32", "--merge"]) == 2
    err = capsys.readouterr().err
    assert "parts 0/3, 2/3 of 3 are not complete" in err
    assert "part-00000-of-00003.json" in err and "part-00002-of-00003.json" in err
    assert not (out / "ctx32" / S.META_NAME).exists()
    with pytest.raises(DataError, match=r"no part records .* for n_ctx=64"):
        prepare(demo_prepare_config(str(out), [64], merge=True), progress=False)


def test_a_part_needs_a_shared_tokenizer(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--input", "demo", "--out", str(out), "--n-ctx", "32", "--part", "0/2",
                 "max_docs=50"]) == 2
    err = capsys.readouterr().err
    assert "must share one tokenizer" in err and "--tokenizer FILE" in err and str(DEMO_TOKENIZER) in err
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"part: expected I/N with 0 <= I < N"):
        demo_prepare_config(str(out), [32], part="2/2")
    with pytest.raises(ConfigError, match=r"part: expected I/N"):
        demo_prepare_config(str(out), [32], part="half")
    # a first plain prepare leaves <out>/tokenizer.model, which the parts then share
    prepare(demo_prepare_config(str(out), [64], max_docs=50, num_proc=1), progress=False)
    cfg = demo_prepare_config(str(out), [32], max_docs=DOCS, num_proc=1, part="0/2", tokenizer="")
    assert prepare(cfg, progress=False)["tokenizer"]["source"] == "reused"


def test_a_killed_part_is_replaced_and_another_recipe_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    run_parts(out, [0, 1])
    want = samples(out, 32, "train")
    # not merged yet, and part 1 killed after writing its shards: no record, a damaged shard, a
    # temporary dir left behind
    (out / "ctx32" / S.META_NAME).unlink()
    P.record_path(out, 32, (1, 2)).unlink()
    shard = next(P.part_dir(out, 32, "train", (1, 2)).glob("shard.*.mds"))
    shard.write_bytes(shard.read_bytes()[:100])
    (P.records_dir(out, 32) / ".part-00001-of-00002.tmp-999999").mkdir()
    with pytest.raises(DataError, match=r"part 1/2 of 2 is not complete"):
        prepare(demo_prepare_config(str(out), [32], merge=True), progress=False)
    assert prepare(demo_prepare_config(str(out), [32], max_docs=DOCS, num_proc=1, part="1/2"),
                   progress=False)["ctx"][32]["status"] == "written"
    assert not (P.records_dir(out, 32) / ".part-00001-of-00002.tmp-999999").exists()
    prepare(demo_prepare_config(str(out), [32], merge=True), progress=False)
    S.check_shards(out, 32, verify_hashes=True)
    assert samples(out, 32, "train") == want
    with pytest.raises(ConfigError, match=r"another recipe .* --overwrite"):
        prepare(demo_prepare_config(str(out), [32], max_docs=DOCS, num_proc=1, part="0/2", seed=1), progress=False)
    # with --overwrite part 0 is rewritten; the merge then refuses the mix of recipes
    prepare(demo_prepare_config(str(out), [32], max_docs=DOCS, num_proc=1, part="0/2", seed=1, overwrite=True),
            progress=False)
    assert not (out / "ctx32" / S.META_NAME).exists()
    with pytest.raises(DataError, match=r"part 1/2 was prepared with another recipe than part 0/2 \(differs in seed\)"):
        prepare(demo_prepare_config(str(out), [32], merge=True), progress=False)


def test_merged_parts_train(tmp_path, one_torch_thread):
    out = tmp_path / "shards"
    run_parts(out, [1, 0], n_ctx=(16, 32))
    run_dir = tmp_path / "run"
    pretrain_in_process(["--config", TINY, f"data.shard_dir={out}", f"logging.run_dir={run_dir}", "model.n_ctx=32",
                         "train.steps=2", "train.eval_every=2", "checkpoint.every=0", "engine.peak_flops=1e11"])
    assert sorted(train_losses(run_dir)) == [1, 2]
