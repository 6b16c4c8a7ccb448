"""Physical pruning (method.md §3): validate the plan, then slice the coupled groups.

``prune_model`` is the public entry point; the work is split along its seams:
core.plan_check validates a plan and proves that every group it drops is dead (before
any tensor is touched), core.prune_build slices the folded weights into the pruned
family model, and core.prune_figures compares the result with the gated model and
counts what was removed. Plans come from core.structure.build_plan.

The names below stay importable from here (CLI, worker, benches and tests use them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.plan_check import validate_plan
from core.prune_build import build_pruned_model, check_prunable
from core.prune_figures import compression_figures, diff_and_scale, max_abs_diff
from core.structure import build_plan, dense_plan, describe, plan_to_dict

__all__ = [
    "prune_model",
    "validate_plan",
    "dense_plan",
    "plan_to_dict",
    "max_abs_diff",
    "diff_and_scale",
    "compression_figures",
]


def prune_model(
    gated_model: nn.Module,
    plan: Any = None,
    check_dead: bool = True,
    equal_head_dims: bool = True,
    ffn_multiple: int = 1,
    dim_multiple: int = 1,
) -> tuple[nn.Module, Any]:
    """Validate ``plan`` (default: ``core.structure.build_plan``), then build the pruned
    module from the folded eval weights. Returns (pruned_module, plan).

    ``equal_head_dims`` keeps a few dead q/k or v/o dims so both widths match (faster
    fused attention on CPU); the returned plan is the validated one, the model's
    config holds the widths actually built."""
    check_prunable(gated_model)
    S = describe(gated_model)
    if plan is None:
        plan = build_plan(gated_model, S)
    validate_plan(gated_model, plan, check_dead=check_dead, structure=S)
    pm = build_pruned_model(gated_model, S, plan, equal_head_dims, ffn_multiple, dim_multiple)
    return pm, plan
