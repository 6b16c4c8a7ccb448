"""Physical pruning: fold the eval gates, check the plan, slice coupled groups.

Order matters (Torch-Pruning's lesson): the whole plan is validated against the model
(index ranges, uniform per-layer widths, GQA/RoPE coupling, and that every group it
drops is provably dead in the folded weights) BEFORE any tensor is sliced, so a bad
plan raises ``PlanError`` naming the layer and field instead of silently giving a
model that answers differently.

Dead means exactly zero after folding, W' = diag(z_r) W diag(z_c), b' = z_r * b:
- FFN neuron j: producer row j (weight and bias) is 0, or (SwiGLU) the gate or up row
  is 0, or consumer column j is 0; GELU(0) = SiLU(0) = 0.
- V/O dim d of a head (GQA: of a KV group): the value row is 0, or the output column
  is 0 for every query head that reads it.
- Q/K dim d: the query row is 0 for every query head of the group, or the key row is 0.
  With RoPE the pair (d, d + head_dim/2) goes only if both are dead on the same side.
Residual-side gates (q/k/v/up/gate columns, o/down rows) stay folded in as scaling or
zeros: the residual width is never changed.

The pruned module owns fresh tensors: the gated model can be freed afterwards.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from core.errors import PlanError, UnsupportedModelError
from core.pruned import (
    BertLayerShape,
    LlamaLayerShape,
    PrunedBertConfig,
    PrunedBertModel,
    PrunedLlamaConfig,
    PrunedLlamaModel,
)

log = logging.getLogger(__name__)

BERT_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})
LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2"})

__all__ = [
    "prune_model",
    "validate_plan",
    "dense_plan",
    "plan_to_dict",
    "max_abs_diff",
    "diff_and_scale",
    "compression_figures",
]


# ----------------------------------------------------------------------------- access
def _folded(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W', b') with eval gates folded in; plain Linears pass through."""
    if hasattr(m, "folded_weight_and_bias"):
        w, b = m.folded_weight_and_bias()
    else:
        w, b = m.weight, m.bias
    return w.detach(), (None if b is None else b.detach())


