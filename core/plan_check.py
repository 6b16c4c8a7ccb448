"""The one prune-plan validator, and the proofs that what a plan drops is dead.

Order matters (Torch-Pruning's lesson): the whole plan is checked against the model
(index ranges, uniform per-layer widths, GQA/RoPE coupling, and that every group it
drops is provably dead in the folded weights) BEFORE any tensor is sliced, so a bad
plan raises ``PlanError`` naming the layer and field instead of silently giving a
model that answers differently.

Dead means exactly zero after folding, W' = diag(z_r) W diag(z_c), b' = z_r * b
(method.md §3):
- FFN neuron j: producer row j (weight and bias) is 0, or (SwiGLU) the gate or up row
  is 0, or consumer column j is 0; GELU(0) = SiLU(0) = ReLU(0) = 0.
- V/O dim d of a head (GQA: of a KV group): the value row is 0, or the output column
  is 0 for every query head that reads it.
- Q/K dim d: the query row is 0 for every query head of the group, or the key row is 0
  (with per-head q/k norms: both). With RoPE the pair (d, d + head_dim/2) goes only if
  both are dead on the same side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from core.errors import PlanError
from core.structure import LayerStructure, ModelStructure, describe, plan_field

__all__ = ["folded", "validate_plan"]


def folded(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W', b') with eval gates folded in; plain Linears pass through."""
    if hasattr(m, "folded_weight_and_bias"):
        w, b = m.folded_weight_and_bias()
    else:
        w, b = m.weight, m.bias
    return w.detach(), (None if b is None else b.detach())


def _is_zero_rows(w: Tensor, b: Tensor | None, rows: Tensor) -> Tensor:
    """Bool per row index: weight row and bias entry are exactly 0."""
    z = (w[rows] == 0).all(dim=1)
    if b is not None:
        z = z & (b[rows] == 0)
    return z


def _is_zero_cols(w: Tensor, cols: Tensor) -> Tensor:
    return (w[:, cols] == 0).all(dim=0)


def _check_index_list(xs: Any, n: int, where: str) -> list[int]:
    try:
        xs = [int(x) for x in xs]
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: expected a list of integers ({e})") from None
    if any(x < 0 or x >= n for x in xs):
        raise PlanError(f"{where}: index out of range [0, {n}): {xs}")
    if xs != sorted(set(xs)):
        raise PlanError(f"{where}: indices must be sorted and unique: {xs}")
    return xs


def validate_plan(
    model: nn.Module, plan: Any, check_dead: bool = True, structure: ModelStructure | None = None
) -> None:
    """Raise PlanError (naming layer and field) if ``plan`` does not fit ``model``.

    ``plan`` is a core.structure.PrunePlan or a dict with its fields. ``check_dead``
    also proves, on the folded weights, that everything the plan drops contributes
    exactly zero: a wrong plan would otherwise silently change outputs.
    """
    S = structure or describe(model)
    fam = plan_field(plan, "family")
    if fam != S.family:
        raise PlanError(f"plan.family: plan is for {fam!r}, model is {S.family!r}")
    layers = list(plan_field(plan, "layers"))
    if len(layers) != len(S.layers):
        raise PlanError(f"plan.layers: {len(layers)} layer plans for a {len(S.layers)}-layer model")
    group, hd = S.group_size, S.head_dim
    for i, (lp, ls) in enumerate(zip(layers, S.layers, strict=True)):
        w = f"layer {i}"
        if int(plan_field(lp, "index")) != ls.index:
            raise PlanError(f"{w}.index: expected {ls.index}, got {plan_field(lp, 'index')}")
        heads = _check_index_list(plan_field(lp, "heads_kept"), S.num_heads, f"{w}.heads_kept")
        kv = _check_index_list(
            plan_field(lp, "kv_heads_kept"), S.num_kv_heads, f"{w}.kv_heads_kept"
        )
        expect_heads = [k * group + j for k in kv for j in range(group)]
        if heads != expect_heads:
            raise PlanError(
                f"{w}.heads_kept: must be the query heads of the kept KV groups "
                f"{kv} (group size {group}), i.e. {expect_heads}; got {heads}"
            )
        dims: dict[str, list[list[int]]] = {}
        for name in ("qk_dims", "vo_dims"):
            raw = list(plan_field(lp, name))
            if len(raw) != len(kv):
                raise PlanError(f"{w}.{name}: {len(raw)} entries for {len(kv)} kept groups")
            lists = [_check_index_list(d, hd, f"{w}.{name}[{j}]") for j, d in enumerate(raw)]
            if len({len(d) for d in lists}) > 1:
                raise PlanError(
                    f"{w}.{name}: every kept head/group needs the same number of dims "
                    f"(uniform per layer), got {[len(d) for d in lists]}"
                )
            dims[name] = lists
        qk, vo = dims["qk_dims"], dims["vo_dims"]
        if any(not d for d in vo):
            raise PlanError(f"{w}.vo_dims: a kept head/group needs at least one v/o dim")
        if S.rope:
            half = hd // 2
            for j, d_list in enumerate(qk):
                s = set(d_list)
                if any((d + half if d < half else d - half) not in s for d in d_list):
                    raise PlanError(
                        f"{w}.qk_dims[{j}]: RoPE dims d and d+{half} must be kept together"
                    )
        ffn = _check_index_list(plan_field(lp, "ffn_kept"), S.intermediate_size, f"{w}.ffn_kept")
        if check_dead:
            _check_dead(model, S, ls, kv, qk, vo, ffn, w)


