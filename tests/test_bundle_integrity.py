"""Bundle integrity: weight digests recorded at export and checked before any weight is used
(load_pretrained and the CLI commands on it, transformers' loader through the bundle's
modeling_mmtrain.py, `mmtrain verify`), and config.json validated against the schema and the
safetensors headers before a model is allocated. Every bundle here is a copy of an exported one.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest

from mmtrain.cli import main as cli_main
from mmtrain.export import bundle as B

SOURCE = "mixer_zero1"


def copy_bundle(exported_bundles, tmp_path, name=SOURCE):
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundles[name], bundle)
    return bundle


def flip_byte(path, from_end=1000):
    """Flip the sign bit of one byte in the tensor data (not the header) of a safetensors file."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - from_end > header_end
    data[-from_end] ^= 0x80
    path.write_bytes(bytes(data))


def edit_config(bundle, edit):
    config = json.loads((bundle / "config.json").read_text())
    edit(config["mmtrain"])
    (bundle / "config.json").write_text(json.dumps(config))


def peak_rss_kib_after(fn):
    """(result or exception, peak resident memory above the RSS at the start, KiB) of fn()."""
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")   # reset VmHWM (the peak) to the current RSS
    start = status("VmRSS")
    try:
        outcome = fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        outcome = exc
    return outcome, status("VmHWM") - start


def test_bundles_record_the_digest_and_size_of_every_weight_file(exported_bundles, tmp_path):
    section = B.read_bundle_config(exported_bundles[SOURCE])
    assert section["digests"] == {B.WEIGHTS_NAME: B.file_digest(exported_bundles[SOURCE] / B.WEIGHTS_NAME)}
    # the sharded layout: every shard and the index
    model = B.load_pretrained(exported_bundles[SOURCE])
    config = B.write_bundle(model, tmp_path / "sharded", exported_bundles[SOURCE] / B.TOKENIZER_NAME,
                            max_shard_size=B.parse_size("200KB"))
    digests = config["mmtrain"]["digests"]
    assert sorted(digests) == sorted(config["mmtrain"]["weight_files"]) and len(digests) > 2
    assert all(digests[f] == B.file_digest(tmp_path / "sharded" / f) for f in digests)
    shard = next(f for f in digests if f.startswith("model-00002"))
    flip_byte(tmp_path / "sharded" / shard, from_end=100)
    with pytest.raises(B.BundleError, match=rf"{shard}: sha256 [0-9a-f]{{64}}, config.json records "
                                            rf"{digests[shard]['sha256']}"):
        B.load_pretrained(tmp_path / "sharded")


