"""What trains: trainable sets per mode, optimizer groups, and the tensors they save.

Like PEFT's layers, GatedLinear declares the state it owns (``adapter_layer_names``); this
module builds on that to freeze the rest of the model, group parameters for the optimizer
(gates and biases never get weight decay) and save or load only what trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from core.config import TRAINABLE_MODES
from core.errors import ConfigError
from core.gates import HEAD_MODULE_NAMES, gated_modules

TrainableMode = Literal["gates", "gates+lora", "gates+weights"]


def default_head_modules(model: nn.Module) -> list[str]:
    """Task-head modules present on the model (classifier / score / qa_outputs)."""
    names = dict(model.named_modules())
    heads = [n for n in names if n and n.split(".")[-1] in HEAD_MODULE_NAMES and "." not in n]
    # BERT's sequence-classification head is pooler (dense + tanh) + classifier; RoBERTa's
    # classifier already holds the same dense layer. Sentence-embedding checkpoints such as
    # all-MiniLM-L6-v2 were trained with mean pooling, so their frozen pooler is close to
    # useless for a linear classifier: it must train with the head.
    if heads:
        heads += [n for n in names if n.count(".") == 1 and n.endswith(".pooler")]
    return heads


def _head_param_names(model: nn.Module, head_modules: Iterable[str]) -> set[str]:
    out: set[str] = set()
    all_names = [n for n, _ in model.named_parameters()]
    for h in head_modules:
        hits = [n for n in all_names if n == h or n.startswith(h + ".")]
        if not hits:
            raise ConfigError("head_modules", f"{h!r} is not a module or parameter of the model")
        out.update(hits)
    return out


def _classify_params(model: nn.Module, head_modules: Iterable[str]) -> dict[str, str]:
    """parameter name -> 'gates' | 'lora' | 'biases' | 'head' | 'weights'."""
    kinds: dict[str, str] = {}
    gated = gated_modules(model)
    for gname, gm in gated.items():
        kinds[f"{gname}.row_logits"] = "gates"
        kinds[f"{gname}.col_logits"] = "gates"
        if gm.lora_A is not None:
            kinds[f"{gname}.lora_A"] = "lora"
            kinds[f"{gname}.lora_B"] = "lora"
        if gm.base.bias is not None:
            kinds[f"{gname}.base.bias"] = "biases"
    for n in _head_param_names(model, head_modules):
        kinds.setdefault(n, "head")
    for n, _ in model.named_parameters():
        kinds.setdefault(n, "weights")
    return kinds


def configure_trainable(
    model: nn.Module,
    mode: str = "gates",
    head_modules: Iterable[str] | None = None,
) -> list[str]:
    """Set requires_grad per mode; returns the trainable parameter names.

    "gates": gates + head (+ any newly initialised modules passed in head_modules, e.g. a
    pooler the checkpoint lacked) + biases of gated layers. "gates+lora": also LoRA A/B.
    "gates+weights": everything. The head list is remembered for param_groups().
    """
    if mode not in TRAINABLE_MODES:
        raise ConfigError("trainable", f"must be one of {list(TRAINABLE_MODES)}, got {mode!r}")
    gated = gated_modules(model)
    if not gated:
        raise ConfigError("trainable", "the model has no gated layers; call inject_gates first")
    if mode == "gates+lora" and not any(g.lora_A is not None for g in gated.values()):
        raise ConfigError("lora_rank", "trainable='gates+lora' needs lora_rank > 0 at injection")
    heads = list(default_head_modules(model) if head_modules is None else head_modules)
    cast(Any, model).finegates_head_modules = heads  # plain attribute, read by param_groups
    kinds = _classify_params(model, heads)
    allowed = {"gates", "biases", "head"}
    if mode == "gates+lora":
        allowed.add("lora")
    trainable = []
    for n, p in model.named_parameters():
        on = mode == "gates+weights" or kinds[n] in allowed
        p.requires_grad_(on)
        if on:
            trainable.append(n)
    return trainable


def param_groups(
    model: nn.Module,
    gate_lr: float,
    head_lr: float | None = None,
    lora_lr: float | None = None,
    weight_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups over the trainable params, each with a "name" key.

    Gates and biases never get weight decay (decay would pull gates toward z = 0.5).
    """
    heads = getattr(model, "finegates_head_modules", None)
    if heads is None:
        heads = default_head_modules(model)
    kinds = _classify_params(model, heads)
    lrs = {
        "gates": gate_lr,
        "head": head_lr if head_lr is not None else gate_lr,
        "biases": head_lr if head_lr is not None else gate_lr,
        "lora": lora_lr if lora_lr is not None else gate_lr,
        "weights": weight_lr if weight_lr is not None else gate_lr,
    }
    decay = {"gates": 0.0, "biases": 0.0, "head": weight_decay, "lora": weight_decay}
    decay["weights"] = weight_decay
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in lrs}
    for n, p in model.named_parameters():
        if p.requires_grad:
            buckets[kinds[n]].append(p)
    return [
        {"name": k, "params": ps, "lr": lrs[k], "weight_decay": decay[k]}
        for k, ps in buckets.items()
        if ps
    ]


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the tensors that train (gates, head, biases, LoRA; everything in gates+weights)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def gate_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the state GatedLinear layers own (adapter_layer_names)."""
    out: dict[str, Tensor] = {}
    for gname, gm in gated_modules(model).items():
        for attr in gm.adapter_layer_names:
            t = getattr(gm, attr, None)
            if t is not None:
                out[f"{gname}.{attr}"] = t.detach()
    return out


def load_trainable_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy tensors by name into existing parameters; unknown names or shapes are errors."""
    params = dict(model.named_parameters())
    for n, t in state.items():
        if n not in params:
            raise ConfigError("state", f"checkpoint tensor {n!r} is not a parameter of the model")
        if params[n].shape != t.shape:
            raise ConfigError(
                "state", f"{n!r}: checkpoint shape {tuple(t.shape)} != {tuple(params[n].shape)}"
            )
        with torch.no_grad():
            params[n].copy_(t.to(params[n].dtype))
