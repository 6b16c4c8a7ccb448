"""Load a base model + tokenizer for a task, safely.

Why one place: every loader call here passes ``use_safetensors=True`` and never
``trust_remote_code``, so no pickle and no downloaded code can run, whatever the caller.
Modules the checkpoint lacks (a fresh classifier, a pooler a sentence-embedding model
never had) are reported, so the trainer can make them trainable: a random frozen pooler
in front of the classifier would cap accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from core.errors import UnsupportedModelError
from core.families import check_config, task_error


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: Any
    family: str
    path: str
    new_modules: list[str] = field(default_factory=list)  # freshly initialised modules


def load_tokenizer(path: Path | str, family: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padding is masked anyway.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise UnsupportedModelError(f"{path}: tokenizer has no pad, eos or unk token")
    if family == "llama":
        tok.padding_side = "right"  # training pads right; generation code sets its own
    return tok


def _new_module_names(model: nn.Module, keys: list[str]) -> list[str]:
    """Map missing/mismatched parameter names to their owning module names."""
    names = {n for n, _ in model.named_modules()}
    out: list[str] = []
    for k in keys:
        k = k[0] if isinstance(k, tuple) else k
        mod = k.rpartition(".")[0]
        while mod and mod not in names:
            mod = mod.rpartition(".")[0]
        if mod and mod not in out:
            out.append(mod)
    return out


def load_base(
    path: Path | str,
    task: str,
    labels: list[str] | None = None,
    problem_type: str | None = None,
) -> LoadedBase:
    """Base model in fp32 + tokenizer; classification gets a head sized to the labels."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    family = check_config(cfg).family  # refused here, before any training, if not prunable
    mismatch = task_error(family, task)
    if mismatch:
        raise UnsupportedModelError(f"{cfg.model_type!r}: {mismatch}")
    tok = load_tokenizer(path, family)
    common: dict[str, Any] = {
        "trust_remote_code": False,
        "use_safetensors": True,
        "dtype": torch.float32,
        "output_loading_info": True,
    }
    if task == "classification":
        if problem_type == "regression":
            kw: dict[str, Any] = {"num_labels": 1, "problem_type": "regression"}
        else:
            if not labels:
                raise UnsupportedModelError("classification needs the list of class labels")
            kw = {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {lab: i for i, lab in enumerate(labels)},
                "problem_type": "single_label_classification",
            }
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), ignore_mismatched_sizes=True, **kw, **common
        )
    elif task in ("causal_lm", "sparsify"):
        # output_loading_info=True makes it return (model, info); the stubs don't say so
        model, info = cast(Any, AutoModelForCausalLM.from_pretrained(str(path), **common))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        raise UnsupportedModelError(f"unknown task {task!r}")
    keys = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    new = _new_module_names(model, keys)
    return LoadedBase(model=model, tokenizer=tok, family=family, path=str(path), new_modules=new)
