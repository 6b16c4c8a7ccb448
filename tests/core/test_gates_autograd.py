"""The fused GatedLinear autograd path (core.gates._GatedLinearFn) against plain autograd.

Why: the fused Function hand-writes the backward to save fewer activations; any slip in
it would silently train the wrong thing, so every gradient is compared with the reference
(plain autograd over x * z_c -> Linear -> * z_r, still selectable with FUSED_AUTOGRAD).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import core.gates as G
from core.gates import GateConfig, GatedLinear, inject_gates
from core.trainable import configure_trainable
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama


@pytest.fixture
def fused_flag():
    """Restore the module switch whatever a test does with it."""
    old = G.FUSED_AUTOGRAD
    yield
    G.FUSED_AUTOGRAD = old


def _run(fused: bool, fn, *args):
    G.FUSED_AUTOGRAD = fused
    return fn(*args)


def _exact_boundary_logit() -> float:
    """An fp32 theta with tanh(theta) + 0.5 == 0 exactly (clamp input exactly on the edge)."""
    t = torch.tensor(math.atanh(-0.5), dtype=torch.float32)
    for _ in range(64):
        v = float(torch.tanh(t) + 0.5)
        if v == 0.0:
            return float(t)
        t = torch.nextafter(t, torch.tensor(-math.inf if v > 0 else math.inf))
    raise AssertionError("no fp32 theta with tanh(theta) == -0.5 found")


# -- the Function itself ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (2, 3)])
def test_gradcheck_float64_with_closed_open_and_fractional_gates(bias, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    z_r = torch.tensor([0.0, 1.0, 0.3, 0.7], dtype=torch.float64, requires_grad=True)
    z_c = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    # row_dead None: the z_r == 0 row must still get its true gradient (sum grad_y * y0)
    assert torch.autograd.gradcheck(
        G._GatedLinearFn.apply, (x, w, b, z_r, z_c, None), eps=1e-6, atol=1e-8
    )


def test_row_dead_rows_get_zero_grad_and_others_unchanged():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    z_c = torch.rand(5, dtype=torch.float64, generator=g)
    grads = []
    for dead in (None, torch.tensor([True, False, False, False])):
        z_r = torch.tensor([0.0, 0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
        (G._GatedLinearFn.apply(x, w, b, z_r, z_c, dead) * x[:, :4]).sum().backward()
        grads.append(z_r.grad)
    full, skipped = grads
    assert full[0] != 0 and full[1] != 0  # closed rows: true gradient is not zero
    assert skipped[0] == 0  # dead row skipped
    # the recomputed rows go through a matmul of another shape: fp64 rounding only
    torch.testing.assert_close(skipped[1:], full[1:], rtol=0, atol=1e-12)


# -- GatedLinear: fused vs reference --------------------------------------------------------


def _gated_forward_backward(gm: GatedLinear, x: torch.Tensor, seed: int) -> dict:
    for p in gm.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same training noise for both paths
    y = gm(xx)
    (y * torch.linspace(-1, 2, y.shape[-1])).sum().backward()
    out = {"y": y.detach(), "x": xx.grad}
    out.update({n: p.grad for n, p in gm.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lead", [(9,), (3, 4)])
def test_gated_linear_fused_equals_reference(fused_flag, train_weight, training, lead):
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(6, 5), GateConfig(noise_std=0.1))
    with torch.no_grad():
        # rows: closed (saturated), exactly on the clamp edge, fully open, fractional x2
        gm.row_logits.copy_(torch.tensor([-3.0, _exact_boundary_logit(), 3.0, 0.2, -0.1]))
        gm.col_logits.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.3, -0.2, 1.0]))
    gm.base.weight.requires_grad_(train_weight)
    gm.train(training)
    x = torch.randn(*lead, 6)
    ref = _run(False, _gated_forward_backward, gm, x, 5)
    fus = _run(True, _gated_forward_backward, gm, x, 5)
    assert set(fus) == set(ref)
    assert ("base.weight" in ref) == train_weight
    for k in ref:
        torch.testing.assert_close(fus[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    if not training:
        assert ref["y"][..., 0].abs().max() == 0 and fus["y"][..., 0].abs().max() == 0
        # the edge row (u_r == 0 exactly): clamp passes the gradient, and it is not zero
        assert ref["row_logits"][1] != 0


def test_fused_path_is_used_with_and_without_lora(fused_flag, monkeypatch):
    calls = []
    real = G._GatedLinearFn.apply

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(G._GatedLinearFn, "apply", spy)
    G.FUSED_AUTOGRAD = True
    GatedLinear(nn.Linear(4, 3))(torch.randn(2, 4))
    assert len(calls) == 1
    GatedLinear(nn.Linear(4, 3), GateConfig(lora_rank=2))(torch.randn(2, 4))
    assert len(calls) == 2
    G.FUSED_AUTOGRAD = False
    GatedLinear(nn.Linear(4, 3))(torch.randn(2, 4))
    assert len(calls) == 2


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_matches_plain_autograd(fused_flag, bias):
    """gates+lora through the fused path: same output and the same gradients for x, the
    gate logits, LoRA A/B and the bias as plain autograd over z_r * ((W + sBA)(z_c x) + b),
    with gates closed, fractional and open."""
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(6, 5, bias=bias), GateConfig(noise_std=0.0, lora_rank=2))
    gm.base.weight.requires_grad_(False)
    with torch.no_grad():
        gm.lora_B.normal_(0, 0.5)
        gm.row_logits.copy_(torch.tensor([-2.0, 0.2, 1.0, -0.3, 0.0]))
        gm.col_logits.copy_(torch.tensor([0.1, -2.0, 1.0, 0.3, -0.2, 2.0]))
    x = torch.randn(3, 4, 6)
    res = {}
    for fused in (False, True):
        G.FUSED_AUTOGRAD = fused
        for p in gm.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(True)
        y = gm.train()(xx)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads = [xx.grad, gm.row_logits.grad, gm.col_logits.grad, gm.lora_A.grad, gm.lora_B.grad]
        if bias:
            grads.append(gm.base.bias.grad)
        res[fused] = (y.detach(), [g.clone() for g in grads])
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(res[True][1], res[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_cpu_dtypes_and_values(fused_flag):
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(16, 8), GateConfig(noise_std=0.1)).train()
    x = torch.randn(4, 5, 16)
    res = {}
    for fused in (False, True):
        G.FUSED_AUTOGRAD = fused
        for p in gm.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gm(xx)
        y.float().pow(2).sum().backward()
        res[fused] = (y, xx.grad, gm.row_logits.grad, gm.col_logits.grad, gm.base.bias.grad)
    (y_r, *g_r), (y_f, *g_f) = res[False], res[True]
    assert y_f.dtype == y_r.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_f, g_r, strict=True):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= 3e-2 * b.float().norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_bf16_cuda_matches_reference(fused_flag):
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(64, 32), GateConfig(noise_std=0.1)).cuda().train()
    x = torch.randn(8, 7, 64, device="cuda")
    res = {}
    for fused in (False, True):
        G.FUSED_AUTOGRAD = fused
        for p in gm.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = gm(xx)
        y.float().pow(2).sum().backward()
        res[fused] = (y, xx.grad, gm.row_logits.grad, gm.col_logits.grad, gm.base.bias.grad)
    (y_r, *g_r), (y_f, *g_f) = res[False], res[True]
    assert y_f.dtype == y_r.dtype == torch.bfloat16
    for a, b in zip([y_f, *g_f], [y_r, *g_r], strict=True):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= 3e-2 * b.float().norm()


# -- whole models via inject_gates / configure_trainable -------------------------------------


def _model_grads(model: nn.Module, batch: dict, seed: int) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "logits": out.logits.detach()}
    res.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return res


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("mode", ["gates", "gates+weights", "gates+lora"])
def test_models_fused_equals_reference_each_mode(fused_flag, family, mode):
    model = build_tiny_bert_cls() if family == "bert" else build_tiny_llama()
    cfg = GateConfig(noise_std=0.1, seed=0, lora_rank=4 if mode == "gates+lora" else 0)
    inject_gates(model, None, cfg)
    trainable = configure_trainable(model, mode)
    with torch.no_grad():  # close a few rows and columns so exact zeros are exercised
        for gm in G.gated_modules(model).values():
            gm.row_logits[::5] = -3.0
            gm.col_logits[1::7] = -3.0
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.tensor([0, 2, 1]) if family == "bert" else ids
    ref = _run(False, _model_grads, model, batch, 7)
    fus = _run(True, _model_grads, model, batch, 7)
    assert set(fus) == set(ref) == {"loss", "logits", *trainable}
    for k in ref:
        assert ref[k] is not None, k
        torch.testing.assert_close(fus[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    if mode == "gates":
        assert not any("weight" in n and "base" in n for n in trainable)


# -- memory: bytes saved for backward --------------------------------------------------------


def _saved_bytes(model: nn.Module, batch: dict) -> int:
    """Unique non-parameter storages autograd keeps for backward after one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    torch.manual_seed(0)
    with saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    return sum(seen.values())


