"""Physical pruning (method.md §3): validate the plan, then slice the coupled groups.

``prune_model`` is the public entry point; the work is split along its seams:
core.plan_check validates a plan and proves that every group it drops is dead (before
any tensor is touched), core.prune_build slices the folded weights into the pruned
family model, and core.prune_figures compares the result with the gated model and
counts what was removed. Plans come from core.structure.build_plan.

The names below stay importable from here (CLI, worker, benches and tests use them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from core.plan_check import validate_plan
from core.prune_build import build_pruned_model, check_prunable
from core.prune_figures import compression_figures, diff_and_scale, max_abs_diff
from core.structure import build_plan, dense_plan, describe, plan_to_dict

log = logging.getLogger(__name__)

__all__ = [
    "prune_model",
    "prune_run",
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


@dataclass
class _Geometry:
    """The base-model shape ``original_shape`` reports."""

    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int


def _geometry(model: nn.Module) -> _Geometry:
    S = describe(model)
    return _Geometry(len(S.layers), S.num_heads, S.num_kv_heads, S.head_dim, S.intermediate_size)


# ----------------------------------------------------------------------------- runs
def original_shape(model: nn.Module) -> dict:
    """Base-model geometry: lets `bench` rebuild the dense reference from an artifact."""
    g = _geometry(model)
    return {
        "num_layers": g.n_layers,
        "num_heads": g.n_heads,
        "num_kv_heads": g.n_kv,
        "head_dim": g.head_dim,
        "intermediate_size": g.ffn,
    }


def base_weights_hash(gated_model: nn.Module, head_modules: list[str] | None = None) -> str:
    """Content hash of the weights the run started from: every tensor except gate logits
    and the task head (what a user needs to match the base model, not the training)."""
    from core.artifacts import state_hash

    gate_names = {"row_logits", "col_logits", "lora_A", "lora_B"}
    heads = tuple(f"{h}." for h in (head_modules or []))
    tensors = {}
    for n, t in gated_model.state_dict().items():
        if n.rsplit(".", 1)[-1] in gate_names or n.startswith(heads):
            continue
        tensors[n.replace(".base.", ".")] = t
    return state_hash(tensors)


def prune_run(
    run_dir: str | Path, output_dir: str | Path, check_batch: int = 4, **prune_kwargs: Any
) -> dict:
    """Load a trained gated run (``core.train.load_gated_run``), prune it, check it against
    the gated model on random inputs, write the artifact; returns the manifest."""
    from core.artifacts import save_artifact
    from core.train import load_gated_run

    run_dir = Path(run_dir)
    gated, tokenizer, info = load_gated_run(run_dir)
    gated.eval()
    pruned, plan = prune_model(gated, **prune_kwargs)
    diff, scale = diff_and_scale(gated, pruned, batch=check_batch)
    figures = compression_figures(gated, pruned, plan)
    figures["max_abs_diff_vs_gated"] = diff
    figures["max_abs_output_gated"] = scale
    figures["max_rel_diff_vs_gated"] = diff / scale if scale else 0.0
    if diff > 1e-3:
        log.warning("pruned model differs from the gated model by %.3g", diff)
    info = dict(info)
    training_config = None
    cpath = run_dir / "config.json"
    if cpath.exists():
        training_config = json.loads(cpath.read_text(encoding="utf-8"))
    elif "hyperparameters" in info:
        training_config = {"hyperparameters": info["hyperparameters"]}
    labels = info.get("labels")
    if not labels and getattr(gated.config, "id2label", None) and hasattr(gated, "classifier"):
        labels = {str(k): v for k, v in gated.config.id2label.items()}
    manifest = save_artifact(
        pruned,
        tokenizer,
        output_dir,
        plan=plan,
        base_model=info.get("base_model"),
        base_model_hash=base_weights_hash(gated, info.get("head_modules")),
        task=info.get("task"),
        labels=labels,
        training_config=training_config,
        metrics=info.get("metrics") or {},
        compression=figures,
        dense_source=info.get("base_model_path"),
        original_shape=original_shape(gated),
        extra={
            "problem_type": info.get("problem_type"),
            "measured_sparsity": info.get("measured_sparsity"),
            "max_length": info.get("max_length"),
            "source_run": str(run_dir.resolve()),
        },
    )
    return manifest
