"""Plain-PyTorch model families whose layers each carry their own (pruned) shapes."""

from __future__ import annotations

from typing import Any

from core.pruned.bert import BertLayerShape, PrunedBertConfig, PrunedBertModel
from core.pruned.llama import KVCache, LlamaLayerShape, PrunedLlamaConfig, PrunedLlamaModel

# (config class, model class) per family; Any because the pairs differ in type per family
FAMILIES: dict[str, tuple[Any, Any]] = {
    "bert": (PrunedBertConfig, PrunedBertModel),
    "llama": (PrunedLlamaConfig, PrunedLlamaModel),
}


def build_pruned(family: str, config: dict):
    """Rebuild an (uninitialised) pruned skeleton from its JSON config."""
    if family not in FAMILIES:
        raise ValueError(f"unknown pruned family {family!r} (supported: {sorted(FAMILIES)})")
    cfg_cls, model_cls = FAMILIES[family]
    return model_cls(cfg_cls.from_dict(config))


__all__ = [
    "BertLayerShape",
    "FAMILIES",
    "KVCache",
    "LlamaLayerShape",
    "PrunedBertConfig",
    "PrunedBertModel",
    "PrunedLlamaConfig",
    "PrunedLlamaModel",
    "build_pruned",
]
