"""Pruned-vs-gated equivalence checks and the compression figures of a pruned model.

Why apart from the builder: these read both models only after pruning; the artifact's
compression report and the `prune`/`bench` commands use them, the builder never does.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from core.families import ENCODER
from core.gates import GatedLinear
from core.pruned import PrunedBertModel, PrunedLlamaModel
from core.structure import LayerStructure, ModelStructure, describe

__all__ = ["max_abs_diff", "diff_and_scale", "compression_figures"]


@torch.no_grad()
def max_abs_diff(
    gated_model: nn.Module,
    pruned: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    batch: int = 4,
    seq_len: int = 16,
    seed: int = 0,
) -> float:
    """Largest |pruned - gated eval| over the model outputs (logits) on the given or
    random inputs (random inputs get a padded row to exercise masking)."""
    return diff_and_scale(
        gated_model, pruned, input_ids, attention_mask, batch=batch, seq_len=seq_len, seed=seed
    )[0]


@torch.no_grad()
def diff_and_scale(
    gated_model: nn.Module,
    pruned: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    batch: int = 4,
    seq_len: int = 16,
    seed: int = 0,
) -> tuple[float, float]:
    """(max |pruned - gated|, max |gated|): deep real decoders carry fp32 rounding noise
    of ~1e-5 relative, so the absolute figure is read next to the output scale."""
    was = gated_model.training
    gated_model.eval()
    pruned.eval()
    if input_ids is None:
        gen = torch.Generator().manual_seed(seed)
        V = gated_model.config.vocab_size
        input_ids = torch.randint(3, V, (batch, seq_len), generator=gen)
        if isinstance(pruned, PrunedBertModel):
            attention_mask = torch.ones_like(input_ids)
            attention_mask[-1, seq_len // 2 :] = 0
            input_ids = input_ids.masked_fill(attention_mask == 0, pruned.config.pad_token_id)
    try:
        ref = gated_model(input_ids=input_ids, attention_mask=attention_mask).logits
        out = pruned(input_ids, attention_mask)
        if isinstance(pruned, PrunedLlamaModel) and attention_mask is not None:
            keep = attention_mask.bool()
            out, ref = out[keep], ref[keep]
        return float((out - ref).abs().max()), float(ref.abs().max())
    finally:
        gated_model.train(was)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


@torch.no_grad()
def compression_figures(gated_model: nn.Module, pruned: nn.Module, plan: Any) -> dict:
    """Params before/after (whole model, gated Linears per layer), the paper's per-matrix
    count (rows kept x cols kept from the eval gates) next to what was removed."""
    S = describe(gated_model)
    gate_state = set(GatedLinear.adapter_layer_names)
    before = sum(
        p.numel()
        for n, p in {id(p): (n, p) for n, p in gated_model.named_parameters()}.values()
        if n.rsplit(".", 1)[-1] not in gate_state
    )
    per_layer = []
    gb = ga = paper = 0
    for ls, blk in zip(S.layers, pruned.layers, strict=True):
        row = {"index": ls.index, "gated_before": 0, "gated_after": 0, "paper_after": 0}
        for name in ls.roles():
            mod = gated_model.get_submodule(name)
            if not isinstance(mod, GatedLinear):
                continue
            o, n = cast(Tensor, mod.weight).shape
            row["gated_before"] += o * n
            zr, zc = mod.eval_gates()
            row["paper_after"] += int((zr > 0).sum()) * int((zc > 0).sum())
        row["gated_after"] = _gated_after_layer(gated_model, S, ls, blk)
        gb += row["gated_before"]
        ga += row["gated_after"]
        paper += row["paper_after"]
        per_layer.append(row)
    after = _n_params(pruned)
    return {
        "params_before": before,
        "params_after": after,
        "params_removed_fraction": 1 - after / before if before else 0.0,
        "gated_params_before": gb,
        "gated_params_after": ga,
        "gated_removed_fraction": 1 - ga / gb if gb else 0.0,
        "paper_params_after": paper,
        "paper_removed_fraction": 1 - paper / gb if gb else 0.0,
        "per_layer": per_layer,
    }


def _gated_after_layer(
    gated_model: nn.Module, S: ModelStructure, ls: LayerStructure, blk: nn.Module
) -> int:
    """Physically kept weights of this layer's GATED Linears (ungated ones not counted)."""
    C = gated_model.get_submodule(ls.q).weight.shape[1]
    a: Any  # the BertLayer itself, or a LlamaBlock's attention
    if S.family == ENCODER:
        a = blk
        n_q = n_kv = a.n_heads
        F_ = a.ffn
    else:
        a = blk.attn
        n_q, n_kv, F_ = a.n_q, a.n_kv, blk.mlp.ffn
    sizes = {
        "q": n_q * a.d_qk * C,
        "k": n_kv * a.d_qk * C,
        "v": n_kv * a.d_vo * C,
        "o": n_q * a.d_vo * C,
        "ffn_in": F_ * C,
        "ffn_out": F_ * C,
    }
    return sum(
        sizes[kind]
        for name, kind in ls.roles().items()
        if isinstance(gated_model.get_submodule(name), GatedLinear)
    )
