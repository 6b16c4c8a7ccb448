"""Differentiable expected sparsity: what the calibrated objective steers (method.md §2).

``expected_kept_params`` applies build_plan's coupling rules (core.structure) to gate
"alive" probabilities instead of hard masks: AND of alive = product, OR = 1 - prod(1 - q),
the uniform per-layer width = a straight-through max. With probabilities in {0, 1} it
reproduces build_plan's count exactly, so ``expected_removed_fraction`` equals
``measured_sparsity`` on saturated gates. Separate from core.structure because only the
objective needs gradients through the plan; the plan itself never does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.errors import UnsupportedModelError
from core.gates import GatedLinear, gated_modules
from core.structure import ModelStructure, describe

_BAND = 1.5  # |theta| beyond which the sparsity gradient may only pull a gate back


class _BandGrad(torch.autograd.Function):
    """Identity whose gradient cannot push a logit further out of [lo, hi].

    Without it the sparsity term keeps driving already-closed gates deeper (Adam moves
    them ~lr per step however small the gradient), so after an overshoot they need
    hundreds of steps to come back. Gradients that pull toward the band pass unchanged.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        # descent moves x by -g: below lo only g < 0 (up) passes; above hi only g > 0 (down)
        ok = ((x > ctx.lo) | (g < 0)) & ((x < ctx.hi) | (g > 0))
        return g * ok, None, None