def test_fused_saves_strictly_fewer_bytes_for_backward(fused_flag):
    model = build_tiny_bert_cls()
    inject_gates(model, None, GateConfig(seed=0))
    configure_trainable(model, "gates")
    model.train()
    ids = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    ref = _run(False, _saved_bytes, model, batch)
    fus = _run(True, _saved_bytes, model, batch)
    print(f"saved for backward, tiny BERT 8x32: reference {ref} B, fused {fus} B")
    assert fus < ref
    # the reference keeps, per gated Linear, at least its (tokens, out) pre-gate output y0
    n_tok = ids.numel()
    y0_bytes = sum(4 * n_tok * gm.out_features for gm in G.gated_modules(model).values())
    assert ref - fus >= y0_bytes // 2


def test_float16_autocast_falls_back_to_reference(fused_flag, monkeypatch):
    """y / z_r cannot recover y0 in fp16 (underflow for small z_r): plain autograd there."""
    calls = []
    real = G._GatedLinearFn.apply
    monkeypatch.setattr(G._GatedLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    G.FUSED_AUTOGRAD = True
    gm = GatedLinear(nn.Linear(8, 4))
    with torch.autocast("cpu", dtype=torch.float16):
        y = gm(torch.randn(3, 8))
    assert y.dtype == torch.float16 and calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm(torch.randn(3, 8))
    assert calls == [1]


def test_fused_lora_saves_fewer_bytes_than_plain_lora(fused_flag):
    """LoRA folded into the fused path keeps x (shared with the gated GEMM) and rank-r
    activations, not the reference's full-width x * z_c and pre-gate output copies."""
    model = build_tiny_bert_cls()
    inject_gates(model, None, GateConfig(seed=0, lora_rank=2))
    configure_trainable(model, "gates+lora")
    model.train()
    ids = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    ref = _run(False, _saved_bytes, model, batch)
    fus = _run(True, _saved_bytes, model, batch)
    print(f"saved for backward, tiny BERT gates+lora 8x32: reference {ref} B, fused {fus} B")
    n_tok = ids.numel()
    y0_bytes = sum(4 * n_tok * gm.out_features for gm in G.gated_modules(model).values())
    assert ref - fus >= y0_bytes // 2