@torch.no_grad()
def _check_dead(
    model: nn.Module,
    S: ModelStructure,
    ls: LayerStructure,
    kv: list[int],
    qk: list[list[int]],
    vo: list[list[int]],
    ffn: list[int],
    where: str,
) -> None:
    hd, group = S.head_dim, S.group_size
    mod = model.get_submodule
    wq, bq = folded(mod(ls.q))
    wk, bk = folded(mod(ls.k))
    wv, bv = folded(mod(ls.v))
    wo, _ = folded(mod(ls.o))
    dims = torch.arange(hd)

    def v_dead(grp: int) -> Tensor:  # (hd,) bool: V/O dim dead in KV group grp
        dead = _is_zero_rows(wv, bv, grp * hd + dims)
        o_dead = torch.ones(hd, dtype=torch.bool)
        for j in range(group):
            o_dead &= _is_zero_cols(wo, (grp * group + j) * hd + dims)
        return dead | o_dead

    def qk_dead(grp: int) -> Tensor:  # (hd,) bool
        k_dead = _is_zero_rows(wk, bk, grp * hd + dims)
        q_dead = torch.ones(hd, dtype=torch.bool)
        for j in range(group):
            q_dead &= _is_zero_rows(wq, bq, (grp * group + j) * hd + dims)
        if S.rope:  # a pair dies only if both halves are dead on the same side
            h = hd // 2
            k_dead = (k_dead[:h] & k_dead[h:]).repeat(2)
            q_dead = (q_dead[:h] & q_dead[h:]).repeat(2)
        # q/k norms: a dim zero on one side only still weighs in that side's norm
        return (k_dead & q_dead) if S.qk_norm else (k_dead | q_dead)

    kept = set(kv)
    for grp in range(S.num_kv_heads):
        vd = v_dead(grp)
        if grp not in kept:
            if not bool(vd.all()):
                live = dims[~vd].tolist()
                raise PlanError(
                    f"{where}.kv_heads_kept: head/group {grp} is dropped but its V/O dims "
                    f"{live} are not dead (would change outputs)"
                )
            continue
        j = kv.index(grp)
        drop_vo = sorted(set(range(hd)) - set(vo[j]))
        if drop_vo and not bool(vd[drop_vo].all()):
            bad = [d for d in drop_vo if not bool(vd[d])]
            raise PlanError(f"{where}.vo_dims[{j}]: dropped dims {bad} of group {grp} are live")
        drop_qk = sorted(set(range(hd)) - set(qk[j]))
        if drop_qk:
            qd = qk_dead(grp)
            bad = [d for d in drop_qk if not bool(qd[d])]
            if bad:
                raise PlanError(f"{where}.qk_dims[{j}]: dropped dims {bad} of group {grp} are live")
    drop = sorted(set(range(S.intermediate_size)) - set(ffn))
    if drop:
        idx = torch.tensor(drop)
        wd, _ = folded(mod(ls.ffn_out))
        dead = _is_zero_cols(wd, idx)
        for name in ls.ffn_in:
            wu, bu = folded(mod(name))
            dead |= _is_zero_rows(wu, bu, idx)
        if not bool(dead.all()):
            bad = idx[~dead].tolist()[:10]
            raise PlanError(f"{where}.ffn_kept: dropped neurons {bad} are live")
