"""Sparsity objectives (method.md §2): the paper's term and the calibrated one.

Paper (`objective="paper"`): keep probability p = Phi((mu + 0.5) / sigma_p), sigma_p = 0.5,
per gated layer L_l = 0.5 (|mean p_r - k| + |mean p_c - k|), k = 1 - target, averaged over
layers. Optional kurtosis weighting replaces the means by softmax(-sqrt_kurtosis / tau)
weighted sums. Its target is NOT the removed fraction (p never goes below 0.159, and
coupled groups multiply the closures), so it overshoots: on MiniLM at 0.4 it removes ~74%.

Calibrated (`objective="calibrated"`, the default): target_sparsity is the fraction of
gated weight params PHYSICALLY removed, as build_plan counts them. The term uses
`structure.expected_removed_fraction(probs="st")`: its VALUE is computed from the eval
gates with the coupling rules (it equals the measured sparsity), its GRADIENT flows
through the smooth keep probabilities along the same coupling formulas (FFN neuron =
product over its lines, "all heads closed" = product of closed probabilities, group
removal, uniform-per-layer max). It is steered to a (ramped) target with a Huber penalty,
and a small integral controller (`update(measured, step)`) shifts the target the penalty
sees to remove any steady-state offset left by the task loss pulling against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.expectation import expected_removed_fraction
from core.gates import GatedLinear, gated_modules, set_input_recording
from core.structure import ModelStructure, describe

OBJECTIVES: tuple[str, ...] = ("calibrated", "paper")
SIGMA_P = 0.5
KURTOSIS_TAU = 100.0


def keep_prob(mu: Tensor, sigma_p: float = SIGMA_P) -> Tensor:
    """Phi((mu + 0.5) / sigma_p); with mu in (-1, 1) this lies in (0.159, 0.9987)."""
    return 0.5 * (1.0 + torch.erf((mu + 0.5) / (sigma_p * math.sqrt(2.0))))


def paper_layer_term(p_r: Tensor, p_c: Tensor, k: float) -> Tensor:
    """0.5 (|mean p_r - k| + |mean p_c - k|): two-sided, pulls toward k from both sides."""
    return 0.5 * ((p_r.mean() - k).abs() + (p_c.mean() - k).abs())


def _sqrt_kurtosis(a: Tensor, dim: int) -> Tensor:
    """sqrt of the Pearson kurtosis along `dim` (NaN-free: flat rows get 0)."""
    m = a.mean(dim, keepdim=True)
    c = a - m
    var = (c * c).mean(dim)
    m4 = (c**4).mean(dim)
    kurt = torch.where(var > 0, m4 / var.clamp_min(1e-30) ** 2, torch.zeros_like(var))
    return kurt.clamp_min(0).sqrt()


@torch.no_grad()
def kurtosis_weights(gm: GatedLinear, tau: float = KURTOSIS_TAU) -> tuple[Tensor, Tensor] | None:
    """(row weights, col weights), each softmax(-sqrt_kurtosis / tau), or None without input.

    A = W * mean input; a row's kurtosis is taken over the open columns and a column's
    over the open rows, so already-closed lines do not dilute the statistic.
    """
    x = gm.input_mean
    if x is None:
        return None
    w = gm.base.weight.detach().float()
    a = w * x.to(w.device)[None, :]  # (out, in)
    z_r, z_c = gm.eval_gates()
    open_r, open_c = z_r > 0, z_c > 0
    if int(open_r.sum()) < 2 or int(open_c.sum()) < 2:
        return None
    k_r = _sqrt_kurtosis(a[:, open_c], dim=1)  # (out,)
    k_c = _sqrt_kurtosis(a[open_r, :], dim=0)  # (in,)
    return torch.softmax(-k_r / tau, 0), torch.softmax(-k_c / tau, 0)


def paper_objective(
    model: nn.Module,
    target_sparsity: float,
    sigma_p: float = SIGMA_P,
    kurtosis: bool = False,
    tau: float = KURTOSIS_TAU,
) -> Tensor:
    """Mean over gated layers of the paper's per-layer term (unweighted by lambda)."""
    k = 1.0 - target_sparsity
    terms = []
    for gm in gated_modules(model).values():
        p_r, p_c = gm.keep_probs(sigma_p)
        kw = kurtosis_weights(gm, tau) if kurtosis else None
        if kw is None:
            terms.append(paper_layer_term(p_r, p_c, k))
        else:
            w_r, w_c = kw
            terms.append(0.5 * (((w_r * p_r).sum() - k).abs() + ((w_c * p_c).sum() - k).abs()))
    if not terms:
        raise ConfigError("target_modules", "the model has no gated layers")
    return torch.stack(terms).mean()


