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


# --------------------------------------------------------------------------------------------
# Ranges: every numeric setting declares its valid values; out-of-range values exit 2
# --------------------------------------------------------------------------------------------


def _schemas():
    from mmtrain.cli import schemas

    return schemas()


def _numeric_fields(schema_cls, prefix=""):
    """(dotted key, field) of every int / float / List[int] / List[float] leaf of a schema."""
    import dataclasses

    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        sub = C._dataclass_type(schema_cls, f)
        if sub is not None:
            yield from _numeric_fields(sub, dotted)
        elif str(f.type) in ("int", "float", "List[int]", "List[float]"):
            yield dotted, f


@pytest.mark.parametrize("name", ["pretrain", "retrieval", "prepare", "pairs", "frozen_retrieval"])
def test_every_numeric_setting_declares_a_range_its_default_satisfies(name):
    from omegaconf import OmegaConf

    schema = _schemas()[name]
    fields = list(_numeric_fields(schema))
    assert len(fields) >= 5   # the walk finds the numeric settings
    missing = [key for key, f in fields if "range" not in f.metadata and "choices" not in f.metadata]
    assert not missing, f"numeric settings without a declared range: {missing}"
    assert C.check_ranges(OmegaConf.structured(schema), schema) == []


# The probes of the fault round: each exited with a traceback or was accepted silently.
PRETRAIN_PROBES = [
    ("logging.log_every=0", "logging.log_every: must be >= 1, got 0"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
    ("train.beta2=1.5", "train.beta2: must be in [0, 1), got 1.5"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("train.weight_decay=-1", "train.weight_decay: must be a finite number >= 0, got -1.0"),
    ("engine.grad_clip=-1", "engine.grad_clip: must be a finite number >= 0, got -1.0"),
    ("train.eval_batches=0", "train.eval_batches: must be >= 1, got 0"),
]


def test_out_of_range_pretrain_settings_exit_2_with_every_problem_in_one_message(capsys):
    from mmtrain.pretrain import main as pretrain_main

    rc = pretrain_main([probe for probe, _ in PRETRAIN_PROBES] + ["train.global_batch_size=10",
                                                                 "train.micro_batch_size=4"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{len(PRETRAIN_PROBES) + 1} configuration problems" in err   # the validator's too
    for _, problem in PRETRAIN_PROBES:
        assert f"{problem} (command line)" in err
    assert "global_batch_size 10 is not divisible by train.micro_batch_size 4" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, base, probes", [
    ("retrieval", ["retrieval.bundle=b"], ["retrieval.eval_seed=-1", "train.beta1=1", "retrieval.temperature=0",
                                           "retrieval.eval_n_candidates=[32,1]"]),
    ("prepare", [], ["tokenizer_spec.character_coverage=0", "max_docs=-1", "tokenizer_spec.seed=4294967296"]),
    ("pairs", ["bundle=b"], ["max_pairs=-1", "crop_min_ratio=0", "min_span_tokens=0"]),
    ("frozen_retrieval", ["embeddings.bundle=b"], ["model.norm_eps=0", "train.seed=-3", "train.epochs=-1"]),
])
def test_out_of_range_settings_of_every_schema_are_listed_together(name, base, probes, capsys):
    from mmtrain.cli import main as cli_main

    assert cli_main(["show-config", name] + base + probes) == 2
    err = capsys.readouterr().err
    assert f"{len(probes)} configuration problem" in err
    for probe in probes:
        key, value = probe.split("=")
        line = next(line for line in err.splitlines() if line.startswith(f"  - {key}:"))
        assert "must be" in line and "(command line)" in line
        assert re.search(r"must be (in [\[(]|a finite number [<>]|[<>]=? )", line), line
        assert value.split(",")[-1].strip("[]") in line.split("got ")[-1], line


def test_model_ranges_also_guard_configs_built_without_load_config():
    """validate_model (used for a bundle's config.json) checks the declared ranges too."""
    from omegaconf import OmegaConf

    from mmtrain.models.schema import ModelConfig, validate_model

    m = OmegaConf.structured(ModelConfig)
    m.norm_eps, m.rope_theta, m.init_std = 0.0, -1.0, float("nan")
    problems = validate_model(m)
    assert "model.norm_eps: must be a finite number > 0, got 0.0" in problems
    assert "model.rope_theta: must be a finite number > 0, got -1.0" in problems
    assert "model.init_std: must be a finite number > 0, got nan" in problems


def test_config_reference_shows_each_range(capsys):
    from mmtrain.cli import main as cli_main

    assert cli_main(["config-reference", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| key | type | default | range | role | meaning |"
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| `")}
    assert rows["logging.log_every"][2] == ">= 1"
    assert rows["train.seed"][2] == "[0, 4294967295]"
    assert rows["train.beta1"][2] == "[0, 1)"
    assert rows["train.weight_decay"][2] == ">= 0"
    assert rows["engine.grad_clip"][2] == ">= 0"
    assert rows["train.eval_batches"][2] == ">= 1"
    assert rows["train.lr"][2] == "> 0"
    # the role of each setting: what a resume may change and what the HParams dashboard shows
    assert rows["train.lr"][3] == "train" and rows["engine.zero_stage"][3] == "layout"
    assert rows["logging.log_every"][3] == "watch" and rows["data.verify_shards"][3] == "watch"
    assert rows["train.eval_n_ctx"][2] == "each >= 1"
    assert rows["engine.zero_stage"][2] == "one of 0, 1, 2, 3"
    assert rows["model.kind"][2] == ""   # not a number


def test_nested_list_entries_are_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError, match=r"train.eval_n_ctx \(command line\): every entry must be a single value"):
        load_config(PretrainConfig, [], ["train.eval_n_ctx=[[1]]"])


# --------------------------------------------------------------------------------------------
# Reading --config files defensively
# --------------------------------------------------------------------------------------------


def test_config_that_is_a_directory_exits_2_naming_it(tmp_path, capsys):
    from mmtrain.pretrain import main as pretrain_main

    assert pretrain_main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a directory" in err and "Traceback" not in err


def test_config_that_is_not_utf8_exits_2_without_quoting_it(tmp_path, capsys):
    from mmtrain.pretrain import main as pretrain_main

    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  lr: 1e-3\n# token=s3cr3t caf\u00e9\n".encode("latin-1"))
    assert pretrain_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text (invalid byte at offset 36, line 3)" in err
    assert "s3cr3t" not in err and "Traceback" not in err


def test_a_wrong_file_given_as_config_is_not_echoed(tmp_path):
    key = write(tmp_path, "id_key", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n")
    bad = write(tmp_path, "bad.yaml", "train:\n  lr: [1e-3\n  note: s3cr3t\n")
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, [key])
    assert "expected a mapping" in str(info.value) and "MIIEvQ" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, [bad])
    assert re.search(r"bad.yaml: not valid YAML: line \d+, column \d+: ", str(info.value))
    assert "s3cr3t" not in str(info.value)


def _alias_bomb(levels: int = 9) -> str:
    """The "billion laughs" document: level k lists level k-1 nine times (9**levels strings)."""
    names = [f"l{k}" for k in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + f"\nlogging:\n  sample_prompts: *{names[-1]}\n"


def test_yaml_alias_bomb_is_refused_within_a_second(tmp_path, capsys):
    import time

    from mmtrain.cli import main as cli_main

    bomb = write(tmp_path, "bomb.yaml", _alias_bomb(9))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: refused: the YAML expands to more than \d+ values"):
        load_config(PretrainConfig, [bomb])
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    assert cli_main(["show-config", "pretrain", "--config", bomb]) == 2
    assert time.perf_counter() - start < 1.0
    assert "refused" in capsys.readouterr().err
    # The same bound holds for an override, which is YAML too (5 levels of 10: 10**5 strings).
    levels = ["&l0 [" + ",".join(["x"] * 10) + "]"]
    levels += [f"&l{k} [" + ",".join([f"*l{k - 1}"] * 10) + "]" for k in range(1, 5)]
    with pytest.raises(ConfigError, match="command line: logging.sample_prompts: refused: the YAML value expands"):
        load_config(PretrainConfig, [], [f"logging.sample_prompts=[{', '.join(levels)}]"])


def test_recursive_yaml_alias_is_refused(tmp_path):
    path = write(tmp_path, "loop.yaml", "logging:\n  sample_prompts: &a [x, *a]\n")
    with pytest.raises(ConfigError, match="loop.yaml: refused: .*recursive"):
        load_config(PretrainConfig, [path])


def test_yaml_with_a_few_small_aliases_still_loads(tmp_path):
    path = write(tmp_path, "aliases.yaml",
                 "train:\n  warmup_steps: &w 10\n  eval_every: *w\n  eval_n_ctx: &lens [16, 32]\n"
                 "model:\n  n_ctx: 64\nlogging:\n  sample_prompts: [&p Return the, *p]\n"
                 "checkpoint:\n  <<: {every: 5, keep_last: 2}\n")
    cfg = load_config(PretrainConfig, [path])
    assert cfg.train.eval_every == 10 and list(cfg.train.eval_n_ctx) == [16, 32]
    assert list(cfg.logging.sample_prompts) == ["Return the", "Return the"]
    assert cfg.checkpoint.every == 5 and cfg.checkpoint.keep_last == 2


def test_resume_checks_and_hparams_read_each_settings_role():
    import copy

    from mmtrain.config import to_dict
    from mmtrain.train.monitor import run_hparams
    from mmtrain.train.trainer import resume_changes, resume_mutable

    cfg = load_config(PretrainConfig, [], [])
    saved = to_dict(cfg)
    current = copy.deepcopy(saved)
    current["train"]["lr"] = 1e-3                    # train: refused
    current["engine"]["zero_stage"] = 2              # layout: may change
    current["data"]["verify_shards"] = False         # watch: may change
    current["logging"]["log_every"] = 1              # watch
    forbidden, applied, unloadable = resume_changes(saved, current, (), resume_mutable(cfg))
    assert [line.split(":")[0] for line in forbidden] == ["train.lr"] and not unloadable
    assert [line.split(":")[0] for line in applied] == ["data.verify_shards", "engine.zero_stage", "logging.log_every"]
    from mmtrain.config import setting_roles

    watch = [k for k, role in setting_roles(PretrainConfig).items() if role == "watch"]
    hparams = run_hparams(saved, watch=watch)
    assert "train.lr" in hparams and "engine.zero_stage" in hparams
    assert "data.verify_shards" not in hparams and "logging.log_every" not in hparams


@pytest.mark.parametrize("key", ["train.eval_n_ctx=[16]", "train.eval_batches=2", "logging.sample_tokens=3",
                                 "logging.sample_prompts=[a]"])
def test_retrieval_configs_refuse_the_pretraining_only_keys(key):
    with pytest.raises(ConfigError, match=f"unknown key '{key.split('=')[0]}'"):
        load_config(RetrievalConfig, [], ["retrieval.bundle=b", key])
    load_config(PretrainConfig, [], [key])   # pretraining reads them


def test_retrieval_learning_rate_default_is_the_retrieval_studys():
    assert load_config(RetrievalConfig, [], ["retrieval.bundle=b"]).train.lr == 1e-3
    assert load_config(PretrainConfig, [], []).train.lr == 4e-3
