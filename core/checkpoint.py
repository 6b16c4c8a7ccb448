"""Trainable-state checkpoints with exact resume: safetensors + JSON, never pickle.

Why not ``torch.save(optimizer.state_dict())``: that is a pickle, and a service must
never unpickle files it keeps on shared storage. AdamW's per-parameter tensors are
flattened by PARAMETER NAME (not index) into safetensors; hyperparameters and scalars go
to JSON. The RNG states (torch CPU/CUDA as uint8 tensors, Python/NumPy as JSON) and the
data position make N steps + resume + N steps equal 2N steps straight.

Layout of ``checkpoints/step-N/`` (its file names and format tag are part of the run
directory format, core.rundir): trainable.safetensors, optimizer.safetensors,
rng.safetensors, state.json (step, data position, optimizer/scheduler/objective scalars,
Python/NumPy RNG, metrics). Written to a temp dir and renamed, so a crash never leaves a
half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import RunDirError, TrainingError
from core.rundir import (
    CHECKPOINT_FORMAT,
    CKPT_OPTIMIZER,
    CKPT_RNG,
    CKPT_STATE,
    CKPT_TRAINABLE,
    STEP_DIR,
)

_TENSOR_REF = "__tensor__"


# ----------------------------------------------------------------------------- helpers
def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by references; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR_REF: key}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed "state.<param name>.<key>", JSON with groups and scalar state)."""
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    scalars: dict[str, dict[str, Any]] = {}
    for g in optimizer.param_groups:
        hp = {k: v for k, v in g.items() if k != "params"}
        hp = json.loads(
            json.dumps(hp, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        )
        pnames = [names[id(p)] for p in g["params"]]
        groups.append({"hparams": hp, "params": pnames})
        for p, n in zip(g["params"], pnames, strict=True):
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    tensors[f"state.{n}.{k}"] = v.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(n, {})[k] = v
    return tensors, {"groups": groups, "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    names = _param_names(model)
    cur = optimizer.state_dict()
    if len(cur["param_groups"]) != len(meta["groups"]):
        raise TrainingError("checkpoint optimizer has a different number of parameter groups")
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for gi, (g, saved) in enumerate(zip(optimizer.param_groups, meta["groups"], strict=True)):
        pnames = [names[id(p)] for p in g["params"]]
        if pnames != saved["params"]:
            raise TrainingError(f"checkpoint optimizer group {gi} holds different parameters")
        idxs = cur["param_groups"][gi]["params"]
        for idx, n in zip(idxs, pnames, strict=True):
            st: dict[str, Any] = {}
            pre = f"state.{n}."
            for k, v in tensors.items():
                if k.startswith(pre):
                    st[k[len(pre) :]] = v
            st.update(meta["scalars"].get(n, {}))
            if st:
                state[idx] = st
        group = dict(saved["hparams"])
        group["params"] = idxs
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    # the global generator is MT19937, so this is the legacy 5-tuple
    npst = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------- API
def save_checkpoint(
    ckpt_dir: Path | str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    data_position: dict[str, Any],
    objective_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint atomically and return its directory."""
    final = Path(ckpt_dir)
    tmp = _atomic_dir(final)
    try:
        trainable = {
            n: p.detach().cpu().contiguous().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        save_file(trainable, str(tmp / CKPT_TRAINABLE))
        opt_t, opt_meta = optimizer_to_flat(optimizer, model)
        save_file(opt_t, str(tmp / CKPT_OPTIMIZER))
        rng_t, rng_meta = rng_state()
        obj_t: dict[str, torch.Tensor] = {}
        obj_meta = _split_tensors(objective_state or {}, "objective", obj_t)
        save_file({**rng_t, **obj_t}, str(tmp / CKPT_RNG))
        sched = scheduler.state_dict() if scheduler is not None else None
        if sched is not None and "lr_lambdas" in sched:
            # plain functions are stored as None by LambdaLR; rebuilt from the config
            sched["lr_lambdas"] = [None for _ in sched["lr_lambdas"]]
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "data_position": data_position,
            "optimizer": opt_meta,
            "scheduler": sched,
            "rng": rng_meta,
            "objective": obj_meta,
            "extra": extra or {},
        }
        (tmp / CKPT_STATE).write_text(json.dumps(state, indent=1, default=float), "utf-8")
        _commit_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_checkpoint_state(ckpt_dir: Path | str) -> dict[str, Any]:
    """state.json of one checkpoint; a checkpoint of an unknown format is refused."""
    path = Path(ckpt_dir) / CKPT_STATE
    state = json.loads(path.read_text("utf-8"))
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path}: unknown checkpoint format {fmt!r} (reads {CHECKPOINT_FORMAT})")
    return state


def load_trainable(ckpt_dir: Path | str, model: nn.Module) -> None:
    """Copy a checkpoint's trainable tensors into the model (names must match)."""
    tensors = load_file(str(Path(ckpt_dir) / CKPT_TRAINABLE))
    params = dict(model.named_parameters())
    for n, t in tensors.items():
        if n not in params or params[n].shape != t.shape:
            raise TrainingError(f"checkpoint tensor {n!r} does not fit the model")
        with torch.no_grad():
            params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))


def load_checkpoint(
    ckpt_dir: Path | str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG; returns the state dict (step, data, objective)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_checkpoint_state(ckpt_dir)
    load_trainable(ckpt_dir, model)
    if optimizer is not None:
        opt_t = load_file(str(ckpt_dir / CKPT_OPTIMIZER))
        optimizer_from_flat(optimizer, model, opt_t, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    extra_t = load_file(str(ckpt_dir / CKPT_RNG))
    if restore_rng:
        set_rng_state({k: v for k, v in extra_t.items() if k.startswith("torch_")}, state["rng"])
    state["objective"] = _join_tensors(state.get("objective") or {}, extra_t)
    return state


def list_checkpoints(root: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / CKPT_STATE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: Path | str) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def prune_checkpoints(root: Path | str, keep_last: int, keep: set[int] | None = None) -> None:
    """Delete all but the last ``keep_last`` checkpoints and those in ``keep`` (the best)."""
    keep = keep or set()
    cks = list_checkpoints(root)
    for step, d in cks[: max(0, len(cks) - keep_last)]:
        if step not in keep:
            shutil.rmtree(d, ignore_errors=True)