def _probs(
    model: nn.Module,
    name: str,
    probs: str,
    sigma: float | None,
    grad_scale: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    m = model.get_submodule(name)
    if not isinstance(m, GatedLinear):
        return None, None
    if probs == "open":
        return m.open_probs() if sigma is None else m.open_probs(min_sigma=sigma)
    if probs == "keep":
        return m.keep_probs()
    if probs == "hard":  # alive masks of the eval gates, as floats
        z_r, z_c = m.eval_gates()
        return (z_r > 0).float(), (z_c > 0).float()
    if probs == "soft":  # keep probability; optional per-line gradient weights (kurtosis)
        sp = 0.5 if sigma is None else sigma
        mu_r = torch.tanh(_BandGrad.apply(m.row_logits, -_BAND, _BAND))
        mu_c = torch.tanh(_BandGrad.apply(m.col_theta(), -_BAND, _BAND))
        p_r = 0.5 * (1 + torch.erf((mu_r + 0.5) / (sp * math.sqrt(2.0))))
        p_c = 0.5 * (1 + torch.erf((mu_c + 0.5) / (sp * math.sqrt(2.0))))
        if grad_scale and name in grad_scale:
            g_r, g_c = grad_scale[name]
            p_r = p_r.detach() + g_r * (p_r - p_r.detach())
            p_c = p_c.detach() + g_c * (p_c - p_c.detach())
        return p_r, p_c
    raise ValueError(f"probs must be 'open', 'keep', 'hard' or 'st', got {probs!r}")


def _ones_like_shape(n: int, ref: Tensor) -> Tensor:
    return torch.ones(n, device=ref.device, dtype=ref.dtype)


def _both(k: Tensor, q: Tensor, qk_norm: bool) -> Tensor:
    """P(a q/k dim is kept): alive on both sides, or (q/k norms) on either side."""
    return 1 - (1 - k) * (1 - q) if qk_norm else k * q


def _st_max(x: Tensor, temperature: float = 0.5) -> Tensor:
    """Value = max(x) exactly; gradient spread by softmax(x / t) (a straight-through max)."""
    if x.numel() == 0:
        return x.sum()
    w = torch.softmax(x.detach() / temperature, 0)
    soft = (w * x).sum()
    return x.max().detach() + soft - soft.detach()


def expected_kept_params(
    model: nn.Module,
    structure: ModelStructure | None = None,
    probs: str = "open",
    min_sigma: float | None = None,
    grad_scale: dict[str, tuple[Tensor, Tensor]] | None = None,
    equal_head_dims: bool = True,
) -> tuple[Tensor, int]:
    """(expected gated params kept after pruning [differentiable], gated params before).

    Gates are treated as independent with "alive" probability q (probs="open": the
    probability the training gate is > 0, which saturates to 0/1; probs="keep": the paper's
    keep probability; probs="hard": 0/1 from the eval gates; probs="st": the "hard" value
    with the gradient of the expectation on keep probabilities with sigma_p = min_sigma,
    so the value IS the measured count; grad_scale optionally scales that gradient per
    row/column, by module name). AND of alive = product, OR = 1 - prod(1 - q), so with q in {0, 1}
    this reproduces build_plan's count exactly (the uniform per-layer max is a
    straight-through max).
    """
    S = structure or describe(model)
    if probs == "st":
        # Value from the eval gates (== build_plan's count), gradient from the same
        # formulas on smooth keep probabilities. The whole expectation is swapped, not
        # each probability: with per-probability straight-through, a group whose lines
        # all closed together gets zero gradient (a product of hard zeros) and can never
        # reopen after an overshoot.
        hard, before = expected_kept_params(model, S, "hard")
        soft, _ = expected_kept_params(model, S, "soft", min_sigma, grad_scale)
        return hard.detach() + soft - soft.detach(), before
    gated = gated_modules(model)
    if not gated:
        raise UnsupportedModelError("the model has no gated layers")
    ref = next(iter(gated.values())).row_logits
    kept = ref.new_zeros(())
    before = 0
    H, G, d, gs = S.num_heads, S.num_kv_heads, S.head_dim, S.group_size

    def rows(n: str, size: int) -> Tensor:
        r = _probs(model, n, probs, min_sigma, grad_scale)[0]
        return _ones_like_shape(size, ref) if r is None else r

    def cols(n: str, size: int) -> Tensor:
        c = _probs(model, n, probs, min_sigma, grad_scale)[1]
        return _ones_like_shape(size, ref) if c is None else c

    for ls in S.layers:
        q = rows(ls.q, H * d).view(G, gs, d)
        k = rows(ls.k, G * d).view(G, d)
        v = rows(ls.v, G * d).view(G, d)
        o = cols(ls.o, H * d).view(G, gs, d)
        o_gm = gated.get(ls.o)
        if o_gm is not None and o_gm.col_group in (d, gs * d):
            # head gates: one variable per head (col_group d) or per KV group (gs * d), so
            # "the group's output is dead" is P(its gate(s) closed) + P(open) * P(all its v
            # rows closed), not a product over d tied copies (whose gradient vanishes as
            # (1 - o)^d).
            alive = 1 - torch.prod(1 - o[..., 0], dim=1)  # (G,) any head of the group open
            vo = v * alive[:, None]
            group = alive * (1 - torch.prod(1 - v, dim=1))
        else:
            vo = v * (1 - torch.prod(1 - o, dim=1))  # (G, d)
            group = 1 - torch.prod(1 - vo, dim=1)  # (G,) P(group kept)
        if S.rope:
            half = d // 2
            qp = 1 - (1 - q[..., :half]) * (1 - q[..., half:])  # (G, gs, half)
            kp = 1 - (1 - k[:, :half]) * (1 - k[:, half:])
            pair = _both(kp, 1 - torch.prod(1 - qp, dim=1), S.qk_norm)  # (G, half)
            qk_count = 2 * pair.sum(-1)  # (G,)
        else:
            qk_count = _both(k, 1 - torch.prod(1 - q, dim=1), S.qk_norm).sum(-1)
        n_kv = group.sum()
        n_vo = _st_max(group * vo.sum(-1))
        n_qk = _st_max(group * qk_count)
        if equal_head_dims and float(n_vo.detach()) > 0.5 and float(n_qk.detach()) > 0.5:
            # the equal-width rule of build_plan (one SDPA head dim for q/k and v/o)
            n_w = _st_max(torch.stack([n_vo, n_qk]))
            if S.rope:  # q/k grow by whole pairs: round the width up to even
                width = float(n_w.detach())
                target = round(width)
                target = min(target + target % 2, d)
                n_w = n_w + (target - width)
            n_vo = n_qk = n_w
        ffn = cols(ls.ffn_out, S.intermediate_size)
        for n in ls.ffn_in:
            ffn = ffn * rows(n, S.intermediate_size)
        n_ffn = ffn.sum()
        # kept rows (producers) or kept columns (consumers) per layer type
        kept_lines = {
            "q": n_kv * gs * n_qk,
            "k": n_kv * n_qk,
            "v": n_kv * n_vo,
            "o": n_kv * gs * n_vo,
            "ffn_in": n_ffn,
            "ffn_out": n_ffn,
        }
        for name, kind in ls.roles().items():
            gm = gated.get(name)
            if gm is None:
                continue
            before += gm.base.weight.numel()
            other = gm.base.out_features if kind in ("o", "ffn_out") else gm.base.in_features
            kept = kept + kept_lines[kind] * other
    in_roles = S.module_types()
    for name, gm in gated.items():
        if name not in in_roles:
            before += gm.base.weight.numel()
            kept = kept + gm.base.weight.numel()
    return kept, before


def expected_removed_fraction(
    model: nn.Module,
    structure: ModelStructure | None = None,
    probs: str = "open",
    min_sigma: float | None = None,
    grad_scale: dict[str, tuple[Tensor, Tensor]] | None = None,
    equal_head_dims: bool = True,
) -> Tensor:
    """Differentiable counterpart of measured_sparsity (see expected_kept_params)."""
    kept, before = expected_kept_params(
        model, structure, probs, min_sigma, grad_scale, equal_head_dims
    )
    return 1 - kept / before
