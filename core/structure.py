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
- Uniform per layer: every kept group of a layer keeps the SAME number of q/k dims (the
  max over kept groups) and of v/o dims, so the pruned layer runs one SDPA call. Groups
  with fewer live dims get dead dims (lowest indices first; whole pairs under RoPE) added
  back. Their folded weights are exactly zero, so outputs do not change. What is listed in
  the plan is exactly what is physically kept.
- Residual-side gates (columns of q/k/v/ffn_in, rows of o/ffn_out) are never removed;
  they are folded as zeros and do not count as removed parameters.

`measured_sparsity(model)` is `build_plan(model).removed_fraction()`: the one number the
training loop reports and pruning removes. `expected_removed_fraction(model)` is the
differentiable counterpart, built from the same formulas on gate "open probabilities"; it
equals the measured value exactly when the gates are saturated at 0/1.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from core.errors import PlanError, UnsupportedModelError
from core.gates import GatedLinear, gated_modules, model_family

_LAYER_PATTERNS = {
    "bert": re.compile(r"(?P<prefix>(.*\.)?layer\.)(?P<idx>\d+)\.attention\.self\.query"),
    "llama": re.compile(r"(?P<prefix>(.*\.)?layers\.)(?P<idx>\d+)\.self_attn\.q_proj"),
}
_ROLE_SUFFIXES: dict[str, dict[str, Any]] = {  # role -> suffix (str), or list for ffn_in
    "bert": {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ffn_in": ["intermediate.dense"],
        "ffn_out": "output.dense",
    },
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "ffn_in": ["mlp.gate_proj", "mlp.up_proj"],
        "ffn_out": "mlp.down_proj",
    },
}
LAYER_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclass
class LayerStructure:
    index: int
    q: str
    k: str
    v: str
    o: str
    ffn_in: list[str]  # bert: [intermediate]; llama: [gate_proj, up_proj]
    ffn_out: str

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

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def module_types(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ls in self.layers:
            out.update(ls.roles())
        return out


def describe(model: nn.Module) -> ModelStructure:
    """Find the per-layer projections of a BERT/RoBERTa encoder or a Llama-style decoder."""
    fam = model_family(model)
    cfg = getattr(model, "config", None)
    if fam is None or cfg is None:
        mt = getattr(cfg, "model_type", None)
        raise UnsupportedModelError(
            f"cannot describe model_type {mt!r}: supported families are BERT/RoBERTa "
            "(bert, roberta, xlm-roberta, camembert, electra) and Llama-style (llama, "
            "mistral, qwen2)"
        )
    modules = dict(model.named_modules())
    prefixes: dict[int, str] = {}
    for name in modules:
        m = _LAYER_PATTERNS[fam].fullmatch(name)
        if m:
            prefixes[int(m.group("idx"))] = m.group("prefix") + m.group("idx") + "."
    if not prefixes:
        raise UnsupportedModelError(f"no transformer layers found in this {fam} model")
    roles = _ROLE_SUFFIXES[fam]
    layers = []
    for idx in sorted(prefixes):
        p = prefixes[idx]
        names = {
            "q": p + roles["q"],
            "k": p + roles["k"],
            "v": p + roles["v"],
            "o": p + roles["o"],
            "ffn_out": p + roles["ffn_out"],
        }
        ffn_in = [p + s for s in roles["ffn_in"]]
        for n in [*names.values(), *ffn_in]:
            if not isinstance(modules.get(n), nn.Linear | GatedLinear):
                raise UnsupportedModelError(f"layer {idx}: expected a Linear at {n!r}")
        layers.append(LayerStructure(index=idx, ffn_in=ffn_in, **names))
    num_heads = int(cfg.num_attention_heads)
    num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    if num_heads % num_kv:
        raise UnsupportedModelError(f"num_attention_heads {num_heads} % kv heads {num_kv} != 0")
    return ModelStructure(
        family=fam,
        model_type=cfg.model_type,
        hidden_size=int(cfg.hidden_size),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=int(head_dim),
        intermediate_size=int(cfg.intermediate_size),
        rope=fam == "llama",
        layers=layers,
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

    def validate(self, structure: ModelStructure) -> None:
        """Check the plan fits `structure` before any tensor is changed; raises PlanError."""
        S = structure
        if self.family != S.family:
            raise PlanError(f"plan family {self.family!r} != model family {S.family!r}")
        if len(self.layers) != len(S.layers):
            raise PlanError(f"plan has {len(self.layers)} layers, model has {len(S.layers)}")
        gs, d, half = S.group_size, S.head_dim, S.head_dim // 2

        def check_idx(where: str, idx: list[int], n: int) -> None:
            if any(not isinstance(i, int) for i in idx):
                raise PlanError(f"{where}: indices must be integers")
            if idx != sorted(set(idx)):
                raise PlanError(f"{where}: indices must be sorted and unique")
            if idx and (idx[0] < 0 or idx[-1] >= n):
                raise PlanError(f"{where}: index out of range [0, {n})")

        for lp, ls in zip(self.layers, S.layers, strict=True):
            w = f"layer {ls.index}"
            if lp.index != ls.index:
                raise PlanError(f"{w}: plan layer index {lp.index} != {ls.index}")
            check_idx(f"{w} kv_heads_kept", lp.kv_heads_kept, S.num_kv_heads)
            check_idx(f"{w} heads_kept", lp.heads_kept, S.num_heads)
            want = [g * gs + i for g in lp.kv_heads_kept for i in range(gs)]
            if lp.heads_kept != want:
                raise PlanError(f"{w}: heads_kept must be whole KV groups {want}")
            for key, dims in (("qk_dims", lp.qk_dims), ("vo_dims", lp.vo_dims)):
                if len(dims) != len(lp.kv_heads_kept):
                    raise PlanError(f"{w} {key}: one list per kept KV group expected")
                if len({len(x) for x in dims}) > 1:
                    raise PlanError(f"{w} {key}: counts must be uniform within the layer")
                for g, x in zip(lp.kv_heads_kept, dims, strict=True):
                    check_idx(f"{w} {key}[group {g}]", x, d)
                    if key == "qk_dims" and S.rope:
                        xs = set(x)
                        if any((i + half if i < half else i - half) not in xs for i in x):
                            raise PlanError(f"{w} qk_dims[group {g}]: RoPE pairs split")
                if key == "vo_dims" and any(len(x) == 0 for x in dims):
                    raise PlanError(f"{w} vo_dims: a kept group needs at least one v/o dim")
            check_idx(f"{w} ffn_kept", lp.ffn_kept, S.intermediate_size)


def _masks(model: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """(row_alive, col_alive) bool masks from eval gates; all-True for ungated Linears."""
    m = model.get_submodule(name)
    if isinstance(m, GatedLinear):
        with torch.no_grad():
            z_r, z_c = m.eval_gates()
        return (z_r > 0).cpu(), (z_c > 0).cpu()
    out_f, in_f = cast(Tensor, m.weight).shape
    return torch.ones(out_f, dtype=torch.bool), torch.ones(in_f, dtype=torch.bool)


def _pad(alive: Tensor, count: int, pair: bool) -> list[int]:
    """Live dims plus the lowest dead ones until `count` (whole pairs under RoPE)."""
    idx = alive.nonzero().flatten().tolist()
    if len(idx) >= count:
        return idx
    if pair:
        half = alive.numel() // 2
        live_pairs = set(alive[:half].nonzero().flatten().tolist())
        extra = [p for p in range(half) if p not in live_pairs]
        pairs = sorted(live_pairs | set(extra[: (count - len(idx)) // 2]))
        return sorted(pairs + [p + half for p in pairs])
    dead = (~alive).nonzero().flatten().tolist()
    return sorted(idx + dead[: count - len(idx)])


def _layer_plan(
    model: nn.Module, S: ModelStructure, ls: LayerStructure, equal_head_dims: bool = True
) -> LayerPlan:
    H, G, d, gs = S.num_heads, S.num_kv_heads, S.head_dim, S.group_size
    q_rows = _masks(model, ls.q)[0].view(G, gs, d)
    k_rows = _masks(model, ls.k)[0].view(G, d)
    v_rows = _masks(model, ls.v)[0].view(G, d)
    o_cols = _masks(model, ls.o)[1].view(G, gs, d)

    vo_alive = v_rows & o_cols.any(1)  # (G, d)
    if S.rope:
        half = d // 2
        q_pair = q_rows[..., :half] | q_rows[..., half:]  # (G, gs, half)
        k_pair = k_rows[:, :half] | k_rows[:, half:]  # (G, half)
        pair_alive = k_pair & q_pair.any(1)
        qk_alive = torch.cat([pair_alive, pair_alive], -1)  # (G, d)
    else:
        qk_alive = k_rows & q_rows.any(1)  # (G, d)

    kept = vo_alive.any(1).nonzero().flatten().tolist()
    n_vo = max((int(vo_alive[g].sum()) for g in kept), default=0)
    n_qk = max((int(qk_alive[g].sum()) for g in kept), default=0)
    if equal_head_dims and n_qk and n_vo and n_qk != n_vo:
        # One width for q/k and v/o: CPU SDPA's fused kernel needs equal head dims, so the
        # pruned model keeps dead dims up to it (core/prune.py). Counting that here keeps
        # the measured fraction equal to what pruning physically removes.
        n_eq = max(n_qk, n_vo)
        if S.rope and n_eq % 2:
            n_eq += 1  # q/k grow by whole RoPE pairs
        n_qk = n_vo = min(n_eq, d)

    ffn = _masks(model, ls.ffn_out)[1].clone()
    for n in ls.ffn_in:
        ffn &= _masks(model, n)[0]
    assert H == G * gs
    return LayerPlan(
        index=ls.index,
        heads_kept=[g * gs + i for g in kept for i in range(gs)],
        kv_heads_kept=kept,
        qk_dims=[_pad(qk_alive[g], n_qk, S.rope) for g in kept],
        vo_dims=[_pad(vo_alive[g], n_vo, False) for g in kept],
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
    if S is None and model_family(model) is not None:
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


# ---------------------------------------------------------------------------------------
# Differentiable expectation (what the calibrated objective steers)


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
        mu_c = torch.tanh(_BandGrad.apply(m.col_logits, -_BAND, _BAND))
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
        vo = v * (1 - torch.prod(1 - o, dim=1))  # (G, d)
        if S.rope:
            half = d // 2
            qp = 1 - (1 - q[..., :half]) * (1 - q[..., half:])  # (G, gs, half)
            kp = 1 - (1 - k[:, :half]) * (1 - k[:, half:])
            pair = kp * (1 - torch.prod(1 - qp, dim=1))  # (G, half)
            qk_count = 2 * pair.sum(-1)  # (G,)
        else:
            qk_count = (k * (1 - torch.prod(1 - q, dim=1))).sum(-1)
        group = 1 - torch.prod(1 - vo, dim=1)  # (G,) P(group kept)
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
