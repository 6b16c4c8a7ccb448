"""Row/column gates around existing nn.Linear layers (method.md §1).

A GatedLinear wraps the model's own nn.Linear (no copy) and adds two logit vectors:
theta_r (one per output row) and theta_c (one per input column). The layer computes

    y = ((x * z_c) @ (W + s * B A)^T + b) * z_r

where z = clamp(tanh(theta) + eps + 0.5, 0, 1) in training (eps ~ N(0, sigma^2), ONE noise
vector per gate vector per forward, shared across the batch and tokens) and
z = clamp(tanh(theta) + 0.5, 0, 1) in eval. The row gate comes after the bias so that a
closed row outputs exactly 0; that is what makes the coupled groups of method.md §3
removable. LoRA (``gates+lora``) sits inside the gates with B initialised to zero, so
injecting never changes the model's eval outputs beyond the gates themselves.

Without LoRA the forward runs through a hand-written autograd Function (_GatedLinearFn)
that folds the gates into the weight and saves only x and the output for backward;
FUSED_AUTOGRAD = False selects plain autograd (the reference the tests compare against).

Like PEFT layers, GatedLinear declares the names of the state it owns
(``adapter_layer_names``) so generic code can freeze, save and delete it.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from core.errors import ConfigError, UnsupportedModelError
from core.families import LAYOUTS, lookup, supported_text

# Regexes are matched against the full module name (re.fullmatch); one list per layout of
# the family table (core.families), so a model type and its default targets never diverge.
DEFAULT_TARGETS: dict[str, list[str]] = {n: lay.default_targets() for n, lay in LAYOUTS.items()}

# Module-name components that are never gated by injection (task heads, pooler, lm_head).
HEAD_MODULE_NAMES: tuple[str, ...] = ("classifier", "pre_classifier", "score", "qa_outputs")
NEVER_GATED: frozenset[str] = frozenset({"lm_head", "pooler", "cls", *HEAD_MODULE_NAMES})

_REGEX_CHARS = set("\\^$*+?[](){}|")


@dataclass
class GateConfig:
    """Construction arguments of the gates (saved with checkpoints as JSON)."""

    init_mean: float = 1.0  # theta ~ N(init_mean, init_std^2); tanh(1)+.5 > 1: starts open
    init_std: float = 0.1
    noise_std: float = 0.1  # sigma of the training noise
    lora_rank: int = 0  # > 0 adds LoRA A/B inside the gates (needed by "gates+lora")
    lora_alpha: float | None = None  # scale = alpha / rank; None means scale 1
    seed: int | None = None  # seeds gate init (None: use the global RNG)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> GateConfig:
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _phi(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


# Module switch for the fused autograd path (tests flip it to compare against the plain
# autograd reference). The fused path is used whenever LoRA is off.
FUSED_AUTOGRAD: bool = True


def _gate_math_dtype(weight: Tensor, gate: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 weights with fp32 gates; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(weight.dtype, gate.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype F.linear will run in (the autocast dtype when autocast is on)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _GatedLinearFn(torch.autograd.Function):
    """y = F.linear(x * z_c, W, b) * z_r, saving only what the backward needs.

    Why: plain autograd over the three ops keeps x * z_c (and its low-precision cast under
    autocast) and the pre-gate output y0 alive for every gated Linear, on top of the
    activations the model keeps anyway. Here the gates are folded into the weight
    (diag(z_r) W diag(z_c), an (out, in) elementwise op, cheaper than the (tokens, in) and
    (tokens, out) ones it replaces) and the backward saves only x, the OUTPUT y, W, b and
    the gate vectors. x and y are usually kept by the neighbouring ops anyway (the previous
    LayerNorm/GELU output, the next GELU/attention input), so they share storage.

    grad_z_r needs y0 = y / z_r, which is unknown where z_r == 0. torch's clamp passes the
    gradient at the boundary (clamp(u, 0, 1) has d/du = 1 at u == 0 exactly), so a row
    with z_r == 0 needs its real grad_z_r when u_r == 0; those rows (measure zero in
    practice) are recomputed from x. ``row_dead`` marks rows whose clamp input is < 0
    strictly: the clamp discards their gradient, so they are skipped (returned as 0).
    With row_dead None every z_r == 0 row is recomputed (exact for any caller).

    Not used under float16: y = y0 * z_r can underflow there for small z_r (z_r can be as
    small as ~3e-8), so y / z_r would not recover y0; bf16 has fp32's exponent range.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        z_r: Tensor,
        z_c: Tensor,
        row_dead: Tensor | None,
    ) -> Tensor:
        md = _gate_math_dtype(weight, z_r)
        zr, zc = z_r.to(md), z_c.to(md)
        wf = (weight.to(md) * zr[:, None] * zc).to(weight.dtype)
        bf = None if bias is None else (bias.to(md) * zr).to(bias.dtype)
        y = F.linear(x, wf, bf)  # autocast (if on) casts x / wf / bf as it would for Linear
        _, n_w, _, n_zr, n_zc, _ = ctx.needs_input_grad
        keep_x = n_w or n_zr or n_zc
        ctx.save_for_backward(
            x if keep_x else None,
            y if n_zr else None,
            weight,
            bias,
            z_r,
            z_c,
            row_dead,
        )
        ctx.compute_dtype = y.dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, y, weight, bias, z_r, z_c, row_dead = ctx.saved_tensors
        n_x, n_w, n_b, n_zr, n_zc, _ = ctx.needs_input_grad
        cd, xd = ctx.compute_dtype, ctx.x_dtype
        md = _gate_math_dtype(weight, z_r)
        out_f, in_f = weight.shape
        zr, zc = z_r.to(md), z_c.to(md)
        g2 = grad_y.reshape(-1, out_f).to(cd)
        x2 = None if x is None else x.reshape(-1, in_f)
        grad_x = grad_w = grad_b = grad_zr = grad_zc = None
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            if n_x or n_zc:
                # d loss / d(x * z_c), in the compute dtype, then in x's dtype (as the
                # autocast cast's backward would give it)
                gxc = (g2 @ (weight.to(md) * zr[:, None]).to(cd)).to(xd)
                if n_zc:
                    grad_zc = (gxc * x2).sum(0, dtype=md).to(z_c.dtype)
                if n_x:
                    grad_x = gxc.mul_(z_c.to(xd)).reshape(ctx.x_shape)
            if n_b and bias is not None:
                grad_b = (g2.sum(0, dtype=md) * zr).to(bias.dtype)
            if n_w:
                assert x2 is not None  # x is saved whenever a weight/gate grad is needed
                gw = g2.t() @ x2.to(cd)  # (out, in) = grad_y^T x; gates applied below
                grad_w = (gw.to(md) * zr[:, None] * zc).to(weight.dtype)
            if n_zr:
                # sum_n grad_y * y = z_r * sum_n grad_y * y0
                s = (g2 * y.reshape(-1, out_f)).sum(0, dtype=md)
                open_ = zr > 0
                grad_zr = torch.where(open_, s / torch.where(open_, zr, 1.0), 0.0)
                fix = ~open_ if row_dead is None else (~open_ & ~row_dead)
                rows = fix.nonzero().squeeze(1)
                if rows.numel():
                    w_rows = (weight[rows].to(md) * zc).to(cd)
                    b_rows = None if bias is None else bias[rows].to(cd)
                    assert x2 is not None
                    y0 = F.linear(x2.to(cd), w_rows, b_rows)
                    grad_zr[rows] = (g2[:, rows] * y0).sum(0, dtype=md)
                grad_zr = grad_zr.to(z_r.dtype)
        return grad_x, grad_w, grad_b, grad_zr, grad_zc, None


