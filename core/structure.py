"""Model structure, coupled groups and the pruning plan (method.md §3).

`describe(model)` finds, per transformer layer, the q/k/v/o and FFN projections and the
attention geometry. `build_plan(model)` reads the EVAL gates (exact zeros only) and decides
which coupled groups are physically removed:

- FFN neuron j: removed if ANY of its producer rows (intermediate / gate / up) or its
  consumer column (output / down) is closed: GELU(0) = SiLU(0) = 0 and the row gate
  sits after the bias, so the neuron is exactly dead.
- V/O dim j of KV group g (MHA: group == head): dead if v row (g, j) is closed OR the
  o columns (h, j) are closed for ALL query heads h of the group. A group with no live
  V/O dim is removed whole (q, k, v, o slices of all its query heads).
- Q/K dim j of group g: dead if k row (g, j) is closed OR q rows (h, j) are closed for all
  h in the group. RoPE rotates dims (i, i + d/2) together, so the rule is applied to the
  PAIR: the pair is dead iff both k dims are closed, or, for every query head, both q dims
  are closed. (Applying the per-dim rule and then "keep the pair if either dim is alive"
  is NOT exact: a live q_i' against a live k_i still scores q_i' k_i sin((n-m) theta).)
  A kept group with no live q/k dim keeps 0 q/k dims: its attention becomes uniform.
  With a per-head RMSNorm on q and k (Qwen3) a dim also feeds the norm of every other
  dim of its head, so it is dead only if it is closed on BOTH sides (k row and the q
  rows of all heads of the group): then its pre-norm value is exactly 0 on both sides
  and removing it changes neither the scores nor the norms.
- Uniform per layer: every kept group of a layer keeps the SAME number of q/k dims (the
  max over kept groups) and of v/o dims, so the pruned layer runs one SDPA call. Groups
  with fewer live dims get dead dims (lowest indices first; whole pairs under RoPE) added
  back. Their folded weights are exactly zero, so outputs do not change. What is listed in
  the plan is exactly what is physically kept.
- Residual-side gates (columns of q/k/v/ffn_in, rows of o/ffn_out) are never removed;
  they are folded as zeros and do not count as removed parameters.

`measured_sparsity(model)` is `build_plan(model).removed_fraction()`: the one number the
training loop reports and pruning removes; its differentiable counterpart lives in
core.expectation. `pad_dims` / `uniform_width` are the one implementation of the
uniform-width padding, shared with the pruned builders (core.prune_build).

Which modules are a layer's q, k, v, o, FFN and norms comes from the family table
(core.families), never from names written here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from core.errors import PlanError, UnsupportedModelError
from core.families import ENCODER, lookup, require
from core.gates import GatedLinear, gated_modules


@dataclass
class LayerStructure:
    index: int
    q: str
    k: str
    v: str
    o: str
    ffn_in: list[str]  # bert: [intermediate]; llama: [gate_proj, up_proj]
    ffn_out: str
    norm1: str = ""  # encoders: after attention; decoders: before attention
    norm2: str = ""
    q_norm: str | None = None  # per-head q/k RMSNorm (Qwen3)
    k_norm: str | None = None

    def roles(self) -> dict[str, str]:
        """module name -> layer type (q, k, v, o, ffn_in, ffn_out)."""
        out = {self.q: "q", self.k: "k", self.v: "v", self.o: "o", self.ffn_out: "ffn_out"}
        out.update(dict.fromkeys(self.ffn_in, "ffn_in"))
        return out


@dataclass
class ModelStructure:
    family: str  # "bert" | "llama"
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope: bool
    layers: list[LayerStructure]
    layout: str = ""  # core.families layout name
    qk_norm: bool = False  # per-head q/k RMSNorm: a q/k dim must be dead on both sides

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def module_types(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ls in self.layers:
            out.update(ls.roles())
        return out


def describe(model: nn.Module) -> ModelStructure:
    """Find the per-layer projections and norms of a model type in the family table."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"cannot describe a {type(model).__name__}: it has no config")
    spec = require(model)
    lay = spec.layout
    modules = dict(model.named_modules())
    pattern = lay.layer_pattern()
    prefixes: dict[int, str] = {}
    for name in modules:
        m = pattern.fullmatch(name)
        if m:
            prefixes[int(m.group("idx"))] = m.group("prefix") + m.group("idx") + "."
    if not prefixes:
        raise UnsupportedModelError(f"no transformer layers found in this {spec.name} model")
    layers = []
    for idx in sorted(prefixes):
        p = prefixes[idx]
        ls = LayerStructure(
            index=idx,
            q=p + lay.q,
            k=p + lay.k,
            v=p + lay.v,
            o=p + lay.o,
            ffn_in=[p + s for s in lay.ffn_in],
            ffn_out=p + lay.ffn_out,
            norm1=p + lay.norm1,
            norm2=p + lay.norm2,
            q_norm=None if lay.q_norm is None else p + lay.q_norm,
            k_norm=None if lay.k_norm is None else p + lay.k_norm,
        )
        for n in ls.roles():
            if not isinstance(modules.get(n), nn.Linear | GatedLinear):
                raise UnsupportedModelError(f"layer {idx}: expected a Linear at {n!r}")
        norms = [ls.norm1, ls.norm2, ls.q_norm, ls.k_norm]
        for norm in norms:
            if norm is not None and norm not in modules:
                raise UnsupportedModelError(f"layer {idx}: expected a norm at {norm!r}")
        layers.append(ls)
    num_heads = int(cfg.num_attention_heads)
    num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    if spec.family == ENCODER:
        num_kv = num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    if num_heads % num_kv:
        raise UnsupportedModelError(f"num_attention_heads {num_heads} % kv heads {num_kv} != 0")
    ffn_out = modules[layers[0].ffn_out]
    return ModelStructure(
        family=spec.family,
        model_type=spec.name,
        hidden_size=int(cfg.hidden_size),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=int(head_dim),
        intermediate_size=int(cast(Tensor, ffn_out.weight).shape[1]),
        rope=lay.rope,
        layers=layers,
        layout=lay.name,
        qk_norm=lay.qk_norm,
    )


