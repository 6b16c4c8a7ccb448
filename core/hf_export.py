"""The Hugging Face copy of an artifact (``hf/``): a plain HF folder next to our own.

Written only when every layer has the same, HF-representable shape; then
``AutoModelFor*.from_pretrained(artifact / "hf")`` loads it with stock transformers
classes. It is an export of the pruned model, not part of how FineGates reads an
artifact (core.artifacts rebuilds our own skeleton from the manifest), so it lives
apart from the artifact format.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from core.manifest import WEIGHTS
from core.pruned import PrunedBertModel

__all__ = ["hf_representable", "hf_state_dict", "write_hf"]


def hf_representable(model: nn.Module) -> bool:
    """Every layer has the same shape AND standard HF modules can express it: attention
    keeps full head_dim (HF derives the scale and RoPE frequencies from it); only whole
    heads/groups (Llama) and FFN neurons may go, equally in every layer."""
    shapes = {tuple(vars(s).values()) for s in model.config.layers}
    if len(shapes) != 1:
        return False
    cfg: Any = model.config  # PrunedBertConfig | PrunedLlamaConfig
    s = cfg.layers[0]
    if isinstance(model, PrunedBertModel):
        # BertSelfAttention fixes head_dim = hidden / heads: only the FFN may shrink; the
        # copy is written as a BERT or RoBERTa folder, so other encoder types get none
        return (
            cfg.model_type in ("bert", "roberta")
            and s.d_qk == s.d_vo == cfg.head_dim
            and s.n_heads * cfg.head_dim == cfg.hidden_size
            and s.ffn > 0
            and cfg.qkv_bias
            and cfg.o_bias
            and cfg.ffn_bias
        )
    theta = cfg.extra.get("rope_theta")
    if not (
        s.d_qk == s.d_vo == cfg.head_dim
        and s.n_kv > 0
        and s.ffn > 0
        and cfg.attention_bias == cfg.o_bias
        and cfg.model_type == "llama"
        and theta
        and cfg.attention_scaling == 1.0
    ):
        return False
    # HF recomputes default RoPE frequencies: scaled variants (llama3, yarn) do not fit
    hd = cfg.head_dim
    default = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    return all(
        torch.allclose(blk.attn.inv_freq, default.expand_as(blk.attn.inv_freq))
        for blk in model.layers
    )


def _hf_config(model: nn.Module, id2label: dict | None):
    cfg = model.config
    s = cfg.layers[0]
    if isinstance(model, PrunedBertModel):
        from transformers import BertConfig, RobertaConfig

        cls = RobertaConfig if cfg.model_type == "roberta" else BertConfig
        kw: dict[str, Any] = {}
        if id2label and cfg.num_labels:
            kw["id2label"] = {int(k): v for k, v in id2label.items()}
            kw["label2id"] = {v: int(k) for k, v in id2label.items()}
        elif cfg.num_labels:
            kw["num_labels"] = cfg.num_labels
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=len(cfg.layers),
            num_attention_heads=s.n_heads,
            intermediate_size=s.ffn,
            hidden_act=cfg.hidden_act,
            max_position_embeddings=cfg.max_position_embeddings,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.layer_norm_eps,
            pad_token_id=cfg.pad_token_id,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            **kw,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=len(cfg.layers),
        num_attention_heads=s.n_kv * cfg.group_size,
        num_key_value_heads=s.n_kv,
        head_dim=cfg.head_dim,
        intermediate_size=s.ffn,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        # transformers 5 folds the legacy rope_theta kwarg into rope_parameters; 4.x takes it
        rope_theta=float(cfg.extra.get("rope_theta", 10000.0)),  # type: ignore[call-arg]
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> Hugging Face names (splits the fused qkv / gate_up projections)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if isinstance(model, PrunedBertModel):
        pre = "roberta" if model.config.model_type == "roberta" else "bert"
        for k in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            out[f"{pre}.embeddings.{k}.weight"] = sd[f"embeddings.{k}.weight"]
        for t in ("weight", "bias"):
            out[f"{pre}.embeddings.LayerNorm.{t}"] = sd[f"embeddings.LayerNorm.{t}"]
        for i, lyr in enumerate(model.layers):
            p = f"{pre}.encoder.layer.{i}"
            n = lyr.n_heads * lyr.d_qk
            for t in ("weight", "bias"):
                q, k, v = sd[f"layers.{i}.qkv.{t}"].split([n, n, lyr.n_heads * lyr.d_vo])
                out[f"{p}.attention.self.query.{t}"] = q
                out[f"{p}.attention.self.key.{t}"] = k
                out[f"{p}.attention.self.value.{t}"] = v
                out[f"{p}.attention.output.dense.{t}"] = sd[f"layers.{i}.o.{t}"]
                out[f"{p}.attention.output.LayerNorm.{t}"] = sd[f"layers.{i}.ln1.{t}"]
                out[f"{p}.intermediate.dense.{t}"] = sd[f"layers.{i}.up.{t}"]
                out[f"{p}.output.dense.{t}"] = sd[f"layers.{i}.down.{t}"]
                out[f"{p}.output.LayerNorm.{t}"] = sd[f"layers.{i}.ln2.{t}"]
        if model.classifier is not None:
            for t in ("weight", "bias"):
                if model.head_dense is not None:
                    out[f"classifier.dense.{t}"] = sd[f"head_dense.{t}"]
                    out[f"classifier.out_proj.{t}"] = sd[f"classifier.{t}"]
                else:
                    if model.pooler is not None:
                        out[f"{pre}.pooler.dense.{t}"] = sd[f"pooler.{t}"]
                    out[f"classifier.{t}"] = sd[f"classifier.{t}"]
        else:  # bare BertModel / RobertaModel: no prefix
            out = {k.split(".", 1)[1]: v for k, v in out.items()}
        return {k: v.contiguous().clone() for k, v in out.items()}
    out["model.embed_tokens.weight"] = sd["embed_tokens.weight"]
    out["model.norm.weight"] = sd["norm.weight"]
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, blk in enumerate(model.layers):
        p, s = f"model.layers.{i}", f"layers.{i}"
        for t in ("weight", "bias"):
            if f"{s}.attn.qkv.{t}" in sd:
                q, k, v = sd[f"{s}.attn.qkv.{t}"].split(blk.attn.splits)
                out[f"{p}.self_attn.q_proj.{t}"] = q
                out[f"{p}.self_attn.k_proj.{t}"] = k
                out[f"{p}.self_attn.v_proj.{t}"] = v
            if f"{s}.attn.o_proj.{t}" in sd:
                out[f"{p}.self_attn.o_proj.{t}"] = sd[f"{s}.attn.o_proj.{t}"]
        f = blk.mlp.ffn
        for t in ("weight", "bias"):
            if f"{s}.mlp.gate_up.{t}" in sd:
                g, u = sd[f"{s}.mlp.gate_up.{t}"].split([f, f])
                out[f"{p}.mlp.gate_proj.{t}"] = g
                out[f"{p}.mlp.up_proj.{t}"] = u
            if f"{s}.mlp.down_proj.{t}" in sd:
                out[f"{p}.mlp.down_proj.{t}"] = sd[f"{s}.mlp.down_proj.{t}"]
        out[f"{p}.input_layernorm.weight"] = sd[f"{s}.input_layernorm.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = sd[f"{s}.post_attention_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf(model: nn.Module, tokenizer: Any, directory: Path, id2label: dict | None) -> None:
    """config.json + HF-named model.safetensors + tokenizer files in ``directory``."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    cfg = _hf_config(model, id2label)
    arch = {
        "bert": "BertForSequenceClassification",
        "roberta": "RobertaForSequenceClassification",
        "llama": "LlamaForCausalLM",
    }[model.config.model_type if model.config.model_type in ("bert", "roberta") else "llama"]
    if isinstance(model, PrunedBertModel) and model.classifier is None:
        arch = "RobertaModel" if model.config.model_type == "roberta" else "BertModel"
    cfg.architectures = [arch]
    cfg.save_pretrained(str(directory))
    save_file(hf_state_dict(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
