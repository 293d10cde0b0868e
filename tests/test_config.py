"""Typed configuration: defaults <- YAML files <- overrides, with all problems reported at once."""

import re

import pytest

from mmtrain import config as C
from mmtrain.config import ConfigError, load_config, reference, to_yaml
from mmtrain.data.schema import PrepareConfig
from mmtrain.train.schema import PretrainConfig, RetrievalConfig


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_then_files_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  d_model: 64\n  n_layers: 2\ntrain:\n  lr: 1e-3\n")
    b = write(tmp_path, "b.yaml", "model:\n  d_model: 32\n")
    cfg = load_config(PretrainConfig, [a, b], ["train.lr=3e-4", "model.kind=transformer"])
    assert cfg.model.d_model == 32  # later file wins
    assert cfg.model.n_layers == 2
    assert cfg.model.kind == "transformer"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == PretrainConfig().train.micro_batch_size


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    a = write(tmp_path, "a.yaml", "train:\n  lr: 1e-4\n  weight_decay: 5E-2\n")
    cfg = load_config(PretrainConfig, [a])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(0.05)


def test_two_misspelled_keys_and_one_wrong_type_reported_together(tmp_path):
    bad = write(
        tmp_path,
        "bad.yaml",
        "model:\n  d_modle: 64\n  n_layers: eight\ntrian:\n  lr: 1e-3\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, [bad])
    msg = str(info.value)
    assert len(info.value.problems) == 3
    assert "model.d_modle" in msg and "did you mean 'd_model'" in msg
    assert "trian" in msg and "did you mean 'train'" in msg
    assert "model.n_layers" in msg and "'eight'" in msg
    assert msg.count(str(bad)) == 3  # every problem names the file


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, [], ["train.lrr=1", "engine.zero_stage=7", "model.kind=rnn"])
    msg = str(info.value)
    assert "train.lrr" in msg and "command line" in msg
    assert "engine.zero_stage" in msg and "7" in msg
    assert "model.kind" in msg and "'rnn'" in msg


def test_impossible_combinations_are_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(
            PretrainConfig,
            [],
            [
                "train.global_batch_size=10",
                "train.micro_batch_size=4",
                "engine.precision=bf16",
                "engine.zero_stage=0",
                "model.mixer_heads=3",
                "model.d_model=64",
            ],
        )
    msg = str(info.value)
    assert "global_batch_size 10 is not divisible by train.micro_batch_size 4" in msg
    assert "bf16 needs engine.zero_stage >= 1" in msg
    assert "not divisible by 3 heads" in msg


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(PretrainConfig, [str(tmp_path / "nope.yaml")])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, [], ["train.lr=2.5e-4", "train.eval_n_ctx=[32,64]", "model.n_ctx=128"])
    dumped = write(tmp_path, "resolved.yaml", to_yaml(cfg))
    again = load_config(PretrainConfig, [dumped])
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_prepare_schema_lists_and_nested_spec():
    cfg = load_config(PrepareConfig, [], ["n_ctx=[64,256]", "tokenizer_spec.vocab_size=1000", "input=[a.txt,b.jsonl]"])
    assert list(cfg.n_ctx) == [64, 256]
    assert cfg.tokenizer_spec.vocab_size == 1000
    assert list(cfg.input) == ["a.txt", "b.jsonl"]


def test_every_field_is_documented():
    for schema in (PretrainConfig, PrepareConfig):
        for line in reference(schema):
            help_text = line.rsplit("|", 2)[-2].strip()
            assert help_text, f"undocumented config field: {line}"


@pytest.mark.parametrize("overrides, problem", [
    (["engine.offload_optimizer=true", "engine.zero_stage=0"], "engine.offload_optimizer needs engine.zero_stage >= 1"),
    (["engine.offload_params=true", "engine.zero_stage=2"], "engine.offload_params needs engine.zero_stage 3"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio: must be in [0, 1]"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "is not divisible by"),
    (["retrieval.learn_temperature=true", "retrieval.grad_cache_chunk=8"], "retrieval.learn_temperature"),
])
def test_retrieval_configs_get_the_same_engine_checks_as_pretraining(overrides, problem):
    for schema, base in ((RetrievalConfig, ["retrieval.bundle=b"]), (PretrainConfig, [])):
        if schema is PretrainConfig and overrides[0].startswith("retrieval."):
            continue
        with pytest.raises(C.ConfigError, match=re.escape(problem)):
            C.load_config(schema, [], base + overrides)
