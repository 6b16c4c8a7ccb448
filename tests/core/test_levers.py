"""The compression levers of issue 10: calibration scores, importance init, head gates,
compensation (exact export), the dense teacher, one-shot peers."""

from __future__ import annotations

import pytest
import torch

from core.distill import kl_loss, teacher_logits
from core.expectation import expected_removed_fraction
from core.gates import gated_modules, gates_open
from core.importance import (
    collect_input_stats,
    column_scores,
    init_gates_from_scores,
    set_compensation,
    unit_scores,
)
from core.oneshot import oneshot_prune
from core.prune import max_abs_diff, prune_model
from core.structure import describe, measured_sparsity
from core.train_setup import group_head_gates
from tests.support.prune_fixtures import apply_pattern, gate, reference_plan
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama

BUILDERS = {"bert": build_tiny_bert_cls, "llama": build_tiny_llama}


def _batch(seed: int = 0, b: int = 3, t: int = 10, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[0, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- calibration ------------------------------------------------------------------------
def test_calibration_scores_equal_hand_computed_values():
    model = gate(build_tiny_bert_cls(seed=0))
    model.eval()
    S = describe(model)
    name = S.layers[0].o
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    batch = _batch(pad=4)
    stats = collect_input_stats(model, [batch], [name])
    h.remove()
    # hand computation: the real (unpadded) tokens' inputs, per column
    x = seen[0][batch["attention_mask"].bool()].double()
    assert stats[name].count == int(batch["attention_mask"].sum())
    torch.testing.assert_close(stats[name].mean.double(), x.mean(0), atol=1e-5, rtol=0)
    var = x.var(0, unbiased=False)
    w = model.get_submodule(name).base.weight.detach().double()
    flap = column_scores(w, stats[name], "flap").double()
    torch.testing.assert_close(flap, var * (w * w).sum(0), atol=1e-5, rtol=1e-4)
    wanda = column_scores(w, stats[name], "wanda").double()
    rms = (x * x).mean(0).sqrt()
    torch.testing.assert_close(wanda, w.abs().sum(0) * rms, atol=1e-5, rtol=1e-4)
    # a head's score is the sum of its columns
    sc = unit_scores(model, S, stats, "flap")
    d = S.head_dim
    torch.testing.assert_close(sc.heads[0][1].double(), flap[d : 2 * d].sum(), atol=1e-5, rtol=1e-4)


def test_importance_init_starts_the_weakest_units_below_the_open_edge():
    model = gate(build_tiny_bert_cls(seed=1))
    for gm in gated_modules(model).values():  # everything saturated open
        gm.row_logits.data.fill_(1.0)
        gm.col_logits.data.fill_(1.0)
    S = describe(model)
    names = [n for ls in S.layers for n in (ls.o, ls.ffn_out)]
    stats = collect_input_stats(model, [_batch(1)], names)
    sc = unit_scores(model, S, stats, "flap")
    got = init_gates_from_scores(model, S, sc, share=0.25, scale=0.5)
    n_neurons = S.intermediate_size * len(S.layers)
    assert got["neurons"] == round(0.25 * n_neurons)
    # the weakest neuron overall (per-layer standardised) starts lowest, at 0.549 - 0.5
    downs = [model.get_submodule(ls.ffn_out).col_logits for ls in S.layers]
    lowest = min(float(c.detach().min()) for c in downs)
    assert lowest == pytest.approx(0.049, abs=1e-6)
    # candidates are exactly the lowest-scoring ones; every other gate is untouched
    for ls, c in zip(S.layers, downs, strict=True):
        up = model.get_submodule(ls.ffn_in[0]).row_logits
        cand = c < 1.0
        torch.testing.assert_close(up[cand], c[cand])  # the neuron's lines move together
        assert bool((up[~cand] == 1.0).all())


# -- head gates -------------------------------------------------------------------------
def test_head_gates_tie_o_columns_and_keep_them_equal_through_training():
    model = gate(build_tiny_bert_cls(seed=2))
    groups = group_head_gates(model)
    S = describe(model)
    assert set(groups.values()) == {S.head_dim}
    o = model.get_submodule(S.layers[0].o)
    opt = torch.optim.Adam([o.col_logits], lr=0.05)
    model.train()
    for s in range(3):
        opt.zero_grad()
        out = model(**_batch(s), labels=torch.tensor([0, 1, 0]))
        (out.loss + expected_removed_fraction(model, S, probs="st", min_sigma=0.5)).backward()
        opt.step()
    v = o.col_logits.detach().view(-1, S.head_dim)
    assert bool((v == v[:, :1]).all())  # still one value per head
    assert bool((v[:, 0] != 1.0).any())  # and they did move


def test_head_gate_gradient_does_not_vanish_with_head_dim():
    """With tied o columns the push on a head is O(1), not O((1 - p)^head_dim)."""
    model = gate(build_tiny_bert_cls(seed=3))
    group_head_gates(model)
    S = describe(model)
    o = model.get_submodule(S.layers[0].o)
    frac = expected_removed_fraction(model, S, probs="soft", min_sigma=0.5)
    (g,) = torch.autograd.grad(frac, [o.col_logits])
    per_head = g.view(-1, S.head_dim).sum(1)
    assert float(per_head.abs().min()) > 1e-3


# -- compensation ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("pattern", ["heads", "dims", "none", "ffn"])
def test_compensated_pruned_model_equals_its_gated_reference(family, pattern):
    model = apply_pattern(BUILDERS[family](seed=0), pattern, seed=3)
    model.eval()
    S = describe(model)
    names = [n for ls in S.layers for n in (ls.o, ls.ffn_out)]
    stats = collect_input_stats(model, [_batch(5)], names)
    assert set_compensation(model, S, stats)
    ids = _batch(7, b=2, t=16)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for gm in gated_modules(model).values():  # the compensation really changes things
            gm.comp_mean, saved = None, gm.comp_mean
            plain = model(input_ids=ids).logits
            gm.comp_mean = saved
    if pattern != "none":
        assert float((ref - plain).abs().max()) > 1e-4
    plan = reference_plan(model)
    pm, _ = prune_model(model, plan)
    assert max_abs_diff(model, pm, batch=3, seq_len=12) < 1e-4
    torch.testing.assert_close(pm(ids), ref, atol=1e-4, rtol=0)


# -- distillation ------------------------------------------------------------------------
def test_teacher_takes_no_gradient_and_leaves_no_state():
    model = apply_pattern(build_tiny_llama(seed=1), "dims", seed=2)
    model.eval()
    batch = _batch(3)
    batch["labels"] = batch["input_ids"].clone()
    with torch.no_grad():
        student_before = model(input_ids=batch["input_ids"]).logits
        with gates_open(model):
            dense = model(input_ids=batch["input_ids"]).logits
    t = teacher_logits(model, batch, lambda: torch.autocast("cpu", enabled=False))
    assert not t.requires_grad and t.grad_fn is None
    torch.testing.assert_close(t, dense)
    assert not any(gm.force_open for gm in gated_modules(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, student_before)
    # KL is zero against itself and positive against the gated student
    s = model(input_ids=batch["input_ids"]).logits
    assert float(kl_loss(t, t, batch["labels"], 2.0)) == pytest.approx(0.0, abs=1e-6)
    kd = kl_loss(s, t, batch["labels"], 2.0)
    assert float(kd) > 0 and kd.requires_grad
    kd.backward()
    assert any(p.grad is not None for p in model.parameters())


def test_gates_open_restores_on_error():
    model = gate(build_tiny_bert_cls(seed=0))
    with pytest.raises(RuntimeError), gates_open(model):
        raise RuntimeError("boom")
    assert not any(gm.force_open for gm in gated_modules(model).values())


# -- one-shot peers -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ["flap", "wandasp"])
def test_oneshot_peers_hit_the_target_and_prune_exactly(family, method):
    model = gate(BUILDERS[family](seed=4))
    model.eval()
    S = describe(model)
    names = [n for ls in S.layers for n in (ls.o, ls.ffn_out)]
    stats = collect_input_stats(model, [_batch(2), _batch(3)], names)
    out = oneshot_prune(model, stats, method, target=0.3, tol=0.02)
    assert out["measured_sparsity"] == pytest.approx(measured_sparsity(model))
    assert abs(out["measured_sparsity"] - 0.3) <= 0.05
    assert (out["compensated"] > 0) == (method == "flap")
    pm, _ = prune_model(model, reference_plan(model))
    assert max_abs_diff(model, pm, batch=2, seq_len=10) < 1e-4
