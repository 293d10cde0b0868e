"""Frozen-embedding retrieval (arXiv 2409.01482): the candidate sampler, the bidirectional scorer, its
training on synthetic embeddings, and `mmtrain frozen-retrieval` end to end on a session bundle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

from mmtrain import cli
from mmtrain.config import load_config
from mmtrain.eval.schema import FrozenRetrievalConfig
from mmtrain.eval.frozen_retrieval import load_scorer, train_scorer
from mmtrain.models.frozen_scorer import FrozenEmbeddingScorer, sample_candidates

DEMO = ROOT / "configs" / "frozen_retrieval" / "demo.yaml"


def test_sampler_puts_the_positive_once_at_the_label_and_never_the_query_document_among_negatives():
    pool, n = 20, 8
    queries = np.tile(np.arange(pool), 50)
    cands, labels = sample_candidates(queries, pool, n, np.random.default_rng(3))
    assert cands.shape == (len(queries), n - 1) and labels.shape == (len(queries),)
    assert (cands[np.arange(len(queries)), labels] == queries).all()
    assert ((cands == queries[:, None]).sum(axis=1) == 1).all()            # positive exactly once
    assert all(len(set(row)) == n - 1 for row in cands.tolist())            # no duplicates
    assert cands.min() >= 0 and cands.max() < pool
    # every slot is used for the positive and every other document shows up as a negative
    assert set(labels.tolist()) == set(range(n - 1))
    negatives_of_0 = set(cands[queries == 0].ravel().tolist()) - {0}
    assert negatives_of_0 == set(range(1, pool))
    again, again_labels = sample_candidates(queries, pool, n, np.random.default_rng(3))
    assert (again == cands).all() and (again_labels == labels).all()
    other, _ = sample_candidates(queries, pool, n, np.random.default_rng(4))
    assert (other != cands).any()
    # N = pool works: N-1 distinct documents, the query's own one among them
    full, _ = sample_candidates(np.arange(pool), pool, pool, np.random.default_rng(0))
    assert all(len(set(row)) == pool - 1 and q in row for q, row in enumerate(full.tolist()))


def test_n_larger_than_the_pool_is_refused():
    with pytest.raises(ValueError, match="N=21 is larger than the pool of 20 documents"):
        sample_candidates(np.arange(20), 20, 21, np.random.default_rng(0))


def test_scorer_is_bidirectional_and_gives_one_logit_per_candidate():
    torch.manual_seed(0)
    model = FrozenEmbeddingScorer(d_model=16, n_candidates=6, n_layers=2).eval()
    q, c = torch.randn(3, 16), torch.randn(3, 5, 16)
    logits = model(q, c)
    assert logits.shape == (3, 5)
    changed = c.clone()
    changed[:, 4] = torch.randn(3, 16)                        # the last position only
    after = model(q, changed)
    assert not torch.allclose(after[:, 0], logits[:, 0])      # the first candidate sees a later one
    assert not torch.allclose(after[:, :4], logits[:, :4])    # ... and so do all the others
    other_q = model(torch.randn(3, 16), c)
    assert (other_q - logits).abs().min() > 0                 # every candidate sees the query
    with pytest.raises(ValueError, match="expected 5 candidates"):
        model(q, c[:, :4])


def _synthetic(d, n, generator, noise=0.5):
    """Documents on the unit sphere; each query = its document + noise of norm ``noise``, renormalised."""
    docs = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    noise = noise * F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    return F.normalize(docs + noise, dim=-1), docs


def test_training_on_synthetic_embeddings_learns_to_retrieve(one_torch_thread):
    g = torch.Generator().manual_seed(0)
    tq, td = _synthetic(16, 512, g)
    eq, ed = _synthetic(16, 128, g)
    cfg = load_config(FrozenRetrievalConfig, [], [
        "embeddings.bundle=unused", "model.n_candidates=8", "model.n_layers=2", "train.steps=150",
        "train.batch_size=32", "train.lr=1e-2", "train.warmup_steps=10", "train.seed=0"])
    lines = []
    model, result = train_scorer({"train.query": tq, "train.document": td, "test.query": eq, "test.document": ed},
                                 cfg, log=lines.append)
    chance = 1 / 7
    assert result["chance"] == pytest.approx(chance)
    assert result["initial_accuracy"] < 2.5 * chance          # untrained: near chance
    assert result["accuracy"] > 0.8                           # trained: far above chance
    assert result["cosine_accuracy"] == 1.0                   # the noise keeps every query nearest its document
    assert result["history"][0]["step"] == 0 and result["history"][-1]["step"] == 150
    assert any("accuracy among 8" in line for line in lines)


def test_the_shipped_scorer_learns_on_unit_norm_embeddings_where_the_papers_stays_near_chance(one_torch_thread):
    """At d 128 each coordinate of an L2-normalised embedding is ~0.09, while every block adds terms
    of order 1: the paper's scorer (input_scale=none, interaction=none) barely moves from chance in
    40 steps, even where cosine similarity is perfect. The shipped default (embeddings times
    sqrt(d), the query-candidate product at each candidate position) learns the comparison."""
    g = torch.Generator().manual_seed(0)
    tq, td = _synthetic(128, 512, g, noise=1.0)
    eq, ed = _synthetic(128, 128, g, noise=1.0)
    emb = {"train.query": tq, "train.document": td, "test.query": eq, "test.document": ed}
    keys = ["embeddings.bundle=unused", "model.n_candidates=8", "model.n_layers=1", "train.steps=40",
            "train.batch_size=32", "train.lr=1e-2", "train.warmup_steps=10", "train.seed=0"]
    shipped = load_config(FrozenRetrievalConfig, [], keys)
    assert (shipped.model.input_scale, shipped.model.interaction) == ("sqrt_d", "product")
    _, fixed = train_scorer(emb, shipped, log=lambda s: None)
    paper = load_config(FrozenRetrievalConfig, [], [*keys, "model.input_scale=none", "model.interaction=none"])
    _, before = train_scorer(emb, paper, log=lambda s: None)
    assert fixed["cosine_accuracy"] == before["cosine_accuracy"] == 1.0
    assert fixed["accuracy"] > 0.9 and fixed["eval_loss"] < 0.5
    assert before["accuracy"] < 2.5 * before["chance"] and before["eval_loss"] > 1.8   # ln 7 = 1.95


def test_input_scale_sqrt_d_alone_lets_the_papers_architecture_learn_at_unit_norm_scale(one_torch_thread):
    """Without the product, the paper's blocks must find the query-candidate comparison themselves.
    At d 96 they do within 60 steps when the embeddings are scaled by sqrt(d), and not at all at
    the embeddings' own scale (coordinates ~0.1), where each block buries them."""
    g = torch.Generator().manual_seed(0)
    tq, td = _synthetic(96, 512, g)
    eq, ed = _synthetic(96, 128, g)
    emb = {"train.query": tq, "train.document": td, "test.query": eq, "test.document": ed}
    keys = ["embeddings.bundle=unused", "model.n_candidates=8", "model.n_layers=2", "model.ffn_mult=1",
            "model.interaction=none", "train.steps=60", "train.batch_size=32", "train.lr=1e-2",
            "train.warmup_steps=10", "train.seed=0"]
    _, scaled = train_scorer(emb, load_config(FrozenRetrievalConfig, [], [*keys, "model.input_scale=sqrt_d"]),
                             log=lambda s: None)
    _, paper = train_scorer(emb, load_config(FrozenRetrievalConfig, [], [*keys, "model.input_scale=none"]),
                            log=lambda s: None)
    assert scaled["accuracy"] > 0.9
    assert paper["accuracy"] < 2.5 * paper["chance"]


