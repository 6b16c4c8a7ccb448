"""The gate map: per layer, which attention heads and FFN neurons are kept vs removed.

A compact, JSON-able view of a prune plan for people (the dashboard's heat-map, the
``/gates`` route), in two flavours from the same function:

- while training, ``from_model(gated_model)``: the plan the eval gates imply right now
  (``core.structure.build_plan``, so it is exactly what pruning would remove at this
  evaluation);
- after pruning, ``from_plan(manifest["plan"])``: the plan that was applied.

Per layer it gives the kept query heads (and KV groups under GQA) as index lists, the kept
q/k and v/o width per kept head (uniform per layer, see core.structure), the number of FFN
neurons kept and, for the heat-map, the share of neurons kept in ``bins`` equal slices of
the FFN (thousands of single neurons do not fit on a screen; a slice's share does).
Everything here is pure: no torch state is changed, nothing is written.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.structure import build_plan, describe, plan_field, plan_to_dict

FORMAT = 1
# the key under which the service keeps a snapshot in an evaluation's metric point
METRICS_KEY = "gates"
DEFAULT_BINS = 32


def _bins(kept: list[int], total: int, n: int) -> list[float]:
    """Share of neurons kept in each of ``min(n, total)`` equal slices of [0, total)."""
    n = max(1, min(n, total))
    counts = [0] * n
    for j in kept:
        if 0 <= j < total:
            counts[((j + 1) * n - 1) // total] += 1  # slice b is [b*total//n, (b+1)*total//n)
    sizes = [((b + 1) * total) // n - (b * total) // n for b in range(n)]
    return [round(c / s, 4) if s else 0.0 for c, s in zip(counts, sizes, strict=True)]


def _total(plan: dict[str, Any], name: str, fallback: dict[str, Any] | None) -> int:
    v = plan.get(name) or (fallback or {}).get(name) or 0
    return int(v)


def from_plan(
    plan: Any,
    *,
    step: int | None = None,
    source: str = "plan",
    bins: int = DEFAULT_BINS,
    totals: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The gate map of a PrunePlan (or its dict form, as stored in a manifest).

    ``totals`` (num_heads, num_kv_heads, head_dim, intermediate_size) fills in what an
    older dict plan lacks; a PrunePlan always carries them.
    """
    p = plan_to_dict(plan)
    H = _total(p, "num_heads", totals)
    G = _total(p, "num_kv_heads", totals) or H
    d = _total(p, "head_dim", totals)
    F = _total(p, "intermediate_size", totals)
    layers = []
    heads_kept_all = ffn_kept_all = 0
    for lp in p["layers"]:
        heads = sorted(int(h) for h in plan_field(lp, "heads_kept"))
        groups = sorted(int(g) for g in plan_field(lp, "kv_heads_kept"))
        qk = plan_field(lp, "qk_dims")
        vo = plan_field(lp, "vo_dims")
        ffn = [int(j) for j in plan_field(lp, "ffn_kept")]
        heads_kept_all += len(heads)
        ffn_kept_all += len(ffn)
        layers.append(
            {
                "index": int(plan_field(lp, "index")),
                "heads_kept": heads,
                "kv_heads_kept": groups,
                "heads": {"kept": len(heads), "total": H},
                "kv_heads": {"kept": len(groups), "total": G},
                "qk_dims": {"kept": len(qk[0]) if qk else 0, "total": d},
                "vo_dims": {"kept": len(vo[0]) if vo else 0, "total": d},
                "ffn": {"kept": len(ffn), "total": F},
                "ffn_bins": _bins(ffn, F, bins) if F else [],
            }
        )
    before = int(p.get("gated_params_before") or 0)
    after = int(p.get("gated_params_after") or 0)
    return {
        "format": FORMAT,
        "source": source,
        "step": step,
        "family": p.get("family"),
        "num_heads": H,
        "num_kv_heads": G,
        "head_dim": d,
        "intermediate_size": F,
        "layers": layers,
        "totals": {
            "heads": {"kept": heads_kept_all, "total": H * len(layers)},
            "ffn": {"kept": ffn_kept_all, "total": F * len(layers)},
            "gated_params_before": before,
            "gated_params_after": after,
            "removed_fraction": round(1.0 - after / before, 6) if before else 0.0,
        },
    }


def from_model(
    model: nn.Module, *, step: int | None = None, bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """The gate map a gated model's eval gates imply (what pruning would keep now)."""
    return from_plan(build_plan(model, describe(model)), step=step, source="eval", bins=bins)


def snapshot(model: nn.Module, step: int) -> dict[str, Any] | None:
    """``from_model`` for the training loop's evaluation record: None (no map) for a model
    core.structure cannot describe, instead of failing the evaluation."""
    from core.errors import UnsupportedModelError

    try:
        return from_model(model, step=step)
    except UnsupportedModelError:
        return None