def _huber(x: Tensor, delta: float) -> Tensor:
    """|x| far from 0, quadratic within delta: the push fades as the target is reached."""
    ax = x.abs()
    return torch.where(ax > delta, ax - 0.5 * delta, 0.5 * x * x / delta)


class SparsityObjective:
    """The sparsity term of the training loss, with its schedule and controller state.

    loss(model, step) returns (lambda * term, parts) where parts holds plain floats:
    sparsity_term (unweighted), sparsity_lambda, target (what the penalty aims at now),
    expected_sparsity (calibrated only; equals the measured value by construction).
    update(measured, step) feeds the controller; state_dict() is JSON-able for exact resume.
    """

    def __init__(
        self,
        objective: str = "calibrated",
        target_sparsity: float = 0.4,
        sparsity_weight: float = 50.0,
        sparsity_start_step: int = 0,
        target_warmup_steps: int = 0,
        sigma_p: float = SIGMA_P,
        kurtosis: bool = False,
        kurtosis_tau: float = KURTOSIS_TAU,
        huber_delta: float = 0.02,
        controller_gain: float = 0.3,
        controller_limit: float = 0.15,
        controller_window: float = 0.1,
        structure: ModelStructure | None = None,
        focus: bool = True,
        focus_margin: float = 0.05,
    ):
        if objective not in OBJECTIVES:
            raise ConfigError("objective", f"must be one of {list(OBJECTIVES)}, got {objective!r}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ConfigError("target_sparsity", f"must be in [0, 1), got {target_sparsity}")
        if sparsity_weight < 0:
            raise ConfigError("sparsity_weight", f"must be >= 0, got {sparsity_weight}")
        self.objective = objective
        self.target_sparsity = float(target_sparsity)
        self.sparsity_weight = float(sparsity_weight)
        self.sparsity_start_step = int(sparsity_start_step)
        self.target_warmup_steps = max(0, int(target_warmup_steps))
        self.sigma_p = float(sigma_p)
        self.kurtosis = bool(kurtosis)
        self.kurtosis_tau = float(kurtosis_tau)
        self.huber_delta = float(huber_delta)
        self.controller_gain = float(controller_gain)
        self.controller_limit = float(controller_limit)
        self.controller_window = float(controller_window)
        self.structure = structure
        self.focus = bool(focus)
        self.focus_margin = float(focus_margin)
        # controller state (JSON-able)
        self.offset = 0.0
        self.last_measured: float | None = None
        self.last_update_step: int | None = None

    # -- schedule ---------------------------------------------------------------------------
    def lambda_at(self, step: int) -> float:
        return 0.0 if step < self.sparsity_start_step else self.sparsity_weight

    def target_at(self, step: int) -> float:
        """Scheduled target: linear ramp from 0 over target_warmup_steps after the start."""
        if step < self.sparsity_start_step:
            return 0.0
        if self.target_warmup_steps <= 0:
            return self.target_sparsity
        frac = min(1.0, (step - self.sparsity_start_step + 1) / self.target_warmup_steps)
        return self.target_sparsity * frac

    def _ramp_done(self, step: int) -> bool:
        return step >= self.sparsity_start_step + self.target_warmup_steps

    def effective_target(self, step: int) -> float:
        t = self.target_at(step)
        if self.objective == "calibrated" and self._ramp_done(step):
            t = t + self.offset
        return min(max(t, 0.0), 0.99)

    # -- loss --------------------------------------------------------------------------------
    def loss(self, model: nn.Module, step: int) -> tuple[Tensor, dict[str, float]]:
        lam = self.lambda_at(step)
        gms = gated_modules(model)
        if not gms:
            raise ConfigError("target_modules", "the model has no gated layers")
        ref = next(iter(gms.values())).row_logits
        if self.kurtosis:
            set_input_recording(model, True)
        if lam == 0.0:
            zero = ref.new_zeros(())
            return zero, {
                "sparsity_term": 0.0,
                "sparsity_lambda": 0.0,
                "target": self.target_at(step),
            }
        target = self.effective_target(step)
        parts: dict[str, float] = {"sparsity_lambda": lam, "target": target}
        if self.objective == "paper":
            term = paper_objective(model, target, self.sigma_p, self.kurtosis, self.kurtosis_tau)
        else:
            if self.structure is None:
                self.structure = describe(model)
            scale = _kurtosis_scale(model, self.kurtosis_tau) if self.kurtosis else {}
            if self.focus:
                scale = _focus_scale(model, target + self.focus_margin, scale)
            expected = expected_removed_fraction(
                model, self.structure, probs="st", min_sigma=self.sigma_p, grad_scale=scale
            )
            term = _huber(expected - target, self.huber_delta)
            parts["expected_sparsity"] = float(expected.detach())
        parts["sparsity_term"] = float(term.detach())
        return lam * term, parts

    # -- controller ---------------------------------------------------------------------------
    def update(self, measured: float, step: int) -> None:
        """Integral control on the measured removed fraction (calibrated objective only).

        Runs only after the target ramp and within controller_window of the target
        (conditional integration), so the gates' initial travel does not wind it up.
        """
        self.last_measured = float(measured)
        self.last_update_step = int(step)
        if self.objective != "calibrated" or not self._ramp_done(step):
            return
        if step < self.sparsity_start_step or self.sparsity_weight == 0.0:
            return
        err = self.target_at(step) - float(measured)
        if abs(err) > self.controller_window:
            return  # still travelling toward the target: integrating now only winds up
        lim = self.controller_limit
        self.offset = min(lim, max(-lim, self.offset + self.controller_gain * err))

    def state_dict(self) -> dict:
        return {
            "objective": self.objective,
            "target_sparsity": self.target_sparsity,
            "offset": self.offset,
            "last_measured": self.last_measured,
            "last_update_step": self.last_update_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("objective", self.objective) != self.objective:
            raise ConfigError(
                "objective",
                f"checkpoint was trained with {state.get('objective')!r}, not {self.objective!r}",
            )
        self.offset = float(state.get("offset", 0.0))
        lm = state.get("last_measured")
        self.last_measured = None if lm is None else float(lm)
        lu = state.get("last_update_step")
        self.last_update_step = None if lu is None else int(lu)


def _kurtosis_scale(model: nn.Module, tau: float) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-line gradient scales from kurtosis weights (normalised to mean 1).

    Lines whose A = W * mean input has heavy tails get a smaller share of the sparsity
    gradient, so they are protected. The value of the term is unchanged.
    """
    scale: dict[str, tuple[Tensor, Tensor]] = {}
    for name, gm in gated_modules(model).items():
        kw = kurtosis_weights(gm, tau)
        if kw is not None:
            scale[name] = (kw[0] * kw[0].numel(), kw[1] * kw[1].numel())
    return scale


@torch.no_grad()
def _lowest_mask(logits: Tensor, share: float) -> Tensor:
    """1.0 on the ceil(share * n) lowest logits of a gate vector, 0.0 elsewhere."""
    n = logits.numel()
    k = min(n, max(1, math.ceil(share * n)))
    if k >= n:
        return torch.ones_like(logits, dtype=torch.float32)
    v = logits.detach().float()
    return (v <= v.kthvalue(k).values).to(torch.float32)


def _focus_scale(
    model: nn.Module, share: float, base: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Send the sparsity gradient only to each gate vector's lowest `share` of gates.

    Why: Adam normalises every gate's step, so a penalty whose gradient reaches all gates
    moves them all down in lockstep: the whole model drifts into the noisy, fractional
    region of the hard-sigmoid and the task pays (measured on MiniLM: ~0.69 validation
    accuracy while no gate was closed yet). Focusing the push on the candidates (the
    lowest logits: those the task already resists least) leaves every other gate
    saturated at exactly 1. The ranking is redone every step, so a candidate the task
    pushes back up is replaced by the next lowest gate.
    """
    share = min(1.0, max(0.0, share))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, gm in gated_modules(model).items():
        m_r = _lowest_mask(gm.row_logits, share)
        m_c = _lowest_mask(gm.col_theta(), share)
        if name in base:
            b_r, b_c = base[name]
            m_r, m_c = m_r * b_r, m_c * b_c
        out[name] = (m_r, m_c)
    return out