def test_a_flipped_byte_in_the_weights_makes_eval_lm_exit_2_naming_the_file(exported_bundles, demo_shards,
                                                                             tmp_path, capsys):
    bundle = copy_bundle(exported_bundles, tmp_path)
    recorded = B.read_bundle_config(bundle)["digests"][B.WEIGHTS_NAME]["sha256"]
    flip_byte(bundle / B.WEIGHTS_NAME)
    found = B.file_digest(bundle / B.WEIGHTS_NAME)["sha256"]
    rc = cli_main(["eval-lm", str(bundle), "--data", str(demo_shards), "--max-sequences", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{bundle / B.WEIGHTS_NAME}: sha256 {found}, config.json records {recorded}" in err
    assert "re-export the bundle" in err
    # a truncated file is named as truncated, before its header is read
    (bundle / B.WEIGHTS_NAME).write_bytes((bundle / B.WEIGHTS_NAME).read_bytes()[:-10])
    assert cli_main(["generate", str(bundle), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert "bytes, config.json records" in capsys.readouterr().err


def test_verify_exits_0_on_a_clean_bundle_and_2_on_a_corrupt_one(exported_bundles, tmp_path, capsys):
    for name in (SOURCE, "transformer_zero2"):
        assert cli_main(["verify", str(exported_bundles[name])]) == 0
        out = capsys.readouterr().out
        assert "verified: config.json, tensor shapes, weight digests and tokenizer all match" in out
        assert f"{B.WEIGHTS_NAME}: " in out and " ok" in out
    bundle = copy_bundle(exported_bundles, tmp_path)
    flip_byte(bundle / B.WEIGHTS_NAME)
    assert cli_main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert f"{bundle / B.WEIGHTS_NAME}: sha256 " in err and "(corrupted or changed after export)" in err


def test_oversized_config_dims_are_refused_before_anything_is_allocated(exported_bundles, tmp_path, capsys):
    bundle = copy_bundle(exported_bundles, tmp_path)
    # the probe of the issue: a config that claims a 256 GiB model for a 0.6 MB file
    edit_config(bundle, lambda m: m["model"].update(d_model=65536, vocab_size=2**20))
    start = time.perf_counter()
    assert cli_main(["verify", str(bundle)]) == 2
    assert time.perf_counter() - start < 5
    assert "needs at least 68,719,476,736 weights for vocab_size 1048576 x d_model 65536" in capsys.readouterr().err
    # a size this machine could allocate (~0.8 GB): measured, nothing near it is touched
    edit_config(bundle, lambda m: m["model"].update(d_model=2048, vocab_size=32768))
    outcome, peak_kib = peak_rss_kib_after(lambda: B.load_pretrained(bundle))
    assert isinstance(outcome, B.BundleError) and "weights do not match config.json's model" in str(outcome)
    assert peak_kib < 100 * 1024, f"{peak_kib / 1024:.0f} MiB touched before the config was refused"


@pytest.mark.parametrize("edit, listed", [
    (lambda m: m["model"].update(kind="mixxer"),
     "mmtrain.model.kind: \"mixxer\" is not one of 'mixer', 'transformer'"),
    (lambda m: m["model"].update(d_model="32"), 'mmtrain.model.d_model: expected an integer, found a string ("32")'),
], ids=["kind_mixxer", "d_model_string"])
def test_a_config_of_the_wrong_kind_or_type_exits_2_listing_the_key(exported_bundles, demo_shards, tmp_path,
                                                                    capsys, edit, listed):
    bundle = copy_bundle(exported_bundles, tmp_path)
    edit_config(bundle, lambda m: (edit(m), m["model"].update(n_layers=-1)))
    for command in (["eval-lm", str(bundle), "--data", str(demo_shards), "--quiet"],
                    ["generate", str(bundle), "--prompt", "x"], ["verify", str(bundle)]):
        assert cli_main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{bundle / 'config.json'}: not a valid bundle config" in err and listed in err, err
        assert "mmtrain.model.n_layers: must be >= 1, got -1" in err   # every problem, not the first


def test_a_config_json_that_is_not_an_object_or_not_json_is_named_not_echoed(exported_bundles, tmp_path, capsys):
    bundle = copy_bundle(exported_bundles, tmp_path)
    for text, said in (('["SECRET-TOKEN-1"]', "no 'mmtrain' section"),
                       ('{"mmtrain": SECRET-TOKEN-1}', "not valid JSON (Expecting value at line 1 column 13)")):
        (bundle / "config.json").write_text(text)
        assert cli_main(["generate", str(bundle), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert f"{bundle / 'config.json'}: {said}" in err and "SECRET" not in err, err


def test_a_bundle_without_digests_loads_with_a_warning_and_verify_says_it_cannot_check_it(
        exported_bundles, tmp_path, capsys):
    bundle = copy_bundle(exported_bundles, tmp_path)
    edit_config(bundle, lambda m: m.pop("digests"))   # as a bundle of an earlier mmtrain
    B.load_pretrained(bundle)
    assert f"[mmtrain] warning: {bundle}: config.json records no weight digests" in capsys.readouterr().err
    assert cli_main(["verify", str(bundle)]) == 2
    assert "records no weight digests" in capsys.readouterr().err
    flipped = tmp_path / "flipped"   # verify=False skips the digests only (an opt-out for benchmarks)
    shutil.copytree(exported_bundles[SOURCE], flipped)
    flip_byte(flipped / B.WEIGHTS_NAME)
    B.load_pretrained(flipped, verify=False)
    with pytest.raises(B.BundleError, match="do not match the digests"):
        B.load_pretrained(flipped)


def test_transformers_loader_checks_the_digests_through_the_bundles_own_modeling_file(exported_bundles, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
    from mmtrain.export.hf import import_transformers

    auto = import_transformers().AutoModelForCausalLM
    local = dict(trust_remote_code=True, local_files_only=True)
    bundle = copy_bundle(exported_bundles, tmp_path)
    auto.from_pretrained(bundle, **local)
    flip_byte(bundle / B.WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{bundle / B.WEIGHTS_NAME}: sha256 [0-9a-f]{{64}}, config.json records"):
        auto.from_pretrained(bundle, **local)
    edit_config(bundle, lambda m: m.pop("digests"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto.from_pretrained(bundle, **local)
    assert any("records no weight digests" in str(w.message) for w in caught)