def _eval_gates(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    return m.eval_gates() if hasattr(m, "eval_gates") else None


@dataclass
class _Geometry:
    family: str  # "bert" | "llama"
    model_type: str
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    rope: bool


def _family(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in BERT_TYPES:
        return "bert"
    if mt in LLAMA_TYPES:
        return "llama"
    raise UnsupportedModelError(
        f"physical pruning supports model types {sorted(BERT_TYPES | LLAMA_TYPES)}, got {mt!r}"
    )


def _bert_encoder(model: nn.Module) -> nn.Module:
    for attr in ("bert", "roberta", "electra"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model  # a bare BertModel


def _layer_modules(model: nn.Module, family: str) -> list[dict[str, nn.Module]]:
    """Per layer: the named projections and norms, whatever the HF wrapper."""
    out = []
    if family == "bert":
        for lyr in _bert_encoder(model).encoder.layer:
            out.append(
                {
                    "q": lyr.attention.self.query,
                    "k": lyr.attention.self.key,
                    "v": lyr.attention.self.value,
                    "o": lyr.attention.output.dense,
                    "ln1": lyr.attention.output.LayerNorm,
                    "up": lyr.intermediate.dense,
                    "down": lyr.output.dense,
                    "ln2": lyr.output.LayerNorm,
                }
            )
    else:
        for lyr in model.model.layers:
            out.append(
                {
                    "q": lyr.self_attn.q_proj,
                    "k": lyr.self_attn.k_proj,
                    "v": lyr.self_attn.v_proj,
                    "o": lyr.self_attn.o_proj,
                    "gate": lyr.mlp.gate_proj,
                    "up": lyr.mlp.up_proj,
                    "down": lyr.mlp.down_proj,
                    "ln1": lyr.input_layernorm,
                    "ln2": lyr.post_attention_layernorm,
                }
            )
    return out


def _geometry(model: nn.Module) -> _Geometry:
    family = _family(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if family == "bert":
        n_kv = n_heads
    return _Geometry(
        family=family,
        model_type=cfg.model_type,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=head_dim,
        ffn=cfg.intermediate_size,
        rope=family == "llama",
    )


# ----------------------------------------------------------------------------- plans
def _get(obj: Any, name: str):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _plan_layers(plan: Any) -> list[Any]:
    return list(_get(plan, "layers"))


def dense_plan(model: nn.Module) -> dict:
    """A plan (plain dict, same fields as core.structure.PrunePlan) that keeps everything:
    the 'dense' reference for latency, and the nothing-dead case."""
    g = _geometry(model)
    layers = []
    for i in range(g.n_layers):
        groups = list(range(g.n_kv))
        layers.append(
            {
                "index": i,
                "heads_kept": list(range(g.n_heads)),
                "kv_heads_kept": groups,
                "qk_dims": [list(range(g.head_dim)) for _ in groups],
                "vo_dims": [list(range(g.head_dim)) for _ in groups],
                "ffn_kept": list(range(g.ffn)),
            }
        )
    before = sum(
        cast(Tensor, m.weight).shape[0] * cast(Tensor, m.weight).shape[1]
        for lm in _layer_modules(model, g.family)
        for k, m in lm.items()
        if not k.startswith("ln")
    )
    return {
        "family": g.family,
        "layers": layers,
        "gated_params_before": before,
        "gated_params_after": before,
        "paper_params_after": before,
    }


def plan_to_dict(plan: Any) -> dict:
    """JSON-able dict of a PrunePlan (A1's dataclass with to_json) or an already-dict plan."""
    if isinstance(plan, dict):
        return json.loads(json.dumps(plan))
    if hasattr(plan, "to_json"):
        d = plan.to_json()
        return json.loads(d) if isinstance(d, str) else d
    from dataclasses import asdict, is_dataclass

    if is_dataclass(plan) and not isinstance(plan, type):
        return asdict(plan)
    raise PlanError(f"plan: cannot serialise a {type(plan).__name__}")


def _is_zero_rows(w: Tensor, b: Tensor | None, rows: Tensor) -> Tensor:
    """Bool per row index: weight row and bias entry are exactly 0."""
    z = (w[rows] == 0).all(dim=1)
    if b is not None:
        z = z & (b[rows] == 0)
    return z


def _is_zero_cols(w: Tensor, cols: Tensor) -> Tensor:
    return (w[:, cols] == 0).all(dim=0)


def _check_index_list(xs: Any, n: int, where: str) -> list[int]:
    try:
        xs = [int(x) for x in xs]
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: expected a list of integers ({e})") from None
    if any(x < 0 or x >= n for x in xs):
        raise PlanError(f"{where}: index out of range [0, {n}): {xs}")
    if xs != sorted(set(xs)):
        raise PlanError(f"{where}: indices must be sorted and unique: {xs}")
    return xs


def validate_plan(model: nn.Module, plan: Any, check_dead: bool = True) -> None:
    """Raise PlanError (naming layer and field) if ``plan`` does not fit ``model``.

    ``check_dead`` also proves, on the folded weights, that everything the plan drops
    contributes exactly zero: a wrong plan would otherwise silently change outputs.
    """
    g = _geometry(model)
    fam = _get(plan, "family")
    if fam != g.family:
        raise PlanError(f"plan.family: plan is for {fam!r}, model is {g.family!r}")
    layers = _plan_layers(plan)
    if len(layers) != g.n_layers:
        raise PlanError(f"plan.layers: {len(layers)} layer plans for a {g.n_layers}-layer model")
    group = g.n_heads // g.n_kv
    hd = g.head_dim
    mods = _layer_modules(model, g.family)
    for i, lp in enumerate(layers):
        w = f"layer {i}"
        if int(_get(lp, "index")) != i:
            raise PlanError(f"{w}.index: expected {i}, got {_get(lp, 'index')}")
        heads = _check_index_list(_get(lp, "heads_kept"), g.n_heads, f"{w}.heads_kept")
        kv = _check_index_list(_get(lp, "kv_heads_kept"), g.n_kv, f"{w}.kv_heads_kept")
        expect_heads = [k * group + j for k in kv for j in range(group)]
        if heads != expect_heads:
            raise PlanError(
                f"{w}.heads_kept: must be the query heads of the kept KV groups "
                f"{kv} (group size {group}), i.e. {expect_heads}; got {heads}"
            )
        qk, vo = list(_get(lp, "qk_dims")), list(_get(lp, "vo_dims"))
        for name, dims in (("qk_dims", qk), ("vo_dims", vo)):
            if len(dims) != len(kv):
                raise PlanError(f"{w}.{name}: {len(dims)} entries for {len(kv)} kept groups")
            lists = [_check_index_list(d, hd, f"{w}.{name}[{j}]") for j, d in enumerate(dims)]
            if len({len(d) for d in lists}) > 1:
                raise PlanError(
                    f"{w}.{name}: every kept head/group needs the same number of dims "
                    f"(uniform per layer), got {[len(d) for d in lists]}"
                )
            if name == "qk_dims":
                qk = lists
            else:
                vo = lists
        if g.rope:
            half = hd // 2
            for j, dims in enumerate(qk):
                s = set(dims)
                if any((d + half if d < half else d - half) not in s for d in dims):
                    raise PlanError(
                        f"{w}.qk_dims[{j}]: RoPE dims d and d+{half} must be kept together"
                    )
        ffn = _check_index_list(_get(lp, "ffn_kept"), g.ffn, f"{w}.ffn_kept")
        if check_dead:
            _check_dead(mods[i], g, kv, qk, vo, ffn, w)


@torch.no_grad()
def _check_dead(m, g: _Geometry, kv, qk, vo, ffn, where: str) -> None:
    hd, group = g.head_dim, g.n_heads // g.n_kv
    wq, bq = _folded(m["q"])
    wk, bk = _folded(m["k"])
    wv, bv = _folded(m["v"])
    wo, _ = _folded(m["o"])
    dims = torch.arange(hd)

    def v_dead(grp: int) -> Tensor:  # (hd,) bool: V/O dim dead in KV group grp
        dead = _is_zero_rows(wv, bv, grp * hd + dims)
        o_dead = torch.ones(hd, dtype=torch.bool)
        for j in range(group):
            o_dead &= _is_zero_cols(wo, (grp * group + j) * hd + dims)
        return dead | o_dead

    def qk_dead(grp: int) -> Tensor:  # (hd,) bool
        k_dead = _is_zero_rows(wk, bk, grp * hd + dims)
        q_dead = torch.ones(hd, dtype=torch.bool)
        for j in range(group):
            q_dead &= _is_zero_rows(wq, bq, (grp * group + j) * hd + dims)
        if g.rope:  # a pair dies only if both halves are dead on the same side
            h = hd // 2
            k_dead = (k_dead[:h] & k_dead[h:]).repeat(2)
            q_dead = (q_dead[:h] & q_dead[h:]).repeat(2)
        return k_dead | q_dead

    kept = set(kv)
    for grp in range(g.n_kv):
        vd = v_dead(grp)
        if grp not in kept:
            if not bool(vd.all()):
                live = dims[~vd].tolist()
                raise PlanError(
                    f"{where}.kv_heads_kept: head/group {grp} is dropped but its V/O dims "
                    f"{live} are not dead (would change outputs)"
                )
            continue
        j = kv.index(grp)
        drop_vo = sorted(set(range(hd)) - set(vo[j]))
        if drop_vo and not bool(vd[drop_vo].all()):
            bad = [d for d in drop_vo if not bool(vd[d])]
            raise PlanError(f"{where}.vo_dims[{j}]: dropped dims {bad} of group {grp} are live")
        drop_qk = sorted(set(range(hd)) - set(qk[j]))
        if drop_qk:
            qd = qk_dead(grp)
            bad = [d for d in drop_qk if not bool(qd[d])]
            if bad:
                raise PlanError(f"{where}.qk_dims[{j}]: dropped dims {bad} of group {grp} are live")
    drop = sorted(set(range(g.ffn)) - set(ffn))
    if drop:
        idx = torch.tensor(drop)
        wd, _ = _folded(m["down"])
        dead = _is_zero_cols(wd, idx)
        for key in ("up", "gate"):
            if key in m:
                wu, bu = _folded(m[key])
                dead |= _is_zero_rows(wu, bu, idx)
        if not bool(dead.all()):
            bad = idx[~dead].tolist()[:10]
            raise PlanError(f"{where}.ffn_kept: dropped neurons {bad} are live")


# ----------------------------------------------------------------------------- build
def _lin(dst: nn.Linear, w: Tensor, b: Tensor | None) -> None:
    if dst.weight.shape != w.shape:
        raise PlanError(f"internal: weight shape {tuple(w.shape)} != {tuple(dst.weight.shape)}")
    dst.weight.data = w.detach().clone().contiguous()
    if dst.bias is not None:
        dst.bias.data = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.detach().clone()


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


def _pad_dims(dims: list[int], target: int, hd: int, rope: bool) -> list[int]:
    """Extend a kept-dims list with dropped (dead, so exactly-zero-contribution) dims of
    the same head up to ``target``; with RoPE whole dead pairs are added."""
    if len(dims) >= target:
        return dims
    kept = set(dims)
    if rope:
        half = hd // 2
        extra = [d for d in range(half) if d not in kept][: (target - len(dims)) // 2]
        return sorted(kept | set(extra) | {d + half for d in extra})
    return sorted(kept | set([d for d in range(hd) if d not in kept][: target - len(dims)]))


def _effective_layers(
    g: _Geometry, plan: Any, equal_head_dims: bool, ffn_multiple: int = 1, dim_multiple: int = 1
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
    out = []
    for lp in _plan_layers(plan):
        kv = [int(x) for x in _get(lp, "kv_heads_kept")]
        qk = [[int(d) for d in dims] for dims in _get(lp, "qk_dims")]
        vo = [[int(d) for d in dims] for dims in _get(lp, "vo_dims")]
        if equal_head_dims and kv and qk[0] and vo[0] and len(qk[0]) != len(vo[0]):
            target = max(len(qk[0]), len(vo[0]))
            if g.rope and (target - len(qk[0])) % 2:
                target += 1  # q/k grow by whole pairs; v/o follow
            qk = [_pad_dims(d, target, g.head_dim, g.rope) for d in qk]
            vo = [_pad_dims(d, target, g.head_dim, False) for d in vo]
        if dim_multiple > 1 and kv:
            # round per-head widths up (kernel-friendly sizes), with dead dims only
            for name, pair in (("qk", g.rope), ("vo", False)):
                lists = qk if name == "qk" else vo
                n = len(lists[0])
                if n and n % dim_multiple:
                    want = min(g.head_dim, -(-n // dim_multiple) * dim_multiple)
                    if pair and (want - n) % 2:
                        want = min(g.head_dim, want + 1)
                    padded = [_pad_dims(d, want, g.head_dim, pair) for d in lists]
                    if name == "qk":
                        qk = padded
                    else:
                        vo = padded
        ffn = [int(j) for j in _get(lp, "ffn_kept")]
        if ffn_multiple > 1 and len(ffn) % ffn_multiple:
            want = min(g.ffn, -(-len(ffn) // ffn_multiple) * ffn_multiple)
            kept = set(ffn)
            ffn = sorted(kept | set([j for j in range(g.ffn) if j not in kept][: want - len(ffn)]))
        out.append(
            {
                "kv": kv,
                "heads": [int(h) for h in _get(lp, "heads_kept")],
                "qk": qk,
                "vo": vo,
                "ffn": ffn,
                "n": len(kv),
                "d_qk": len(qk[0]) if kv else 0,
                "d_vo": len(vo[0]) if kv else 0,
            }
        )
    return out


@torch.no_grad()
def _build_bert(model: nn.Module, g: _Geometry, plan: Any, equal: bool, mult: int, dmult: int):
    enc = _bert_encoder(model)
    cfg = model.config
    shapes = _effective_layers(g, plan, equal, mult, dmult)
    mods = _layer_modules(model, "bert")
    num_labels = 0
    head = getattr(model, "classifier", None)
    if head is not None:
        num_labels = int(cfg.num_labels)
    ex = mods[0]
    pcfg = PrunedBertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        head_dim=g.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        layers=[BertLayerShape(s["n"], s["d_qk"], s["d_vo"], len(s["ffn"])) for s in shapes],
        hidden_act=cfg.hidden_act,
        model_type=cfg.model_type,
        num_labels=num_labels,
        has_pooler=getattr(enc, "pooler", None) is not None,
        qkv_bias=ex["q"].bias is not None,
        o_bias=ex["o"].bias is not None,
        ffn_bias=ex["up"].bias is not None,
    )
    pm = PrunedBertModel(pcfg)
    e_src, e_dst = enc.embeddings, pm.embeddings
    _copy_emb(e_dst.word_embeddings, e_src.word_embeddings)
    _copy_emb(e_dst.position_embeddings, e_src.position_embeddings)
    _copy_emb(e_dst.token_type_embeddings, e_src.token_type_embeddings)
    _copy_norm(e_dst.LayerNorm, e_src.LayerNorm)
    hd = g.head_dim
    for m, lp, dst in zip(mods, shapes, pm.layers, strict=True):
        heads, qk, vo = lp["heads"], lp["qk"], lp["vo"]
        qk_rows = _rows(list(zip(heads, qk, strict=True)), hd)
        vo_rows = _rows(list(zip(heads, vo, strict=True)), hd)
        wq, bq = _slice(*_folded(m["q"]), rows=qk_rows)
        wk, bk = _slice(*_folded(m["k"]), rows=qk_rows)
        wv, bv = _slice(*_folded(m["v"]), rows=vo_rows)
        if dst.qkv is not None:
            b = None if bq is None else torch.cat([bq, bk, bv])
            _lin(dst.qkv, torch.cat([wq, wk, wv]), b)
        _lin(dst.o, *_slice(*_folded(m["o"]), cols=vo_rows))
        ffn = torch.tensor(lp["ffn"], dtype=torch.long)
        _lin(dst.up, *_slice(*_folded(m["up"]), rows=ffn))
        _lin(dst.down, *_slice(*_folded(m["down"]), cols=ffn))
        _copy_norm(dst.ln1, m["ln1"])
        _copy_norm(dst.ln2, m["ln2"])
    if num_labels:
        if pm.head_dense is not None:  # RoBERTa head
            _lin(pm.head_dense, *_folded(model.classifier.dense))
            _lin(pm.classifier, *_folded(model.classifier.out_proj))
        else:
            if pm.pooler is not None:
                _lin(pm.pooler, *_folded(enc.pooler.dense))
            _lin(pm.classifier, *_folded(model.classifier))
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
def _build_llama(model: nn.Module, g: _Geometry, plan: Any, equal: bool, mult: int, dmult: int):
    cfg = model.config
    shapes = _effective_layers(g, plan, equal, mult, dmult)
    mods = _layer_modules(model, "llama")
    group = g.n_heads // g.n_kv
    rot = model.model.rotary_emb
    inv_freq = rot.inv_freq.detach().float()  # (hd/2,)
    ex = mods[0]
    pcfg = PrunedLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        head_dim=g.head_dim,
        group_size=group,
        rms_norm_eps=cfg.rms_norm_eps,
        layers=[LlamaLayerShape(s["n"], s["d_qk"], s["d_vo"], len(s["ffn"])) for s in shapes],
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=ex["q"].bias is not None,
        o_bias=ex["o"].bias is not None,
        mlp_bias=ex["up"].bias is not None,
        attention_scaling=float(getattr(rot, "attention_scaling", 1.0)),
        hidden_act=cfg.hidden_act,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=_eos_list(cfg.eos_token_id),
        pad_token_id=cfg.pad_token_id,
        model_type=cfg.model_type,
        extra={"rope_theta": _rope_theta(cfg)},
    )
    if pcfg.hidden_act != "silu":
        raise UnsupportedModelError(f"llama-family hidden_act {cfg.hidden_act!r}: only silu")
    pm = PrunedLlamaModel(pcfg)
    _copy_emb(pm.embed_tokens, model.model.embed_tokens)
    _copy_norm(pm.norm, model.model.norm)
    hd, half = g.head_dim, g.head_dim // 2
    for m, lp, blk in zip(mods, shapes, pm.layers, strict=True):
        kv, qk, vo = lp["kv"], lp["qk"], lp["vo"]
        # query heads are group-major: head h reads KV group h // group
        q_pairs = [(k * group + j, qk[i]) for i, k in enumerate(kv) for j in range(group)]
        o_pairs = [(k * group + j, vo[i]) for i, k in enumerate(kv) for j in range(group)]
        a = blk.attn
        wq, bq = _slice(*_folded(m["q"]), rows=_rows(q_pairs, hd))
        wk, bk = _slice(*_folded(m["k"]), rows=_rows(list(zip(kv, qk, strict=True)), hd))
        wv, bv = _slice(*_folded(m["v"]), rows=_rows(list(zip(kv, vo, strict=True)), hd))
        _lin(a.qkv, torch.cat([wq, wk, wv]), None if bq is None else torch.cat([bq, bk, bv]))
        _lin(a.o_proj, *_slice(*_folded(m["o"]), cols=_rows(o_pairs, hd)))
        if kv and qk[0]:
            # sorted kept dims = [kept first halves, same pairs' second halves]
            a.inv_freq.copy_(torch.stack([inv_freq[[d for d in dims if d < half]] for dims in qk]))
        ffn = torch.tensor(lp["ffn"], dtype=torch.long)
        wg, bg = _slice(*_folded(m["gate"]), rows=ffn)
        wu, bu = _slice(*_folded(m["up"]), rows=ffn)
        _lin(blk.mlp.gate_up, torch.cat([wg, wu]), None if bg is None else torch.cat([bg, bu]))
        _lin(blk.mlp.down_proj, *_slice(*_folded(m["down"]), cols=ffn))
        _copy_norm(blk.input_layernorm, m["ln1"])
        _copy_norm(blk.post_attention_layernorm, m["ln2"])
    if not pcfg.tie_word_embeddings or hasattr(model.lm_head, "folded_weight_and_bias"):
        w, _ = _folded(model.lm_head)
        if pcfg.tie_word_embeddings and not torch.equal(w, pm.embed_tokens.weight):
            raise PlanError("lm_head: gated lm_head cannot stay tied to the embeddings")
        if not pcfg.tie_word_embeddings:
            pm.lm_head.weight.data = w.clone()
    return pm.eval()


def _check_supported(model: nn.Module, family: str) -> None:
    if family == "llama" and not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__}: physical pruning of decoders supports causal-LM models "
            "(lm_head); decoder sequence-classification heads are not supported yet"
        )


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
    g = _geometry(gated_model)
    _check_supported(gated_model, g.family)
    if plan is None:
        from core.structure import build_plan, describe

        plan = build_plan(gated_model, describe(gated_model))
    validate_plan(gated_model, plan, check_dead=check_dead)
    if g.family == "bert":
        pm = _build_bert(gated_model, g, plan, equal_head_dims, ffn_multiple, dim_multiple)
    else:
        pm = _build_llama(gated_model, g, plan, equal_head_dims, ffn_multiple, dim_multiple)
    return pm, plan


# ----------------------------------------------------------------------------- checks
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
    g = _geometry(gated_model)
    gate_names = {"row_logits", "col_logits", "lora_A", "lora_B"}
    before = sum(
        p.numel()
        for n, p in {id(p): (n, p) for n, p in gated_model.named_parameters()}.values()
        if n.rsplit(".", 1)[-1] not in gate_names
    )
    per_layer = []
    gb = ga = paper = 0
    mods = _layer_modules(gated_model, g.family)
    for i, (m, blk) in enumerate(zip(mods, pruned.layers, strict=True)):
        row = {"index": i, "gated_before": 0, "gated_after": 0, "paper_after": 0}
        for key, mod in m.items():
            if key.startswith("ln"):
                continue
            gates = _eval_gates(mod)
            if gates is None:
                continue
            o, n = cast(Tensor, mod.weight).shape
            row["gated_before"] += o * n
            zr, zc = gates
            row["paper_after"] += int((zr > 0).sum()) * int((zc > 0).sum())
        row["gated_after"] = _gated_after_layer(g, m, blk)
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


def _gated_after_layer(g: _Geometry, m: dict, blk: nn.Module) -> int:
    """Physically kept weights of this layer's GATED Linears (ungated ones not counted)."""
    gated = {k for k, mod in m.items() if _eval_gates(mod) is not None}
    C = m["q"].weight.shape[1]
    a: Any  # the BertLayer itself, or a LlamaBlock's attention
    if g.family == "bert":
        a = blk
        H, dqk, dvo, F_ = a.n_heads, a.d_qk, a.d_vo, a.ffn
        sizes = {
            "q": H * dqk * C,
            "k": H * dqk * C,
            "v": H * dvo * C,
            "o": H * dvo * C,
            "up": F_ * C,
            "down": F_ * C,
        }
    else:
        a = blk.attn
        F_ = blk.mlp.ffn
        sizes = {
            "q": a.n_q * a.d_qk * C,
            "k": a.n_kv * a.d_qk * C,
            "v": a.n_kv * a.d_vo * C,
            "o": a.n_q * a.d_vo * C,
            "gate": F_ * C,
            "up": F_ * C,
            "down": F_ * C,
        }
    return sum(v for k, v in sizes.items() if k in gated)
