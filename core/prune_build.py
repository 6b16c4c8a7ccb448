"""Slice a validated plan out of the folded gated model into a pruned family model.

Every tensor is taken from the folded eval weights (W' = diag(z_r) W diag(z_c),
b' = z_r * b) and copied, so the pruned module owns fresh tensors and the gated model
can be freed afterwards. Residual-side gates (q/k/v/up/gate columns, o/down rows)
stay folded in as scaling or zeros: the residual width is never changed.

Which HF modules are read (projections, norms, embeddings, the task head) comes from
core.structure.describe and the family table (core.families); what to keep comes from
the plan, padded to uniform widths with core.structure.pad_dims (the same rule
build_plan counts with).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from core.errors import PlanError, UnsupportedModelError
from core.families import ENCODER, ModelType, backbone, head_paths, require, sliding_window
from core.plan_check import folded
from core.pruned import (
    BertLayerShape,
    LlamaLayerShape,
    PrunedBertConfig,
    PrunedBertModel,
    PrunedLlamaConfig,
    PrunedLlamaModel,
)
from core.structure import ModelStructure, pad_dims, plan_field, uniform_width

__all__ = ["build_pruned_model", "check_prunable", "effective_layers"]


def _lin(dst: nn.Linear, w: Tensor, b: Tensor | None) -> None:
    if dst.weight.shape != w.shape:
        raise PlanError(f"internal: weight shape {tuple(w.shape)} != {tuple(dst.weight.shape)}")
    dst.weight.data = w.detach().clone().contiguous()
    if dst.bias is not None:
        dst.bias.data = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.detach().clone()
    elif b is not None and bool((b != 0).any()):
        raise PlanError("internal: a nonzero bias would be dropped (pruned config lacks a bias)")


def _biased(m: nn.Module) -> bool:
    """Does the folded layer carry a bias: its own, or one from compensation?"""
    return m.bias is not None or getattr(m, "comp_mean", None) is not None


def _copy_norm(dst: nn.Module, src: nn.Module) -> None:
    dst.weight.data = src.weight.detach().clone()
    if getattr(dst, "bias", None) is not None:
        dst.bias.data = src.bias.detach().clone()


def _copy_emb(dst: nn.Embedding, src: nn.Embedding) -> None:
    dst.weight.data = src.weight.detach().clone()


def _rows(group_dims: list[tuple[int, list[int]]], hd: int) -> Tensor:
    """Flat row indices for (head, kept dims) pairs in head-major order."""
    idx = [h * hd + d for h, dims in group_dims for d in dims]
    return torch.tensor(idx, dtype=torch.long)


def _slice(w: Tensor, b: Tensor | None, rows: Tensor | None = None, cols: Tensor | None = None):
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    return w, b


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


def effective_layers(
    S: ModelStructure,
    plan: Any,
    equal_head_dims: bool,
    ffn_multiple: int = 1,
    dim_multiple: int = 1,
) -> list[dict]:
    """Per layer: kept groups, q/k and v/o dims per group, FFN neurons, as ints.

    ``equal_head_dims``: pad the shorter of q/k and v/o with dropped (dead) dims so both
    have the same width. CPU SDPA's fused (flash) kernel needs equal head dims; with
    unequal ones it falls back to the unfused math path, which costs more than the few
    extra projection rows (see bench/bench_prune.py).

    ``ffn_multiple`` / ``dim_multiple`` > 1 keep dropped (dead) FFN neurons / head dims
    until the width is a multiple of it, for kernels that prefer aligned sizes (benchmark
    knobs, exact either way).
    """
    hd, rope = S.head_dim, S.rope
    out = []
    for lp in plan_field(plan, "layers"):
        kv = [int(x) for x in plan_field(lp, "kv_heads_kept")]
        qk = [[int(d) for d in dims] for dims in plan_field(lp, "qk_dims")]
        vo = [[int(d) for d in dims] for dims in plan_field(lp, "vo_dims")]
        if equal_head_dims and kv and qk[0] and vo[0] and len(qk[0]) != len(vo[0]):
            width = uniform_width(len(qk[0]), len(vo[0]), hd, rope)
            qk = [pad_dims(d, width, hd, rope) for d in qk]
            vo = [pad_dims(d, width, hd) for d in vo]
        if dim_multiple > 1 and kv:
            # round per-head widths up (kernel-friendly sizes), with dead dims only
            n = len(qk[0])
            if n and n % dim_multiple:
                want = _round_up(n, dim_multiple, hd)
                if rope and (want - n) % 2:
                    want = min(hd, want + 1)
                qk = [pad_dims(d, want, hd, rope) for d in qk]
            n = len(vo[0])
            if n and n % dim_multiple:
                vo = [pad_dims(d, _round_up(n, dim_multiple, hd), hd) for d in vo]
        ffn = [int(j) for j in plan_field(lp, "ffn_kept")]
        if ffn_multiple > 1 and len(ffn) % ffn_multiple:
            n_ffn = S.intermediate_size
            ffn = pad_dims(ffn, _round_up(len(ffn), ffn_multiple, n_ffn), n_ffn)
        out.append(
            {
                "kv": kv,
                "heads": [int(h) for h in plan_field(lp, "heads_kept")],
                "qk": qk,
                "vo": vo,
                "ffn": ffn,
                "n": len(kv),
                "d_qk": len(qk[0]) if kv else 0,
                "d_vo": len(vo[0]) if kv else 0,
            }
        )
    return out


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _build_bert(
    model: nn.Module, S: ModelStructure, spec: ModelType, shapes: list[dict]
) -> PrunedBertModel:
    cfg = model.config
    enc = backbone(model, spec)
    emb = enc.embeddings
    mod = model.get_submodule
    ls0 = S.layers[0]
    head = head_paths(model, spec)
    num_labels = 0
    if head is not None and _module(model, head[2]) is not None:
        num_labels = int(cfg.num_labels)
    tt = getattr(emb, "token_type_embeddings", None)
    project = getattr(enc, "embeddings_project", None)
    pooler = getattr(enc, "pooler", None)
    pcfg = PrunedBertConfig(
        vocab_size=emb.word_embeddings.num_embeddings,
        hidden_size=S.hidden_size,
        head_dim=S.head_dim,
        max_position_embeddings=emb.position_embeddings.num_embeddings,
        type_vocab_size=0 if tt is None else tt.num_embeddings,
        layer_norm_eps=float(emb.LayerNorm.eps),
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        layers=[BertLayerShape(s["n"], s["d_qk"], s["d_vo"], len(s["ffn"])) for s in shapes],
        hidden_act=getattr(cfg, spec.layout.activation_attr),
        model_type=spec.name,
        num_labels=num_labels,
        has_pooler=pooler is not None,
        qkv_bias=mod(ls0.q).bias is not None,
        o_bias=any(_biased(mod(ls.o)) for ls in S.layers),
        ffn_bias=mod(ls0.ffn_in[0]).bias is not None
        or any(_biased(mod(ls.ffn_out)) for ls in S.layers),
        embedding_size=0 if project is None else emb.word_embeddings.embedding_dim,
    )
    pm = PrunedBertModel(pcfg)
    e_dst = pm.embeddings
    _copy_emb(e_dst.word_embeddings, emb.word_embeddings)
    _copy_emb(e_dst.position_embeddings, emb.position_embeddings)
    if tt is not None and e_dst.token_type_embeddings is not None:
        _copy_emb(e_dst.token_type_embeddings, tt)
    _copy_norm(e_dst.LayerNorm, emb.LayerNorm)
    if project is not None and e_dst.project is not None:
        _lin(e_dst.project, *folded(project))
    hd = S.head_dim
    for ls, lp, dst in zip(S.layers, shapes, pm.layers, strict=True):
        heads, qk, vo = lp["heads"], lp["qk"], lp["vo"]
        qk_rows = _rows(list(zip(heads, qk, strict=True)), hd)
        vo_rows = _rows(list(zip(heads, vo, strict=True)), hd)
        wq, bq = _slice(*folded(mod(ls.q)), rows=qk_rows)
        wk, bk = _slice(*folded(mod(ls.k)), rows=qk_rows)
        wv, bv = _slice(*folded(mod(ls.v)), rows=vo_rows)
        if dst.qkv is not None:
            b = None if bq is None else torch.cat([bq, bk, bv])
            _lin(dst.qkv, torch.cat([wq, wk, wv]), b)
        _lin(dst.o, *_slice(*folded(mod(ls.o)), cols=vo_rows))
        ffn = torch.tensor(lp["ffn"], dtype=torch.long)
        _lin(dst.up, *_slice(*folded(mod(ls.ffn_in[0])), rows=ffn))
        _lin(dst.down, *_slice(*folded(mod(ls.ffn_out)), cols=ffn))
        _copy_norm(dst.ln1, mod(ls.norm1))
        _copy_norm(dst.ln2, mod(ls.norm2))
    if num_labels and head is not None:
        dense, _, out = head
        dense_dst = pm.head_dense if pm.head_dense is not None else pm.pooler
        if dense_dst is not None:
            _lin(dense_dst, *folded(mod(dense)))
        assert pm.classifier is not None  # num_labels > 0
        _lin(pm.classifier, *folded(mod(out)))
    return pm.eval()


def _eos_list(x) -> list[int]:
    if x is None:
        return []
    return [int(t) for t in x] if isinstance(x, list | tuple) else [int(x)]


def _rope_theta(cfg) -> float | None:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return None if theta is None else float(theta)


@torch.no_grad()
def _build_llama(
    model: nn.Module, S: ModelStructure, spec: ModelType, shapes: list[dict]
) -> PrunedLlamaModel:
    cfg = model.config
    base = backbone(model, spec)
    mod = model.get_submodule
    group = S.group_size
    rot = base.rotary_emb
    inv_freq = rot.inv_freq.detach().float()  # (hd/2,)
    ls0 = S.layers[0]
    window, window_layers = sliding_window(cfg, spec)
    o_comp = any(_biased(mod(ls.o)) for ls in S.layers)
    pcfg = PrunedLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=S.hidden_size,
        head_dim=S.head_dim,
        group_size=group,
        rms_norm_eps=cfg.rms_norm_eps,
        layers=[LlamaLayerShape(s["n"], s["d_qk"], s["d_vo"], len(s["ffn"])) for s in shapes],
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        # a compensated o_proj/down_proj gains a bias; q/k/v (gate/up) then carry zero
        # biases too, so the HF copy stays a plain Llama config (attention_bias/mlp_bias)
        attention_bias=mod(ls0.q).bias is not None or o_comp,
        o_bias=mod(ls0.o).bias is not None or o_comp,
        mlp_bias=mod(ls0.ffn_in[1]).bias is not None
        or any(_biased(mod(ls.ffn_out)) for ls in S.layers),
        attention_scaling=float(getattr(rot, "attention_scaling", 1.0)),
        hidden_act=cfg.hidden_act,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=_eos_list(cfg.eos_token_id),
        pad_token_id=cfg.pad_token_id,
        model_type=spec.name,
        qk_norm=S.qk_norm,
        sliding_window=window,
        sliding_layers=window_layers,
        extra={"rope_theta": _rope_theta(cfg)},
    )
    pm = PrunedLlamaModel(pcfg)
    _copy_emb(pm.embed_tokens, base.embed_tokens)
    _copy_norm(pm.norm, base.norm)
    hd, half = S.head_dim, S.head_dim // 2
    for ls, lp, blk in zip(S.layers, shapes, pm.layers, strict=True):
        kv, qk, vo = lp["kv"], lp["qk"], lp["vo"]
        # query heads are group-major: head h reads KV group h // group
        q_pairs = [(k * group + j, qk[i]) for i, k in enumerate(kv) for j in range(group)]
        o_pairs = [(k * group + j, vo[i]) for i, k in enumerate(kv) for j in range(group)]
        a = blk.attn
        wq, bq = _slice(*folded(mod(ls.q)), rows=_rows(q_pairs, hd))
        wk, bk = _slice(*folded(mod(ls.k)), rows=_rows(list(zip(kv, qk, strict=True)), hd))
        wv, bv = _slice(*folded(mod(ls.v)), rows=_rows(list(zip(kv, vo, strict=True)), hd))
        _lin(a.qkv, torch.cat([wq, wk, wv]), None if bq is None else torch.cat([bq, bk, bv]))
        _lin(a.o_proj, *_slice(*folded(mod(ls.o)), cols=_rows(o_pairs, hd)))
        if kv and qk[0]:
            # sorted kept dims = [kept first halves, same pairs' second halves]
            a.inv_freq.copy_(torch.stack([inv_freq[[d for d in dims if d < half]] for dims in qk]))
        for dst, src in ((a.q_norm, ls.q_norm), (a.k_norm, ls.k_norm)):
            if dst is not None and src is not None:
                w = mod(src).weight.detach()
                dst.weight.data = torch.stack([w[dims] for dims in qk]).clone()
        ffn = torch.tensor(lp["ffn"], dtype=torch.long)
        wg, bg = _slice(*folded(mod(ls.ffn_in[0])), rows=ffn)
        wu, bu = _slice(*folded(mod(ls.ffn_in[1])), rows=ffn)
        _lin(blk.mlp.gate_up, torch.cat([wg, wu]), None if bg is None else torch.cat([bg, bu]))
        _lin(blk.mlp.down_proj, *_slice(*folded(mod(ls.ffn_out)), cols=ffn))
        _copy_norm(blk.input_layernorm, mod(ls.norm1))
        _copy_norm(blk.post_attention_layernorm, mod(ls.norm2))
    if not pcfg.tie_word_embeddings or hasattr(model.lm_head, "folded_weight_and_bias"):
        w, _ = folded(model.lm_head)
        if pcfg.tie_word_embeddings and not torch.equal(w, pm.embed_tokens.weight):
            raise PlanError("lm_head: gated lm_head cannot stay tied to the embeddings")
        if not pcfg.tie_word_embeddings:
            pm.lm_head.weight.data = w.clone()
    return pm.eval()


def check_prunable(model: nn.Module) -> ModelType:
    """The table entry, or UnsupportedModelError for what no pruned model rebuilds."""
    spec = require(model)
    if spec.family != ENCODER and not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__}: physical pruning of decoders supports causal-LM models "
            "(lm_head); decoder sequence-classification heads are not supported"
        )
    return spec


def build_pruned_model(
    model: nn.Module,
    S: ModelStructure,
    plan: Any,
    equal_head_dims: bool = True,
    ffn_multiple: int = 1,
    dim_multiple: int = 1,
) -> PrunedBertModel | PrunedLlamaModel:
    """The pruned module for an already validated ``plan`` (core.plan_check)."""
    spec = check_prunable(model)
    shapes = effective_layers(S, plan, equal_head_dims, ffn_multiple, dim_multiple)
    if spec.family == ENCODER:
        return _build_bert(model, S, spec, shapes)
    return _build_llama(model, S, spec, shapes)
