"""InfoNCE: hand-computed values, cross-rank gather with gradient, gradient caching."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmtrain.train.losses import GradCache, causal_lm_loss, info_nce, num_negatives, split_embeddings
from mmtrain.models import build_model
from mmtrain.models.layers import causal_lm_loss as layers_causal_lm_loss
from mmtrain.models.embedding import embed

from conftest import ROOT, free_port, script_env


def _ce(logits, target):
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_info_nce_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    # q0 . [d0, d1] = [1, 0.6]; q1 . [d0, d1] = [0, 0.8]
    expected = (_ce([2.0, 1.2], 0) + _ce([0.0, 1.6], 1)) / 2
    assert info_nce(q, d, t) == pytest.approx(expected, abs=1e-6)
    # document -> query direction: d0 . [q0, q1] = [1, 0]; d1 . [q0, q1] = [0.6, 0.8]
    backward = (_ce([2.0, 0.0], 0) + _ce([1.2, 1.6], 1)) / 2
    assert info_nce(q, d, t, symmetric=True) == pytest.approx((expected + backward) / 2, abs=1e-6)


def test_extra_negatives_are_candidates_for_every_query():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    e = torch.tensor([[0.0, -1.0]])
    expected = (_ce([2.0, 1.2, 0.0], 0) + _ce([0.0, 1.6, -2.0], 1)) / 2
    assert info_nce(q, d, 0.5, extra_negatives=e) == pytest.approx(expected, abs=1e-6)
    assert num_negatives(16, 1) == 15 and num_negatives(16, 4) == 63 and num_negatives(8, 2, 3) == 15 + 48


def test_causal_lm_loss_is_reexported_not_copied():
    assert causal_lm_loss is layers_causal_lm_loss


def test_gathered_info_nce_on_two_ranks_equals_one_rank_with_the_whole_batch(tmp_path):
    out = tmp_path / "gather.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "tests" / "scripts" / "retrieval_gather_two_ranks.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for variant in ("symmetric=False", "symmetric=True"):
        r = result[variant]
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["grad_norm"] > 0.1
        assert r["max_grad_diff"] < 1e-6


@pytest.mark.parametrize("extra,symmetric", [(0, False), (2, True)])
def test_gradient_cache_gives_the_plain_loss_and_gradients(extra, symmetric):
    torch.manual_seed(0)
    model = build_model({"kind": "mixer", "d_model": 16, "n_layers": 2, "n_ctx": 12}, 50)
    batch = 5
    n = 2 * batch + extra * batch
    ids = torch.randint(4, 50, (n, 12))
    lengths = torch.randint(3, 13, (n,))

    def loss_fn(embeddings):
        parts = split_embeddings(embeddings, batch, extra * batch)
        return info_nce(parts["queries"], parts["positives"], 0.1, extra_negatives=parts["extra_negatives"],
                        symmetric=symmetric)

    plain = loss_fn(embed(model, ids, lengths))
    plain.backward()
    plain_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert len(plain_grads) > 5   # everything but the unused LM head
    model.zero_grad()

    gc = GradCache(chunk_size=3)
    cached = gc.embed_no_grad(lambda i, l: embed(model, i, l), ids, lengths)
    loss, grad = gc.representation_grads(loss_fn, cached)
    for s, e in gc.chunks(n):
        gc.surrogate(embed(model, ids[s:e], lengths[s:e]), grad[s:e]).backward()
    assert float(loss) == pytest.approx(float(plain.detach()), rel=1e-6)
    cached_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert cached_grads.keys() == plain_grads.keys()
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    for k, g in cached_grads.items():   # float32 sums in another order: relative to the gradient scale
        diff = float((g - plain_grads[k]).abs().max())
        assert diff <= 1e-5 * scale, (k, diff, scale)


def test_right_padding_does_not_change_last_token_embedding():
    torch.manual_seed(0)
    model = build_model({"kind": "transformer", "d_model": 16, "n_layers": 1, "n_ctx": 12, "n_heads": 2}, 50)
    ids = torch.randint(4, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    for pooling in ("last", "second_to_last", "mean"):
        a = embed(model, ids, torch.tensor([7]), pooling)
        b = embed(model, torch.cat([padded, padded]), torch.tensor([7, 7]), pooling)[:1]
        torch.testing.assert_close(a, b)
        assert float(a.norm()) == pytest.approx(1.0, abs=1e-5)
    expected = F.normalize(model.hidden_states(ids)[:, 5], dim=-1)
    torch.testing.assert_close(embed(model, padded, torch.tensor([7]), "second_to_last"), expected)
