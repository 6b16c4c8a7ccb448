"""Typed progress records and the callback protocol at the engine/service seam.

The training loop calls ``on_step`` / ``on_eval`` / ``on_checkpoint``. A callback
returns ``False`` to ask the loop to stop cleanly (that is how the service
cancels a job); any other return value (``None`` or ``True``) means "go on".
The engine knows nothing about who listens: a progress bar, a JSONL writer or a
worker batching rows into Postgres all look the same from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepRecord:
    step: int  # optimizer steps completed (1-based after the first step)
    total_steps: int
    epoch: float
    loss: float  # total = task_loss + sparsity_weight * sparsity_loss + distill_loss
    task_loss: float
    sparsity_loss: float
    lr: float  # gate learning rate (first param group)
    examples_per_second: float
    eta_seconds: float | None
    measured_sparsity: float | None = None  # filled on steps where it was computed
    tokens: int = 0  # tokens processed so far (trained_tokens)
    distill_loss: float = 0.0  # weighted KL to the dense teacher (0 when off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalRecord:
    step: int
    total_steps: int
    metrics: dict[
        str, float
    ]  # task metrics by name: accuracy, f1, mcc, pearson, spearman, perplexity, eval_loss
    measured_sparsity: float  # fraction of gated weight params pruning will physically remove
    sparsity_by_type: dict[str, float] = field(
        default_factory=dict
    )  # share of eval gates == 0 per layer type
    removable_params: int = 0
    gated_params: int = 0
    is_best: bool = False
    gates: dict[str, Any] | None = None  # core.gatemap snapshot: heads/neurons kept per layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckpointRecord:
    step: int
    path: str
    metrics: dict[str, float] = field(default_factory=dict)
    measured_sparsity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class TrainerCallback(Protocol):
    def on_step(self, record: StepRecord) -> bool | None: ...

    def on_eval(self, record: EvalRecord) -> bool | None: ...

    def on_checkpoint(self, record: CheckpointRecord) -> bool | None: ...


class CallbackList:
    """Fans records out to several callbacks; stops if any of them asks to."""

    def __init__(self, *callbacks: TrainerCallback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def _fan(self, name: str, record: Any) -> bool:
        go_on = True
        for cb in self.callbacks:
            if getattr(cb, name)(record) is False:
                go_on = False
        return go_on

    def on_step(self, record: StepRecord) -> bool:
        return self._fan("on_step", record)

    def on_eval(self, record: EvalRecord) -> bool:
        return self._fan("on_eval", record)

    def on_checkpoint(self, record: CheckpointRecord) -> bool:
        return self._fan("on_checkpoint", record)

    def before_write(self, what: str) -> None:
        """Called just before the loop writes into the run directory (``"checkpoint"``,
        ``"final"``). Optional on a callback: one may raise to forbid the write (the
        service's ownership fence: a worker that lost its job writes nothing)."""
        for cb in self.callbacks:
            hook = getattr(cb, "before_write", None)
            if hook is not None:
                hook(what)
