"""ONNX export of pruned models, and an onnxruntime runner with the torch call shape.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
torch 2.13 defaults to the dynamo exporter, which needs ``onnxscript`` (not installed,
and it pulls a second toolchain into an offline deployment); the TorchScript path ships
with torch, handles ``scaled_dot_product_attention`` with ``scale=`` (opset >= 14), and
marks batch and sequence axes dynamic through ``dynamic_axes``.

- classification (BERT/RoBERTa family): inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int64, (batch, seq)); output ``logits`` (batch, num_labels).
- causal LM (Llama family): inputs ``input_ids``, ``attention_mask``; output ``logits``
  (batch, seq, vocab). NO KV cache: each call recomputes the whole prefix, so it suits
  scoring/perplexity and short prompts, not long generations (the torch model has the
  cache).

An artifact's model.onnx is written by core.package while the artifact is being built,
so the manifest hashes it like every other file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ArtifactError
from core.manifest import ONNX as ONNX_FILE
from core.pruned import PrunedBertModel, PrunedLlamaModel

OPSET = 17

__all__ = ["ONNX_FILE", "export_onnx", "OnnxRunner", "OnnxClassifier", "OnnxCausalLM"]


class _LMWrapper(nn.Module):
    """Logits from (input_ids, attention_mask) with GQA expanded (no enable_gqa in ONNX)."""

    def __init__(self, model: PrunedLlamaModel, last_only: bool = False):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask, last_only=self.last_only)


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = OPSET, last_only: bool = False
) -> Path:
    """Write ``model`` to ``path`` as ONNX with dynamic batch and sequence axes.

    ``last_only`` (decoders): output only the last position's logits (prefill/scoring
    of the next token), which is what the latency report times."""
    path = Path(path)
    model = model.eval()
    cfg: Any = model.config  # a pruned model's config dataclass
    ids = torch.randint(3, max(4, cfg.vocab_size), (2, 8))
    mask = torch.ones_like(ids)
    if isinstance(model, PrunedBertModel):
        args: tuple = (ids, mask, torch.zeros_like(ids))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        out = "logits" if model.classifier is not None else "last_hidden_state"
        module: nn.Module = model
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes[out] = {0: "batch"} if model.classifier is not None else {0: "batch", 1: "sequence"}
    elif isinstance(model, PrunedLlamaModel):
        args = (ids, mask)
        names = ["input_ids", "attention_mask"]
        out = "logits"
        module = _LMWrapper(model, last_only)
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes[out] = {0: "batch"} if last_only else {0: "batch", 1: "sequence"}
    else:
        raise ArtifactError(f"ONNX export supports pruned BERT/Llama models, not {type(model)}")
    expand: list[Any] = [a for a in model.modules() if hasattr(a, "expand_kv")]
    for a in expand:
        a.expand_kv = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=names,
                output_names=[out],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        for a in expand:
            a.expand_kv = False
    return path


def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """onnxruntime session called like the torch model: ``runner(input_ids, attention_mask,
    ...)`` with tensors or arrays, returning a torch tensor."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: Any, attention_mask: Any = None, *rest: Any) -> torch.Tensor:
        ids = np.asarray(input_ids, dtype=np.int64)
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            am = np.ones_like(ids) if attention_mask is None else attention_mask
            feeds["attention_mask"] = np.asarray(am, dtype=np.int64)
        if "token_type_ids" in self.input_names:
            tt = rest[0] if rest and rest[0] is not None else np.zeros_like(ids)
            feeds["token_type_ids"] = np.asarray(tt, dtype=np.int64)
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out)


OnnxClassifier = OnnxRunner
OnnxCausalLM = OnnxRunner
