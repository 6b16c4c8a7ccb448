"""One-shot structured pruning peers (FLAP-style and Wanda-sp-style), on our gates.

Both score the plan's own units from one calibration pass (core.importance) and close
them by setting gate logits, so the result goes through the same measurement, exact
pruning and packaging as a trained job, and every comparison is at the same physically
removed fraction (measured by core.structure, found by bisection):

- ``flap``: fluctuation scores, standardised within each layer, one global ranking of
  KV groups (attention) and FFN neurons together, and the mean of every removed input
  folded into the bias (compensation) -- An et al., FLAP (AAAI 2024), at our granularity.
- ``wandasp``: Wanda's |W| * ||x|| scores, the same share removed from every layer (a
  uniform ratio), no compensation -- the structured Wanda variant FLAP compares with.

A unit is a KV group (all its query heads; under MHA a head) or an FFN neuron: the
smallest pieces whose removal the plan turns into removed parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.gates import gated_modules
from core.importance import ColumnStats, set_compensation, standardized, unit_scores
from core.structure import ModelStructure, describe, sparsity_by_type

ONESHOT_METHODS: tuple[str, ...] = ("flap", "wandasp")
_OPEN, _CLOSED = 3.0, -3.0


@torch.no_grad()
def _apply(
    model: nn.Module, S: ModelStructure, dead_groups: list[Tensor], dead_ffn: list[Tensor]
) -> None:
    """Open every gate, then close the lines of the dead units."""
    gms = gated_modules(model)
    for gm in gms.values():
        gm.row_logits.fill_(_OPEN)
        gm.col_logits.fill_(_OPEN)
    d, gs = S.head_dim, S.group_size
    for ls, dg, df in zip(S.layers, dead_groups, dead_ffn, strict=True):
        for g in dg.nonzero().squeeze(1).tolist():
            kv = slice(g * d, (g + 1) * d)
            q = slice(g * gs * d, (g + 1) * gs * d)
            for name, sl, side in (
                (ls.k, kv, "row"),
                (ls.v, kv, "row"),
                (ls.q, q, "row"),
                (ls.o, q, "col"),
            ):
                lin = gms.get(name)
                if lin is not None:
                    (lin.row_logits if side == "row" else lin.col_logits)[sl] = _CLOSED
        idx = df.nonzero().squeeze(1)
        if idx.numel():
            down = gms.get(ls.ffn_out)
            if down is not None:
                down.col_logits[idx] = _CLOSED
            for name in ls.ffn_in:
                up = gms.get(name)
                if up is not None:
                    up.row_logits[idx] = _CLOSED


def _measured(model: nn.Module) -> float:
    return float(sparsity_by_type(model).measured_sparsity)


@torch.no_grad()
def oneshot_prune(
    model: nn.Module,
    stats: Mapping[str, ColumnStats],
    method: str,
    target: float,
    tol: float = 0.005,
    max_iter: int = 30,
) -> dict:
    """Close units of a gated model by ``method`` until the measured removed fraction is
    ``target`` (within ``tol`` where the unit sizes allow). Gates end at +-3 logits (eval
    gates exactly 0 or 1) and the model carries no gate noise. Returns a summary."""
    if method not in ONESHOT_METHODS:
        raise ConfigError("method", f"must be one of {list(ONESHOT_METHODS)}, got {method!r}")
    S = describe(model)
    for gm in gated_modules(model).values():
        gm.noise_std = 0.0
        gm.col_group = 1
        gm.comp_mean = None
    sc = unit_scores(model, S, stats, "flap" if method == "flap" else "wanda")
    groups = sc.heads  # already one score per KV group
    neurons = sc.neurons
    if method == "flap":
        z_g, z_n = standardized(groups), standardized(neurons)
        flat = torch.cat(z_g + z_n)
        sizes = [t.numel() for t in z_g + z_n]
        order = torch.argsort(flat, stable=True)

        def dead_at(k: int) -> tuple[list[Tensor], list[Tensor]]:
            dead = torch.zeros(flat.numel(), dtype=torch.bool)
            dead[order[:k]] = True
            parts = list(dead.split(sizes))
            n = len(z_g)
            return parts[:n], parts[n:]

        lo, hi = 0, int(torch.isfinite(flat).sum())
    else:

        def dead_at(k: int) -> tuple[list[Tensor], list[Tensor]]:
            r = k / 10_000  # the same share of every layer's groups and neurons

            def lowest(s: Tensor) -> Tensor:
                n = int(round(r * s.numel()))
                dead = torch.zeros(s.numel(), dtype=torch.bool)
                if n:
                    dead[torch.argsort(s, stable=True)[:n]] = True
                return dead

            return [lowest(g) for g in groups], [lowest(n) for n in neurons]

        lo, hi = 0, 10_000
    best: tuple[float, int] = (float("inf"), 0)
    for _ in range(max_iter):  # removed fraction grows with k: bisection
        if lo > hi:
            break
        mid = (lo + hi) // 2
        _apply(model, S, *dead_at(mid))
        m = _measured(model)
        if abs(m - target) < best[0]:
            best = (abs(m - target), mid)
        if abs(m - target) <= tol:
            break
        if m < target:
            lo = mid + 1
        else:
            hi = mid - 1
    _apply(model, S, *dead_at(best[1]))
    compensated: list[str] = []
    if method == "flap":
        compensated = set_compensation(model, S, stats)
    return {"method": method, "target": target, "measured_sparsity": _measured(model),
            "compensated": len(compensated)}  # fmt: skip
