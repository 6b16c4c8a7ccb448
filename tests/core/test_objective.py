"""Sparsity objectives (method.md §2): paper term values, properties, calibrated steering."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.gates import GateConfig, GatedLinear, gated_modules, inject_gates
from core.objective import (
    SparsityObjective,
    keep_prob,
    kurtosis_weights,
    paper_layer_term,
    paper_objective,
)
from core.structure import describe, measured_sparsity
from core.trainable import configure_trainable, param_groups
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = GatedLinear(nn.Linear(3, 2))
        self.b = GatedLinear(nn.Linear(2, 4, bias=False))


def test_keep_prob_range_and_values():
    mu = torch.tensor([-1.0, -0.5, 0.0, 1.0])
    p = keep_prob(mu)
    assert p[0].item() == pytest.approx(0.158655, abs=1e-6)  # the floor: closed gates
    assert p[1].item() == pytest.approx(0.5)
    assert p[2].item() == pytest.approx(_phi(1.0))
    assert p[3].item() == pytest.approx(0.998650, abs=1e-6)  # the ceiling
    many = keep_prob(torch.tanh(torch.linspace(-20, 20, 1001)))
    assert many.min() > 0.1586 and many.max() < 0.99866


def test_paper_term_hand_computed():
    m = TwoLayers()
    with torch.no_grad():
        m.a.row_logits.copy_(torch.tensor([0.0, 1.0]))
        m.a.col_logits.copy_(torch.tensor([-1.0, 0.5, 2.0]))
        m.b.row_logits.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
        m.b.col_logits.copy_(torch.tensor([-3.0, 3.0]))
    k = 1 - 0.4

    def p(theta: float) -> float:
        return _phi((math.tanh(theta) + 0.5) / 0.5)

    la = 0.5 * (abs((p(0) + p(1)) / 2 - k) + abs((p(-1) + p(0.5) + p(2)) / 3 - k))
    lb = 0.5 * (abs(p(0) - k) + abs((p(-3) + p(3)) / 2 - k))
    got = paper_objective(m, 0.4)
    assert got.item() == pytest.approx((la + lb) / 2, abs=1e-6)
    p_r, p_c = m.a.keep_probs()
    assert paper_layer_term(p_r, p_c, k).item() == pytest.approx(la, abs=1e-6)


def test_paper_term_is_two_sided():
    gm = GatedLinear(nn.Linear(4, 4))
    for theta, sign in ((2.0, +1), (-2.0, -1)):  # mean p above k / below k
        with torch.no_grad():
            gm.row_logits.fill_(theta)
            gm.col_logits.fill_(theta)
        gm.row_logits.grad = None
        term = paper_layer_term(*gm.keep_probs(), k=0.6)
        assert term.item() > 0
        term.backward()
        # gradient descent moves theta toward the target from both sides
        assert torch.all(torch.sign(gm.row_logits.grad) == sign)


def test_paper_term_needs_more_than_target_closed():
    """Even fully closed gates keep p = 0.159: k = 0.6 needs ~47% of gates closed, not 40%."""
    gm = GatedLinear(nn.Linear(100, 100))
    with torch.no_grad():
        gm.col_logits.fill_(5.0)
        closed = 40
        gm.row_logits.fill_(5.0)
        gm.row_logits[:closed] = -5.0
    p_r, _ = gm.keep_probs()
    assert p_r.mean().item() > 0.6  # 40% closed is not enough to reach k = 0.6
    frac = (0.99865 - 0.6) / (0.99865 - 0.158655)
    assert 0.46 < frac < 0.48


def test_kurtosis_weights_protect_outliers():
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(16, 8))
    with torch.no_grad():
        gm.base.weight.normal_()
        gm.base.weight[3, 0] = 200.0  # row 3 and column 0 carry an outlier
    assert kurtosis_weights(gm) is None  # no input recorded yet
    gm.record_input_mean = True
    gm.train()
    gm(torch.randn(5, 7, 16).abs() + 1)
    w_r, w_c = kurtosis_weights(gm)
    assert w_r.sum().item() == pytest.approx(1.0) and w_c.sum().item() == pytest.approx(1.0)
    assert w_r.argmin().item() == 3 and w_c.argmin().item() == 0
    # weighted paper term differs from the plain one
    m = nn.Module()
    m.g = gm
    assert paper_objective(m, 0.4, kurtosis=True).item() != paper_objective(m, 0.4).item()


def test_objective_schedule_and_validation():
    with pytest.raises(ConfigError) as e:
        SparsityObjective("l0")
    assert e.value.field == "objective"
    with pytest.raises(ConfigError):
        SparsityObjective(target_sparsity=1.5)
    obj = SparsityObjective(target_sparsity=0.4, sparsity_start_step=10, target_warmup_steps=20)
    assert obj.lambda_at(9) == 0.0 and obj.lambda_at(10) == 50.0
    assert obj.target_at(5) == 0.0
    assert obj.target_at(10) == pytest.approx(0.02)
    assert obj.target_at(19) == pytest.approx(0.2)
    assert obj.target_at(29) == pytest.approx(0.4) and obj.target_at(500) == pytest.approx(0.4)


def test_objective_loss_before_start_is_zero_and_after_is_weighted(tiny_bert_cls):
    inject_gates(tiny_bert_cls)
    obj = SparsityObjective(
        target_sparsity=0.3, sparsity_weight=7.0, sparsity_start_step=5, focus=False
    )
    loss, parts = obj.loss(tiny_bert_cls, 4)
    assert loss.item() == 0.0 and parts["sparsity_lambda"] == 0.0
    loss, parts = obj.loss(tiny_bert_cls, 5)
    assert parts["expected_sparsity"] == pytest.approx(0.0)  # nothing closed yet
    # Huber with delta 0.02 at distance 0.3: 0.3 - 0.01
    assert parts["sparsity_term"] == pytest.approx(0.29, abs=1e-6)
    assert loss.item() == pytest.approx(7.0 * 0.29, rel=1e-6)
    loss.backward()
    g = tiny_bert_cls.bert.encoder.layer[0].intermediate.dense.row_logits.grad
    assert g is not None and torch.all(g > 0)  # unfocused: every gate is pushed down
    paper = SparsityObjective("paper", target_sparsity=0.3, sparsity_weight=2.0)
    loss, parts = paper.loss(tiny_bert_cls, 0)
    assert loss.item() == pytest.approx(2.0 * paper_objective(tiny_bert_cls, 0.3).item())


def test_calibrated_value_equals_measured(tiny_llama):
    inject_gates(tiny_llama)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gm in gated_modules(tiny_llama).values():
            for t in (gm.row_logits, gm.col_logits):
                t.copy_(torch.where(torch.rand(t.shape, generator=g) < 0.2, -0.7, 0.4))
    obj = SparsityObjective(target_sparsity=0.5)
    _, parts = obj.loss(tiny_llama, 100)
    assert parts["expected_sparsity"] == pytest.approx(measured_sparsity(tiny_llama), abs=1e-6)
    assert 0.05 < parts["expected_sparsity"] < 0.95


def test_controller_direction_antiwindup_and_state_roundtrip():
    obj = SparsityObjective(target_sparsity=0.4, target_warmup_steps=10, controller_gain=0.5)
    obj.update(0.0, 5)  # during the ramp: no integration
    assert obj.offset == 0.0
    obj.update(0.1, 50)  # far from target (0.3 > window 0.1): still travelling
    assert obj.offset == 0.0
    obj.update(0.36, 60)  # measured below target -> aim higher
    assert obj.offset == pytest.approx(0.02)
    assert obj.effective_target(60) == pytest.approx(0.42)
    obj.update(0.45, 70)
    assert obj.offset == pytest.approx(0.02 - 0.025)
    state = json.loads(json.dumps(obj.state_dict()))
    other = SparsityObjective(target_sparsity=0.4, target_warmup_steps=10, controller_gain=0.5)
    other.load_state_dict(state)
    assert other.state_dict() == obj.state_dict()
    with pytest.raises(ConfigError):
        SparsityObjective("paper").load_state_dict(state)
    paper = SparsityObjective("paper")
    paper.update(0.1, 100)
    assert paper.offset == 0.0 and paper.last_measured == 0.1


def _toy_run(model, task_loss, target: float, steps: int, seed: int = 0, objective="calibrated"):
    inject_gates(model, cfg=GateConfig(seed=seed))
    configure_trainable(model, "gates")
    opt = torch.optim.AdamW(param_groups(model, 1e-2, head_lr=1e-2))
    obj = SparsityObjective(objective, target, 50.0, 0, target_warmup_steps=steps // 4)
    S = describe(model)
    g = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for step in range(steps):
        x = torch.randint(5, 100, (8, 10), generator=g)
        sl, _ = obj.loss(model, step)
        loss = task_loss(model, x) + sl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            meas = measured_sparsity(model, S)
            obj.update(meas, step)
            history.append(meas)
    return history


def test_toy_training_reaches_target_bert():
    def task(model, x):
        y = (x == 7).any(1).long() + (x == 8).any(1).long()
        return nn.functional.cross_entropy(model(x).logits, y)

    hist = _toy_run(build_tiny_bert_cls(), task, target=0.4, steps=200)
    assert hist[0] == 0.0  # gates start open
    assert abs(hist[-1] - 0.4) <= 0.03, hist


def test_toy_training_reaches_target_llama_gqa():
    def task(model, x):
        return model(x, labels=x).loss

    hist = _toy_run(build_tiny_llama(), task, target=0.3, steps=200)
    assert abs(hist[-1] - 0.3) <= 0.03, hist


def test_focused_push_reaches_only_each_vectors_lowest_gates(tiny_bert_cls):
    """Focus: the sparsity gradient reaches the lowest ceil((target + 0.05) n) logits of
    every gate vector and nothing else, while the term's VALUE is unchanged."""
    inject_gates(tiny_bert_cls)
    dense = tiny_bert_cls.bert.encoder.layer[0].intermediate.dense
    unfocused = SparsityObjective(target_sparsity=0.3, focus=False)
    focused = SparsityObjective(target_sparsity=0.3)  # focus is the default
    l0, p0 = unfocused.loss(tiny_bert_cls, 0)
    l1, p1 = focused.loss(tiny_bert_cls, 0)
    assert (
        l1.item() == pytest.approx(l0.item()) and p1["expected_sparsity"] == p0["expected_sparsity"]
    )
    l1.backward()
    g = dense.row_logits.grad
    n = g.numel()
    k = math.ceil(0.35 * n)
    pushed = g != 0
    assert int(pushed.sum()) == k
    lowest = torch.argsort(dense.row_logits.detach())[:k]
    assert bool(pushed[lowest].all()) and bool((g[lowest] > 0).all())


def test_train_builds_the_objective_from_the_job_hyperparameters():
    """sparsity_focus and the "auto" ramp reach the objective the training loop uses."""
    from core.config import Hyperparameters
    from core.train_setup import make_objective

    on = make_objective(Hyperparameters().resolve(1000, "classification"), 200)
    off = make_objective(Hyperparameters(sparsity_focus=False).resolve(1000, "classification"), 200)
    paper = make_objective(Hyperparameters(objective="paper").resolve(1000, "classification"), 200)
    assert on.focus is True and off.focus is False
    assert on.target_warmup_steps == 60 and paper.target_warmup_steps == 0