# ---------------------------------------------------------------------------------------
# Plan


@dataclass
class LayerPlan:
    index: int
    heads_kept: list[int]  # query heads kept (GQA: whole KV groups only)
    kv_heads_kept: list[int]  # == heads_kept for MHA
    qk_dims: list[list[int]]  # per kept KV group (MHA: head): kept q/k dims, same length
    vo_dims: list[list[int]]  # per kept KV group (MHA: head): kept v/o dims, same length
    ffn_kept: list[int]  # kept intermediate neurons


@dataclass
class PrunePlan:
    family: str
    layers: list[LayerPlan]
    gated_params_before: int  # sum out*in over gated Linears
    gated_params_after: int  # after physical removal (coupled groups, uniform per layer)
    paper_params_after: int  # sum rows_kept * cols_kept over gated Linears (paper's count)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rope: bool = False
    gated: list[str] = field(default_factory=list)  # gated module names

    def removed_fraction(self) -> float:
        """MEASURED sparsity: share of gated weight params that pruning removes."""
        if self.gated_params_before == 0:
            return 0.0
        return 1.0 - self.gated_params_after / self.gated_params_before

    def paper_removed_fraction(self) -> float:
        if self.gated_params_before == 0:
            return 0.0
        return 1.0 - self.paper_params_after / self.gated_params_before

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        try:
            layers = [LayerPlan(**lp) for lp in d["layers"]]
            rest = {k: v for k, v in d.items() if k != "layers"}
            return cls(layers=layers, **rest)
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed prune plan: {e}") from e

    @classmethod
    def from_json(cls, s: str) -> PrunePlan:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise PlanError(f"prune plan is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _masks(model: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """(row_alive, col_alive) bool masks from eval gates; all-True for ungated Linears."""
    m = model.get_submodule(name)
    if isinstance(m, GatedLinear):
        with torch.no_grad():
            z_r, z_c = m.eval_gates()
        return (z_r > 0).cpu(), (z_c > 0).cpu()
    out_f, in_f = cast(Tensor, m.weight).shape
    return torch.ones(out_f, dtype=torch.bool), torch.ones(in_f, dtype=torch.bool)


def pad_dims(kept: list[int], width: int, size: int, pairs: bool = False) -> list[int]:
    """``kept`` plus the lowest indices in [0, size) it lacks, up to ``width`` indices.

    The one padding rule of the uniform widths: what is added is dead (its weights are
    exactly zero after folding), so keeping it changes no output. ``pairs`` (RoPE q/k
    dims) adds whole pairs (d, d + size/2); ``kept`` is then pair-closed.
    """
    if len(kept) >= width:
        return list(kept)
    have = set(kept)
    if pairs:
        half = size // 2
        extra = [d for d in range(half) if d not in have][: (width - len(kept)) // 2]
        return sorted(have | set(extra) | {d + half for d in extra})
    return sorted(have | set([d for d in range(size) if d not in have][: width - len(kept)]))


def uniform_width(n_qk: int, n_vo: int, head_dim: int, rope: bool) -> int:
    """One head width for q/k and v/o (CPU SDPA's fused kernel needs equal head dims);
    q/k grow by whole RoPE pairs, so the width is even under RoPE."""
    n = max(n_qk, n_vo)
    if rope and n % 2:
        n += 1
    return min(n, head_dim)


def _where(alive: Tensor) -> list[int]:
    return alive.nonzero().flatten().tolist()


def _layer_plan(
    model: nn.Module, S: ModelStructure, ls: LayerStructure, equal_head_dims: bool = True
) -> LayerPlan:
    H, G, d, gs = S.num_heads, S.num_kv_heads, S.head_dim, S.group_size
    q_rows = _masks(model, ls.q)[0].view(G, gs, d)
    k_rows = _masks(model, ls.k)[0].view(G, d)
    v_rows = _masks(model, ls.v)[0].view(G, d)
    o_cols = _masks(model, ls.o)[1].view(G, gs, d)

    vo_alive = v_rows & o_cols.any(1)  # (G, d)
    # a q/k dim scores only if alive on both sides; with q/k norms it also weighs in the
    # norms unless dead on both sides
    both = (lambda a, b: a | b) if S.qk_norm else (lambda a, b: a & b)
    if S.rope:
        half = d // 2
        q_pair = q_rows[..., :half] | q_rows[..., half:]  # (G, gs, half)
        k_pair = k_rows[:, :half] | k_rows[:, half:]  # (G, half)
        pair_alive = both(k_pair, q_pair.any(1))
        qk_alive = torch.cat([pair_alive, pair_alive], -1)  # (G, d)
    else:
        qk_alive = both(k_rows, q_rows.any(1))  # (G, d)

    kept = vo_alive.any(1).nonzero().flatten().tolist()
    n_vo = max((int(vo_alive[g].sum()) for g in kept), default=0)
    n_qk = max((int(qk_alive[g].sum()) for g in kept), default=0)
    if equal_head_dims and n_qk and n_vo and n_qk != n_vo:
        # The pruned model keeps dead dims up to one width (core.prune_build); counting
        # that here keeps the measured fraction equal to what pruning removes.
        n_qk = n_vo = uniform_width(n_qk, n_vo, d, S.rope)

    ffn = _masks(model, ls.ffn_out)[1].clone()
    for n in ls.ffn_in:
        ffn &= _masks(model, n)[0]
    assert H == G * gs
    return LayerPlan(
        index=ls.index,
        heads_kept=[g * gs + i for g in kept for i in range(gs)],
        kv_heads_kept=kept,
        qk_dims=[pad_dims(_where(qk_alive[g]), n_qk, d, S.rope) for g in kept],
        vo_dims=[pad_dims(_where(vo_alive[g]), n_vo, d) for g in kept],
        ffn_kept=ffn.nonzero().flatten().tolist(),
    )


def _shape_after(S: ModelStructure, lp: LayerPlan, kind: str, shape: tuple[int, ...]) -> int:
    out_f, in_f = shape
    n_kv = len(lp.kv_heads_kept)
    n_q = len(lp.heads_kept)
    n_qk = len(lp.qk_dims[0]) if lp.qk_dims else 0
    n_vo = len(lp.vo_dims[0]) if lp.vo_dims else 0
    n_ffn = len(lp.ffn_kept)
    if kind == "q":
        return n_q * n_qk * in_f
    if kind == "k":
        return n_kv * n_qk * in_f
    if kind == "v":
        return n_kv * n_vo * in_f
    if kind == "o":
        return out_f * n_q * n_vo
    if kind == "ffn_in":
        return n_ffn * in_f
    if kind == "ffn_out":
        return out_f * n_ffn
    raise AssertionError(kind)


def build_plan(
    model: nn.Module, structure: ModelStructure | None = None, equal_head_dims: bool = True
) -> PrunePlan:
    """The pruning plan from the eval gates (see the module docstring for the rules)."""
    S = structure or describe(model)
    gated = gated_modules(model)
    layers = [_layer_plan(model, S, ls, equal_head_dims) for ls in S.layers]
    before = after = paper = 0
    for lp, ls in zip(layers, S.layers, strict=True):
        for name, kind in ls.roles().items():
            gm = gated.get(name)
            if gm is None:
                continue
            shape = tuple(gm.base.weight.shape)
            before += shape[0] * shape[1]
            after += _shape_after(S, lp, kind, shape)
    in_roles = S.module_types()
    for name, gm in gated.items():
        with torch.no_grad():
            z_r, z_c = gm.eval_gates()
        paper += int((z_r > 0).sum()) * int((z_c > 0).sum())
        if name not in in_roles:  # gated outside the coupled groups: nothing is removed
            n = gm.base.weight.numel()
            before += n
            after += n
    return PrunePlan(
        family=S.family,
        layers=layers,
        gated_params_before=before,
        gated_params_after=after,
        paper_params_after=paper,
        num_heads=S.num_heads,
        num_kv_heads=S.num_kv_heads,
        head_dim=S.head_dim,
        intermediate_size=S.intermediate_size,
        rope=S.rope,
        gated=list(gated),
    )


def dense_plan(model: nn.Module) -> dict:
    """A plan (plain dict, PrunePlan's fields) that keeps everything: the 'dense'
    reference for latency, and the nothing-dead case."""
    S = describe(model)
    layers = []
    for ls in S.layers:
        groups = list(range(S.num_kv_heads))
        layers.append(
            {
                "index": ls.index,
                "heads_kept": list(range(S.num_heads)),
                "kv_heads_kept": groups,
                "qk_dims": [list(range(S.head_dim)) for _ in groups],
                "vo_dims": [list(range(S.head_dim)) for _ in groups],
                "ffn_kept": list(range(S.intermediate_size)),
            }
        )
    before = sum(
        cast(Tensor, model.get_submodule(name).weight).numel()
        for ls in S.layers
        for name in ls.roles()
    )
    return {
        "family": S.family,
        "layers": layers,
        "gated_params_before": before,
        "gated_params_after": before,
        "paper_params_after": before,
    }


def plan_field(plan: Any, name: str) -> Any:
    """A field of a PrunePlan / LayerPlan or of the same thing as a plain dict."""
    return plan[name] if isinstance(plan, dict) else getattr(plan, name)


def plan_to_dict(plan: Any) -> dict:
    """JSON-able dict of a PrunePlan or an already-dict plan."""
    if isinstance(plan, dict):
        return json.loads(json.dumps(plan))
    if isinstance(plan, PrunePlan):
        return json.loads(plan.to_json())
    if is_dataclass(plan) and not isinstance(plan, type):
        return asdict(plan)
    raise PlanError(f"plan: cannot serialise a {type(plan).__name__}")


def measured_sparsity(model: nn.Module, structure: ModelStructure | None = None) -> float:
    """Fraction of gated weight params pruning will physically remove (single source of truth)."""
    return build_plan(model, structure).removed_fraction()


@dataclass
class SparsityStats:
    measured_sparsity: float  # == build_plan(model).removed_fraction()
    by_type: dict[str, float]  # share of eval gates (rows+cols) exactly 0, per layer type
    removable_params: int  # gated weight params pruning removes
    gated_params: int
    paper_sparsity: float  # 1 - sum(rows_kept*cols_kept)/gated_params (the paper's count)

    def to_dict(self) -> dict:
        return asdict(self)


def sparsity_by_type(model: nn.Module, structure: ModelStructure | None = None) -> SparsityStats:
    """Eval-gate zero shares per layer type plus the measured (physical) numbers.

    Types are q, k, v, o, ffn_in, ffn_out for described families; for other gated modules
    the last name component (e.g. "dense").
    """
    S = structure
    if S is None and lookup(model) is not None:
        S = describe(model)
    types = S.module_types() if S is not None else {}
    zeros: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, gm in gated_modules(model).items():
        t = types.get(name, name.rsplit(".", 1)[-1])
        with torch.no_grad():
            z_r, z_c = gm.eval_gates()
        zeros[t] = zeros.get(t, 0) + int((z_r == 0).sum()) + int((z_c == 0).sum())
        total[t] = total.get(t, 0) + z_r.numel() + z_c.numel()
    by_type = {t: zeros[t] / total[t] for t in total}
    if S is not None:
        plan = build_plan(model, S)
        before, after, paper = (
            plan.gated_params_before,
            plan.gated_params_after,
            plan.paper_params_after,
        )
    else:
        before = after = sum(gm.base.weight.numel() for gm in gated_modules(model).values())
        paper = 0
        for gm in gated_modules(model).values():
            z_r, z_c = gm.eval_gates()
            paper += int((z_r > 0).sum()) * int((z_c > 0).sum())
    return SparsityStats(
        measured_sparsity=(1.0 - after / before) if before else 0.0,
        by_type=by_type,
        removable_params=before - after,
        gated_params=before,
        paper_sparsity=(1.0 - paper / before) if before else 0.0,
    )
