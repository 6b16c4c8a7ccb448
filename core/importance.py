"""Calibration pass and importance scores (method.md §2.7).

Before the first step, a few batches of the job's own training data run through the
model with no gradient. Hooks on every gated Linear accumulate, per input column j, the
count, sum and sum of squares of x_j over real (non-padding) tokens. From them:

- FLAP's fluctuation score of column j of a consumer W (o_proj, down_proj):
  ``var(x_j) * ||W[:, j]||_2^2`` -- how much the output moves when x_j moves around its
  mean (its mean can be folded into the bias, see compensation below);
- Wanda's score: ``||W[:, j]||_1 * rms(x_j)`` -- the output magnitude x_j carries.

A unit of the pruning plan is scored as the sum of its columns: a KV group (the o_proj
columns of its query heads; one head under MHA), an FFN neuron (its column of down_proj).

``init_gates_from_scores`` turns scores into a starting point: scores are standardised
within each layer (FLAP's per-layer standardisation, so layers compare) and ranked
globally per unit kind; the lowest ``share`` become the candidates. Every line of a
candidate (KV group: its q/k/v rows and o columns; neuron: its up/gate rows and down column)
starts just inside the unsaturated region of the gate (logit 0.55 - scale * r, r in
(0, 1] growing toward the least important), so the task gradient reaches it from step 0
and the focused sparsity push (core.objective) works on it first. Every other gate keeps
its saturated open start and is untouched by the task until it becomes a candidate.

``set_compensation`` stores each consumer column's calibration mean in the layer
(GatedLinear.comp_mean): closed columns then contribute W[:, j] * mean_j through the bias,
in training and in the pruned model alike (FLAP's bias compensation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.gates import GatedLinear, gated_modules
from core.structure import ModelStructure

IMPORTANCE_METHODS: tuple[str, ...] = ("flap", "wanda", "none")
_OPEN_EDGE = 0.549  # tanh(0.549) + 0.5 = 1.0: the gate's saturation boundary


@dataclass
class ColumnStats:
    """Per-input-column statistics of one Linear over the calibration tokens."""

    count: int
    mean: Tensor  # (in,)
    var: Tensor  # (in,)
    sq_mean: Tensor  # (in,) E[x^2]


class _Acc:
    def __init__(self, n: int):
        self.n = 0
        self.s = torch.zeros(n, dtype=torch.float64)
        self.s2 = torch.zeros(n, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.s2 += (x * x).sum(0)

    def stats(self) -> ColumnStats:
        n = max(1, self.n)
        mean = self.s / n
        sq = self.s2 / n
        var = (sq - mean * mean).clamp_min(0.0)
        return ColumnStats(self.n, mean.float(), var.float(), sq.float())


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], names: Iterable[str] | None = None
) -> dict[str, ColumnStats]:
    """Run ``batches`` through the model (eval mode, no grad) and gather input statistics
    of the named gated Linears (all of them by default). Padding tokens are left out when
    the batch has an attention_mask of the input's leading shape."""
    gms = gated_modules(model)
    wanted = list(gms) if names is None else [n for n in names if n in gms]
    accs = {n: _Acc(gms[n].in_features) for n in wanted}
    mask_now: dict[str, Tensor | None] = {"m": None}
    handles = []

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            m = mask_now["m"]
            if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
                x = x[m.bool()]
            accs[name].add(x)

        return fn

    for n in wanted:
        handles.append(gms[n].register_forward_pre_hook(hook(n)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask_now["m"] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: a.stats() for n, a in accs.items()}


def column_scores(w: Tensor, st: ColumnStats, method: str) -> Tensor:
    """Per input column of W (out, in): FLAP fluctuation or Wanda magnitude."""
    w = w.detach().float().cpu()
    if method == "flap":
        return st.var * (w * w).sum(0)
    if method == "wanda":
        return w.abs().sum(0) * st.sq_mean.sqrt()
    raise ConfigError(
        "importance_init", f"must be one of {list(IMPORTANCE_METHODS)}, got {method!r}"
    )


@dataclass
class UnitScores:
    """Scores of the plan's units, per layer: KV groups (num_kv_heads,; a head under MHA)
    and FFN neurons (intermediate,)."""

    heads: list[Tensor]
    neurons: list[Tensor]


def unit_scores(
    model: nn.Module, S: ModelStructure, stats: Mapping[str, ColumnStats], method: str
) -> UnitScores:
    """KV group = sum of its query heads' o_proj column scores; neuron = its down_proj
    column score. A layer whose consumer is not gated gets no candidates (all +inf)."""
    heads: list[Tensor] = []
    neurons: list[Tensor] = []
    for ls in S.layers:
        o = model.get_submodule(ls.o)
        if ls.o in stats and isinstance(o, GatedLinear):
            sc = column_scores(o.base.weight, stats[ls.o], method)
            heads.append(sc.view(S.num_kv_heads, S.group_size * S.head_dim).sum(1))
        else:
            heads.append(torch.full((S.num_kv_heads,), float("inf")))
        down = model.get_submodule(ls.ffn_out)
        if ls.ffn_out in stats and isinstance(down, GatedLinear):
            neurons.append(column_scores(down.base.weight, stats[ls.ffn_out], method))
        else:
            neurons.append(torch.full((S.intermediate_size,), float("inf")))
    return UnitScores(heads, neurons)


def standardized(per_layer: list[Tensor]) -> list[Tensor]:
    """(s - mean) / std within each layer (FLAP); +inf (ungated) stays +inf."""
    out = []
    for s in per_layer:
        fin = torch.isfinite(s)
        z = torch.full_like(s, float("inf"))
        if int(fin.sum()) >= 2:
            v = s[fin]
            z[fin] = (v - v.mean()) / v.std().clamp_min(1e-12)
        elif int(fin.sum()) == 1:
            z[fin] = 0.0
        out.append(z)
    return out


def candidate_ranks(per_layer: list[Tensor], share: float) -> list[Tensor]:
    """Global ranking over layers: r in (0, 1] for the lowest ``share`` (1 = least
    important), 0 elsewhere. Ties are broken by position, deterministically."""
    flat = torch.cat(per_layer)
    n = int(torch.isfinite(flat).sum())
    k = min(n, int(round(share * n)))
    r = torch.zeros_like(flat)
    if k > 0:
        order = torch.argsort(flat, stable=True)[:k]
        r[order] = torch.linspace(1.0, 1.0 / k, k)
    return list(r.split([t.numel() for t in per_layer]))


def _set(gm: nn.Module, side: str, idx: Tensor, values: Tensor) -> None:
    if not isinstance(gm, GatedLinear) or idx.numel() == 0:
        return
    logits = gm.row_logits if side == "row" else gm.col_logits
    logits[idx.to(logits.device)] = values.to(device=logits.device, dtype=logits.dtype)


@torch.no_grad()
def init_gates_from_scores(
    model: nn.Module, S: ModelStructure, scores: UnitScores, share: float, scale: float
) -> dict[str, int]:
    """Start the candidates' gates at 0.55 - scale * r (see the module docstring).

    Returns how many heads and neurons became candidates.
    """
    share = min(1.0, max(0.0, float(share)))
    h_rank = candidate_ranks(standardized(scores.heads), share)
    n_rank = candidate_ranks(standardized(scores.neurons), share)
    gms = gated_modules(model)
    d, gs = S.head_dim, S.group_size
    n_heads = n_neurons = 0
    for ls, hr, nr in zip(S.layers, h_rank, n_rank, strict=True):
        cand = (hr > 0).nonzero().squeeze(1)  # candidate KV groups
        n_heads += int(cand.numel()) * gs
        for g in cand.tolist():
            val = torch.tensor(_OPEN_EDGE - scale * float(hr[g]))
            kv = torch.arange(g * d, (g + 1) * d)
            q = torch.arange(g * gs * d, (g + 1) * gs * d)
            _set(gms.get(ls.o, nn.Identity()), "col", q, val.expand(q.numel()))
            _set(gms.get(ls.q, nn.Identity()), "row", q, val.expand(q.numel()))
            _set(gms.get(ls.k, nn.Identity()), "row", kv, val.expand(d))
            _set(gms.get(ls.v, nn.Identity()), "row", kv, val.expand(d))
        cand_n = (nr > 0).nonzero().squeeze(1)
        n_neurons += int(cand_n.numel())
        val_n = _OPEN_EDGE - scale * nr[cand_n]
        _set(gms.get(ls.ffn_out, nn.Identity()), "col", cand_n, val_n)
        for name in ls.ffn_in:
            _set(gms.get(name, nn.Identity()), "row", cand_n, val_n)
    return {"heads": n_heads, "neurons": n_neurons}


@torch.no_grad()
def set_compensation(
    model: nn.Module, S: ModelStructure, stats: Mapping[str, ColumnStats]
) -> list[str]:
    """Give every gated consumer (o_proj, down_proj) its calibration means; returns names."""
    gms = gated_modules(model)
    done = []
    for ls in S.layers:
        for name in (ls.o, ls.ffn_out):
            gm = gms.get(name)
            if gm is None or name not in stats:
                continue
            gm.comp_mean = stats[name].mean.to(gm.base.weight.device, torch.float32)
            done.append(name)
    return done


def load_compensation(model: nn.Module, means: Mapping[str, Tensor]) -> None:
    """Put saved calibration means back (load_gated_run)."""
    gms = gated_modules(model)
    for name, mean in means.items():
        if name not in gms:
            raise ConfigError("compensation", f"saved means for {name!r}, which is not gated")
        gm = gms[name]
        if mean.shape != (gm.in_features,):
            raise ConfigError("compensation", f"{name}: means of shape {tuple(mean.shape)}")
        gm.comp_mean = mean.to(gm.base.weight.device, torch.float32)


def compensation_state(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: g.comp_mean.cpu() for n, g in gated_modules(model).items() if g.comp_mean is not None
    }