def test_the_scorer_shares_the_trainers_schedule_keys_and_non_finite_error(one_torch_thread):
    """The train section's optimizer / schedule keys are the Trainer's (one definition: meaning,
    range, choices), the LR follows the Trainer's schedule step by step, and a non-finite loss
    raises the Trainer's NonFiniteLoss naming the step."""
    import dataclasses

    from mmtrain.eval.schema import FrozenTrainSection
    from mmtrain.optim import OptimizerSettings, Schedule, lr_factor
    from mmtrain.train.schema import PretrainConfig, TrainConfig
    from mmtrain.train.trainer import NonFiniteLoss

    def fields(cls):
        return {f.name: f for f in dataclasses.fields(cls)}

    shared, frozen, trainer = fields(OptimizerSettings), fields(FrozenTrainSection), fields(TrainConfig)
    assert set(shared) >= {"steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "seed"}
    for name, f in shared.items():
        for section in (frozen, trainer):
            meta = section[name].metadata
            assert meta["help"].startswith(f.metadata["help"]), name
            assert (meta.get("range"), meta.get("choices")) == (f.metadata.get("range"), f.metadata.get("choices"))
    assert (frozen["lr"].default, frozen["warmup_steps"].default, frozen["schedule"].default) == (1e-4, 500, "linear")

    g = torch.Generator().manual_seed(0)
    tq, td = _synthetic(16, 128, g)
    eq, ed = _synthetic(16, 32, g)
    keys = ["train.steps=12", "train.lr=1e-2", "train.warmup_steps=3", "train.schedule=cosine",
            "train.min_lr_ratio=0.2"]
    cfg = load_config(FrozenRetrievalConfig, [], ["embeddings.bundle=unused", "model.n_candidates=8",
                                                  "model.n_layers=1", "train.batch_size=16", "train.log_every=1",
                                                  *keys])

    class Scalars:
        def __init__(self):
            self.lr = {}

        def add_scalar(self, tag, value, step):
            if tag == "train/lr":
                self.lr[step] = value

    writer = Scalars()
    train_scorer({"train.query": tq, "train.document": td, "test.query": eq, "test.document": ed}, cfg,
                 writer=writer, log=lambda s: None)
    pretrain = load_config(PretrainConfig, [], keys).train   # the same keys in the Trainer's section
    assert sorted(writer.lr) == list(range(1, 13))
    for step, lr in writer.lr.items():
        assert lr == pytest.approx(1e-2 * lr_factor(step - 1, Schedule.of(pretrain)), rel=1e-12), step
    assert writer.lr[4] == pytest.approx(1e-2) and writer.lr[12] > 0.2 * 1e-2

    bad = {"train.query": torch.full_like(tq, float("nan")), "train.document": td, "test.query": eq,
           "test.document": ed}
    with pytest.raises(NonFiniteLoss, match=r"^non-finite training loss \(nan\) at step 1$"):
        train_scorer(bad, cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def pairs(exported_bundles, tmp_path_factory):
    """Demo pairs (first 300) tokenized for the session's tiny mixer bundle (n_ctx 32)."""
    out = tmp_path_factory.mktemp("frozen") / "pairs"
    assert cli.main(["prepare-pairs", "--config", str(ROOT / "configs" / "pairs" / "demo.yaml"),
                     "--bundle", str(exported_bundles["mixer_zero1"]), "--out", str(out), "n_ctx=0",
                     "max_pairs=300", "test_fraction=0.2"]) == 0
    return out


def _args(bundle, pairs_dir, out_dir, *extra):
    return ["frozen-retrieval", "--config", str(DEMO), f"embeddings.bundle={bundle}", f"embeddings.pairs={pairs_dir}",
            f"out_dir={out_dir}", "model.n_candidates=8", "model.n_layers=2", "train.steps=30",
            "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=5", "train.eval_every=15",
            "train.log_every=10", "device=cpu", *extra]


def test_frozen_retrieval_command_end_to_end(exported_bundles, pairs, tmp_path, capsys, one_torch_thread):
    from safetensors.torch import load_file

    bundle, out = exported_bundles["mixer_zero1"], tmp_path / "run"
    meta = json.loads((pairs / "meta.json").read_text())
    n_train, n_test = meta["splits"]["train"]["pairs"], meta["splits"]["test"]["pairs"]
    n_val = meta["splits"]["val"]["pairs"]
    assert cli.main(_args(bundle, pairs, out, "--json", str(tmp_path / "out.json"))) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert "frozen-embedding scorer" in printed and "cosine similarity" in printed and "(computed;" in printed
    assert f"frozen-embedding scorer {100 * result['accuracy']:.1f}%" in printed
    assert f"cosine similarity {100 * result['cosine_accuracy']:.1f}%" in printed
    assert result["test_queries"] == n_test and result["steps"] == 30 and result["pooling"] == "second_to_last"
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["cosine_accuracy"] <= 1.0

    emb_meta = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert emb_meta["splits"] == {"train": {"pairs": n_train}, "val": {"pairs": n_val}, "test": {"pairs": n_test}}
    assert emb_meta["pooling"] == "second_to_last" and emb_meta["bundle"] == str(Path(bundle).resolve())
    tensors = load_file(str(out / "embeddings" / "embeddings.safetensors"))
    assert tensors["train.query"].shape == (n_train, 32) and tensors["test.document"].shape == (n_test, 32)
    assert tensors["val.query"].shape == (n_val, 32)
    assert torch.allclose(tensors["test.query"].norm(dim=1), torch.ones(n_test), atol=1e-5)

    assert sorted(p.name for p in (out / "scorer").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".mmtrain-output.json"]  # no temporaries
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 15, 30]
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(result["accuracy"])

    # the saved scorer reproduces the reported accuracy on the same fixed candidate sets
    from mmtrain.eval.frozen_retrieval import evaluate
    from mmtrain.models.frozen_scorer import sample_candidates as sample

    scorer = load_scorer(out / "scorer")
    c, y = sample(np.arange(n_test), n_test, 8, np.random.default_rng(0))
    again = evaluate(scorer, tensors["test.query"], tensors["test.document"], torch.as_tensor(c), torch.as_tensor(y))
    assert again["accuracy"] == pytest.approx(result["accuracy"])

    # a second run reuses the embeddings
    assert cli.main(_args(bundle, pairs, out, "--embed-only")) == 0
    assert "(reused;" in capsys.readouterr().out

    # ... and scores the val split on request, with the same embeddings
    assert cli.main(_args(bundle, pairs, out, "embeddings.eval_split=val", "--json", str(tmp_path / "val.json"))) == 0
    printed = capsys.readouterr().out
    val = json.loads((tmp_path / "val.json").read_text())
    assert "(reused;" in printed and f"val [{n_val} queries, N=8: 7 candidates, seed 0]" in printed
    assert val["eval_split"] == "val" and val["eval_queries"] == n_val
    assert 0.0 <= val["accuracy"] <= 1.0 and 0.0 <= val["train_accuracy"] <= 1.0


def test_eval_split_val_needs_a_val_split(exported_bundles, pairs, tmp_path, capsys, one_torch_thread):
    """Pair shards made before val existed (train and test only) are embedded and scored on test as
    before; asking for val names the missing split before any work."""
    import shutil

    old = tmp_path / "pairs-old"
    shutil.copytree(pairs, old)
    shutil.rmtree(old / "val")
    meta = json.loads((old / "meta.json").read_text())
    del meta["splits"]["val"]
    (old / "meta.json").write_text(json.dumps(meta))
    bundle = exported_bundles["mixer_zero1"]
    assert cli.main(_args(bundle, old, tmp_path / "run", "embeddings.eval_split=val")) == 2
    err = capsys.readouterr().err
    assert f"embeddings.eval_split: val, but the pair shards {old} have no val split (they have train, test)" in err
    assert not (tmp_path / "run").exists()
    assert cli.main(_args(bundle, old, tmp_path / "run", "--embed-only")) == 0
    emb_meta = json.loads((tmp_path / "run" / "embeddings" / "embeddings.json").read_text())
    assert sorted(emb_meta["splits"]) == ["test", "train"]
    # embeddings saved without val (as before val was embedded) are recomputed for shards that have it
    new = tmp_path / "new"
    assert cli.main(_args(bundle, pairs, new, "--embed-only")) == 0
    path = new / "embeddings" / "embeddings.json"
    meta = json.loads(path.read_text())
    del meta["splits"]["val"]
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli.main(_args(bundle, pairs, new, "--embed-only")) == 0
    assert "lack split(s) val; recomputing them all" in capsys.readouterr().out
    assert "val" in json.loads(path.read_text())["splits"]


def test_a_non_finite_loss_exits_3_naming_the_step_and_saves_no_scorer(exported_bundles, pairs, tmp_path, capsys,
                                                                       one_torch_thread):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert cli.main(_args(exported_bundles["mixer_zero1"], pairs, out, "--embed-only")) == 0
    capsys.readouterr()
    path = out / "embeddings" / "embeddings.safetensors"
    tensors = load_file(str(path))
    tensors["train.query"] = torch.full_like(tensors["train.query"], float("nan"))
    save_file(tensors, str(path))   # the same source: reused, with NaN training queries
    assert cli.main(_args(exported_bundles["mixer_zero1"], pairs, out)) == 3
    err = capsys.readouterr().err
    assert "mmtrain frozen-retrieval: non-finite training loss (nan) at step 1; stopping, no scorer saved" in err
    assert "lower train.lr" in err
    assert not (out / "scorer").exists()


def test_mismatched_embeddings_missing_files_and_a_too_large_n_are_refused(exported_bundles, pairs, tmp_path,
                                                                           capsys, one_torch_thread):
    mixer, transformer = exported_bundles["mixer_zero1"], exported_bundles["transformer_zero2"]
    out = tmp_path / "run"
    assert cli.main(_args(mixer, pairs, out, "--embed-only")) == 0
    capsys.readouterr()
    saved = (out / "embeddings" / "embeddings.safetensors").read_bytes()
    # the same embeddings directory with another bundle (same tokenizer, so the pairs fit it)
    assert cli.main(_args(transformer, pairs, out)) == 2
    err = capsys.readouterr().err
    assert f"holds embeddings of bundle {Path(mixer).resolve()}" in err and "weights" in err
    assert "embeddings.overwrite=true" in err
    assert (out / "embeddings" / "embeddings.safetensors").read_bytes() == saved
    assert not (out / "scorer").exists()
    # ... and another pooling
    assert cli.main(_args(mixer, pairs, out, "embeddings.pooling=last")) == 2
    assert "differ in: pooling" in capsys.readouterr().err

    pool = json.loads((pairs / "meta.json").read_text())["splits"]["test"]["pairs"]
    assert cli.main(_args(mixer, pairs, tmp_path / "big", f"model.n_candidates={pool + 1}")) == 2
    assert f"N={pool + 1} is larger than the test split's pool of {pool} documents" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()

    assert cli.main(_args(tmp_path / "no-bundle", pairs, tmp_path / "x")) == 2
    assert "embeddings.bundle" in capsys.readouterr().err
    assert cli.main(_args(mixer, tmp_path / "no-pairs", tmp_path / "x")) == 2
    assert "embeddings.pairs" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(_args(mixer, pairs, tmp_path / "x", "train.batchsize=4")) == 2
    assert "unknown key 'train.batchsize'" in capsys.readouterr().err


def test_frozen_retrieval_never_writes_into_or_over_its_inputs(exported_bundles, pairs, tmp_path, capsys):
    bundle = exported_bundles["mixer_zero1"]
    before = sorted(p.name for p in bundle.iterdir())
    (tmp_path / "afile").write_text("x")
    cases = [([f"out_dir={bundle}"], "overlaps the bundle"),
             ([f"out_dir={bundle / 'scorer-run'}"], "overlaps the bundle"),
             ([f"out_dir={pairs.parent}"], "overlaps the pair shards"),   # the pairs lie inside it
             ([f"out_dir={tmp_path / 'run'}", f"embeddings.dir={pairs / 'train'}"], "embeddings.dir"),
             ([f"out_dir={tmp_path / 'afile'}"], "is a file; give a directory")]
    for extra, needle in cases:
        assert cli.main(_args(bundle, pairs, tmp_path / "run", *extra)) == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert sorted(p.name for p in bundle.iterdir()) == before and (tmp_path / "afile").read_text() == "x"
    assert not (tmp_path / "run").exists()