class GatedLinear(nn.Module):
    """An nn.Linear with learned row and column gates (and optional LoRA inside them)."""

    adapter_layer_names: tuple[str, ...] = ("row_logits", "col_logits", "lora_A", "lora_B")
    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None
    input_mean: Tensor | None  # registered buffer, filled while record_input_mean is on
    comp_mean: Tensor | None  # registered buffer, set by core.importance.set_compensation
    gates_last: tuple[Tensor, Tensor]  # (z_r, z_c) of the last gated forward

    def __init__(
        self,
        base: nn.Linear,
        cfg: GateConfig | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        cfg = cfg or GateConfig()
        self.base = base
        self.noise_std = float(cfg.noise_std)
        out_f, in_f = base.weight.shape
        dev = base.weight.device
        # Gates stay fp32 whatever the base dtype: tanh/clamp near +-0.5 needs precision.
        row = torch.empty(out_f, dtype=torch.float32)
        col = torch.empty(in_f, dtype=torch.float32)
        row.normal_(cfg.init_mean, cfg.init_std, generator=generator)
        col.normal_(cfg.init_mean, cfg.init_std, generator=generator)
        self.row_logits = nn.Parameter(row.to(dev))
        self.col_logits = nn.Parameter(col.to(dev))
        self.lora_rank = int(cfg.lora_rank)
        if self.lora_rank > 0:
            a = torch.empty(self.lora_rank, in_f, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A = nn.Parameter(a.to(device=dev, dtype=base.weight.dtype))
            self.lora_B = nn.Parameter(
                torch.zeros(out_f, self.lora_rank, device=dev, dtype=base.weight.dtype)
            )
            alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(self.lora_rank)
            self.lora_scale = float(alpha) / self.lora_rank
        else:
            self.lora_A = None
            self.lora_B = None
            self.lora_scale = 0.0
        # Kurtosis objective support: mean input of the last training forward (no grad).
        self.record_input_mean = False
        self.register_buffer("input_mean", None, persistent=False)
        # Head gates (method.md §1.5): col_group > 1 ties each run of col_group columns to
        # one gate (the mean of their logits; the entries stay equal because they start
        # equal and always receive equal gradients). Set by core.train_setup.
        self.col_group = 1
        # Teacher forward (method.md §2.8): every gate reads 1 and nothing is compensated.
        self.force_open = False
        # Compensation (method.md §2.9): the calibration mean of each input column; a
        # closed (or partly closed) column contributes W[:, j] * (1 - z_c[j]) * mean[j]
        # through the bias instead of vanishing. None: no compensation.
        self.register_buffer("comp_mean", None, persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # some HF code reads `.weight` (dtype / device probes)
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    # -- gates -------------------------------------------------------------------------
    def col_theta(self) -> Tensor:
        """The column logits as the gates see them: tied per group when col_group > 1."""
        g = self.col_group
        if g <= 1:
            return self.col_logits
        return self.col_logits.view(-1, g).mean(1).repeat_interleave(g)

    def _gate_preacts(self, training: bool | None = None) -> tuple[Tensor, Tensor]:
        """Unclamped u = tanh(theta) (+ eps) + 0.5; the gates are clamp(u, 0, 1)."""
        training = self.training if training is None else training
        mu_r = torch.tanh(self.row_logits)
        mu_c = torch.tanh(self.col_theta())
        if training and self.noise_std > 0:
            mu_r = mu_r + torch.randn_like(mu_r) * self.noise_std
            g = self.col_group
            n_c = mu_c.numel() // g
            eps_c = torch.randn(n_c, device=mu_c.device, dtype=mu_c.dtype) * self.noise_std
            mu_c = mu_c + (eps_c if g <= 1 else eps_c.repeat_interleave(g))
        return mu_r + 0.5, mu_c + 0.5

    def gates(self, training: bool | None = None) -> tuple[Tensor, Tensor]:
        """(z_r, z_c). Training gates draw one noise vector each, shared by the batch."""
        u_r, u_c = self._gate_preacts(training)
        return u_r.clamp(0.0, 1.0), u_c.clamp(0.0, 1.0)

    def eval_gates(self) -> tuple[Tensor, Tensor]:
        """Deterministic gates; exactly 0 iff tanh(theta) <= -0.5."""
        return self.gates(training=False)

    def keep_probs(self, sigma_p: float = 0.5) -> tuple[Tensor, Tensor]:
        """Phi((mu + 0.5) / sigma_p): the Gaussian L0 relaxation, in (0.159, 0.9987)."""
        mu_r = torch.tanh(self.row_logits)
        mu_c = torch.tanh(self.col_theta())
        return _phi((mu_r + 0.5) / sigma_p), _phi((mu_c + 0.5) / sigma_p)

    def open_probs(self, min_sigma: float = 1e-3) -> tuple[Tensor, Tensor]:
        """P(training gate > 0) = Phi((mu + .5) / sigma_noise): ~0 for closed gates.

        Unlike keep_probs this goes to 0/1 as gates saturate, so sums of it estimate what
        build_plan will count (used by the calibrated objective).
        """
        s = max(self.noise_std, min_sigma)
        mu_r = torch.tanh(self.row_logits)
        mu_c = torch.tanh(self.col_theta())
        return _phi((mu_r + 0.5) / s), _phi((mu_c + 0.5) / s)

    # -- forward -------------------------------------------------------------------------
    def _weight(self) -> Tensor:
        w = self.base.weight
        if self.lora_A is not None:  # lora_B is set exactly when lora_A is
            w = w + self.lora_scale * (cast(Tensor, self.lora_B) @ self.lora_A).to(w.dtype)
        return w

    def _compensation(self, z_r: Tensor, z_c: Tensor, dtype: torch.dtype) -> Tensor | None:
        """z_r * (W @ ((1 - z_c) * mean)): what the closed part of each column contributed."""
        if self.comp_mean is None:
            return None
        w = self._weight()
        missing = ((1.0 - z_c) * self.comp_mean.to(z_c.dtype)).to(w.dtype)
        return (z_r * F.linear(missing, w).to(z_r.dtype)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.record_input_mean and self.training:
            with torch.no_grad():
                self.input_mean = x.detach().float().reshape(-1, x.shape[-1]).mean(0)
        if self.force_open:
            return F.linear(x, self._weight().to(x.dtype), self.base.bias)
        y = self._gated_forward(x)
        if self.comp_mean is not None:
            z_r, z_c = self.gates_last
            comp = self._compensation(z_r, z_c, y.dtype)
            assert comp is not None
            y = y + comp
        return y

    def _gated_forward(self, x: Tensor) -> Tensor:
        if FUSED_AUTOGRAD and _compute_dtype(x) != torch.float16:
            u_r, u_c = self._gate_preacts()
            z_r, z_c = u_r.clamp(0.0, 1.0), u_c.clamp(0.0, 1.0)
            self.gates_last = (z_r, z_c)
            # Rows with u_r < 0 strictly get zero gradient from the clamp, so the fused
            # backward may skip recovering their pre-gate output (see _GatedLinearFn).
            row_dead = (u_r < 0).detach()
            y = _GatedLinearFn.apply(x, self.base.weight, self.base.bias, z_r, z_c, row_dead)
            if self.lora_A is not None:
                # z_r * (s B A (z_c * x)) == (s z_r B)(A z_c) x: fold the gates into the
                # factors, so this branch saves only x (already saved above) and the
                # rank-r activation instead of two full-width copies.
                a = self.lora_A * z_c.to(self.lora_A.dtype)
                b = (
                    cast(Tensor, self.lora_B)
                    * (self.lora_scale * z_r).to(self.lora_A.dtype)[:, None]
                )
                y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(y.dtype)
            return y
        z_r, z_c = self.gates()
        self.gates_last = (z_r, z_c)
        xc = x * z_c.to(x.dtype)  # (..., in)
        y = F.linear(xc, self.base.weight, self.base.bias)  # (..., out)
        if self.lora_A is not None:  # lora_B is set exactly when lora_A is
            lora_B = cast(Tensor, self.lora_B)
            y = y + self.lora_scale * F.linear(F.linear(xc, self.lora_A), lora_B)
        return y * z_r.to(y.dtype)

    # -- folding ---------------------------------------------------------------------------
    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """diag(z_r) (W + sBA) diag(z_c) and z_r * b with EVAL gates; bias stays None if absent."""
        z_r, z_c = self.eval_gates()
        w = self._weight()
        wf = (z_r[:, None] * w.float() * z_c[None, :]).to(w.dtype)
        b = self.base.bias
        bf = None if b is None else (z_r * b.float()).to(b.dtype)
        comp = self._compensation(z_r, z_c, torch.float32)
        if comp is not None:
            bf = (comp if bf is None else bf.float() + comp).to(w.dtype)
        return wf, bf

    def to_linear(self, fold: bool = True) -> nn.Linear:
        """fold=True: a new Linear with the folded eval weights; fold=False: the original base."""
        if not fold:
            return self.base
        wf, bf = self.folded_weight_and_bias()
        lin = nn.Linear(  # a compensated layer may gain a bias it did not have
            self.in_features,
            self.out_features,
            bias=bf is not None,
            device=wf.device,
            dtype=wf.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(wf)
            if bf is not None:
                lin.bias.copy_(bf)
        lin.weight.requires_grad_(self.base.weight.requires_grad)
        if bf is not None:
            b = self.base.bias
            lin.bias.requires_grad_(b.requires_grad if b is not None else False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.base.bias is not None}, "
            f"noise_std={self.noise_std}, lora_rank={self.lora_rank}, col_group={self.col_group}, "
            f"compensated={self.comp_mean is not None}"
        )


# ---------------------------------------------------------------------------------------
# Injection


def _is_regex(pattern: str) -> bool:
    return any(c in _REGEX_CHARS for c in pattern)


def _matches(name: str, pattern: str) -> bool:
    """Regex patterns fullmatch the name; plain ones match a dotted suffix (PEFT style)."""
    if _is_regex(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def _is_head(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    if any(p in NEVER_GATED for p in parts):
        return True
    get_out = getattr(model, "get_output_embeddings", None)  # HF models only
    out_emb = get_out() if get_out is not None else None
    return out_emb is not None and model.get_submodule(name) is out_emb


def resolve_targets(model: nn.Module, targets: list[str] | str | None) -> list[str]:
    """Names of the nn.Linear modules that `targets` selects, in model order.

    None -> the family defaults; "all-linear" -> every Linear except heads/pooler/lm_head.
    A pattern that selects nothing is a ConfigError (a typo should not silently gate nothing).
    """
    if targets is None:
        spec = lookup(model)
        if spec is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            raise UnsupportedModelError(
                f"no default gate targets for model_type {mt!r}; supported model types: "
                f"{supported_text()}. Pass target_modules patterns or 'all-linear'."
            )
        patterns: list[str] | None = DEFAULT_TARGETS[spec.layout.name]
    elif isinstance(targets, str):
        patterns = None if targets == "all-linear" else [targets]
    else:
        patterns = list(targets)
        if not patterns:
            raise ConfigError("target_modules", "must name at least one module pattern")

    inside_gated: set[str] = {n for n, m in model.named_modules() if isinstance(m, GatedLinear)}
    names: list[str] = []
    hits = dict.fromkeys(patterns or [], 0)
    for name, mod in model.named_modules():
        if name in inside_gated:  # already gated: counts as a hit, not gated again
            for p in patterns or []:
                if _matches(name, p):
                    hits[p] += 1
            continue
        if not isinstance(mod, nn.Linear) or not name:
            continue
        if any(name.startswith(g + ".") for g in inside_gated):
            continue  # the base of an existing GatedLinear
        if _is_head(name, model):
            continue
        if patterns is None:
            names.append(name)
            continue
        matched = False
        for p in patterns:
            if _matches(name, p):
                hits[p] += 1
                matched = True
        if matched:
            names.append(name)
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise ConfigError(
            "target_modules",
            f"pattern(s) {missing} match no nn.Linear module (task heads, pooler and lm_head "
            "are never gated)",
        )
    return names


def inject_gates(
    model: nn.Module,
    targets: list[str] | str | None = None,
    cfg: GateConfig | dict | None = None,
) -> list[str]:
    """Wrap the selected Linears in GatedLinear in place; returns the gated names.

    Idempotent: modules already gated are left alone.
    """
    if isinstance(cfg, dict):
        cfg = GateConfig.from_dict(cfg)
    cfg = cfg or GateConfig()
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator().manual_seed(int(cfg.seed))
    for name in resolve_targets(model, targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        gm = GatedLinear(base, cfg, generator=gen)
        gm.train(base.training)  # follow the model's mode (a new Module defaults to train)
        setattr(parent, attr, gm)
    return list(gated_modules(model))


def gated_modules(model: nn.Module) -> dict[str, GatedLinear]:
    """name -> GatedLinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLinear)}


@contextlib.contextmanager
def gates_open(model: nn.Module) -> Iterator[None]:
    """Within the block every GatedLinear is its dense self (the distillation teacher)."""
    gms = list(gated_modules(model).values())
    before = [g.force_open for g in gms]
    for g in gms:
        g.force_open = True
    try:
        yield
    finally:
        for g, b in zip(gms, before, strict=True):
            g.force_open = b


@torch.no_grad()
def tie_columns(gm: GatedLinear, group: int) -> None:
    """One gate per run of `group` columns (a head gate on o_proj): logits set to their mean."""
    if group <= 1:
        gm.col_group = 1
        return
    if gm.in_features % group:
        raise ConfigError("head_gates", f"{gm.in_features} columns do not split into {group}s")
    gm.col_logits.copy_(gm.col_logits.view(-1, group).mean(1).repeat_interleave(group))
    gm.col_group = int(group)


def remove_gates(model: nn.Module, fold: bool = True) -> None:
    """Put plain nn.Linear modules back: folded eval weights (fold=True) or the originals."""
    for name, gm in list(gated_modules(model).items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, gm.to_linear(fold=fold))


def set_input_recording(model: nn.Module, enabled: bool) -> None:
    """Turn on the per-layer mean-input recording the kurtosis objective needs."""
    for gm in gated_modules(model).values():
        gm.record_input_mean = enabled
        if not enabled:
            gm.input_mean = None
