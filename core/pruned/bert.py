"""Pruned BERT-style encoder (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT) with
per-layer shapes.

Hugging Face's BertModel assumes every layer has ``num_attention_heads * head_dim``
attention width and one ``intermediate_size``; a pruned model breaks both. This module
is a plain-PyTorch re-implementation in which each layer carries its own
``n_heads``, ``d_qk`` (kept query/key dims per head), ``d_vo`` (kept value/output dims
per head) and ``ffn`` width, while the residual width (``hidden_size``) never changes.

Two details keep it numerically equal to the gated eval model:
- attention keeps the ORIGINAL ``1/sqrt(head_dim)`` scale, whatever ``d_qk`` is;
- a layer whose heads lost every q/k dim (``d_qk == 0``) attends uniformly over the
  unmasked keys (softmax of zeros), it does not output zeros.

Query, key and value live in one fused Linear (``qkv``): one GEMM instead of three is
what pays on CPU for small widths. State-dict names are therefore ours, not Hugging
Face's; ``core.artifacts`` writes HF-named copies when every layer has the same shape.

What differs per model type (RoBERTa position numbering, the head's activation and
whether it is BERT's pooler) is read from the family table (core.families) by
``model_type``, so an artifact carries no second copy of those rules. ELECTRA's
``embedding_size`` (with its projection to ``hidden_size``) and DistilBERT's missing
token-type embeddings (``type_vocab_size`` 0) are plain config values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.families import ENCODER_ACTIVATIONS, ModelType, lookup

__all__ = ["BertLayerShape", "PrunedBertConfig", "PrunedBertModel"]


@dataclass
class BertLayerShape:
    n_heads: int  # attention heads kept
    d_qk: int  # kept query/key dims per head (same for every kept head)
    d_vo: int  # kept value/output dims per head
    ffn: int  # kept intermediate neurons


@dataclass
class PrunedBertConfig:
    vocab_size: int
    hidden_size: int
    head_dim: int  # ORIGINAL head dim: fixes the attention scale
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    layers: list[BertLayerShape]
    hidden_act: str = "gelu"
    model_type: str = "bert"  # "bert" | "roberta" (position ids, head layout)
    num_labels: int = 0  # 0 = encoder only (no head)
    has_pooler: bool = True
    qkv_bias: bool = True
    o_bias: bool = True
    ffn_bias: bool = True
    embedding_size: int = 0  # ELECTRA: width of the embeddings (0: hidden_size, no projection)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrunedBertConfig:
        d = dict(d)
        d["layers"] = [BertLayerShape(**x) for x in d["layers"]]
        return cls(**d)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _act(name: str):
    kind = ENCODER_ACTIVATIONS.get(name)
    if kind is None:
        raise ValueError(
            f"unsupported hidden_act {name!r} (supported: {', '.join(ENCODER_ACTIVATIONS)})"
        )
    return _ACT_FNS[kind]


_HEAD_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "relu": F.relu,
}


def _spec(cfg: PrunedBertConfig) -> ModelType:
    spec = lookup(cfg.model_type)
    if spec is None or spec.family != "bert":
        raise ValueError(f"model_type {cfg.model_type!r} is not a supported encoder type")
    return spec


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """nn.Linear that may be empty (a fully pruned FFN or attention): no init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(n_in, n_out, bias=bias)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: PrunedBertConfig):
        super().__init__()
        E = cfg.embedding_size or cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, E)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, E)
        self.token_type_embeddings: nn.Embedding | None = None
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, E)
        self.LayerNorm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        # ELECTRA projects small embeddings up to the encoder width
        self.project = nn.Linear(E, cfg.hidden_size) if E != cfg.hidden_size else None
        self.roberta = _spec(cfg).positions == "after_padding"
        self.pad_token_id = cfg.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        B, T = input_ids.shape
        if self.roberta:
            # RoBERTa numbers real tokens from padding_idx + 1; padding keeps padding_idx
            mask = input_ids.ne(self.pad_token_id).to(torch.long)
            pos = torch.cumsum(mask, dim=1) * mask + self.pad_token_id  # (B, T)
        else:
            pos = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        x = self.word_embeddings(input_ids)  # (B, T, E)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.LayerNorm(x + self.position_embeddings(pos))
        return x if self.project is None else self.project(x)  # (B, T, C)


class BertLayer(nn.Module):
    def __init__(self, cfg: PrunedBertConfig, shape: BertLayerShape):
        super().__init__()
        C = cfg.hidden_size
        self.n_heads, self.d_qk, self.d_vo, self.ffn = (
            shape.n_heads,
            shape.d_qk,
            shape.d_vo,
            shape.ffn,
        )
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        H = self.n_heads
        qkv_out = H * (2 * self.d_qk + self.d_vo)
        self.qkv = _linear(C, qkv_out, cfg.qkv_bias) if qkv_out > 0 else None
        # a layer with no heads left still adds the (folded) output bias
        self.o = _linear(H * self.d_vo, C, cfg.o_bias)
        self.ln1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.up = _linear(C, self.ffn, cfg.ffn_bias)
        self.down = _linear(self.ffn, C, cfg.ffn_bias)
        self.ln2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.act = _act(cfg.hidden_act)

    def attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        H, dqk, dvo = self.n_heads, self.d_qk, self.d_vo
        if H == 0 or dvo == 0:
            return self.o(x.new_zeros(B, T, 0))  # (B, T, C): just the output bias
        qkv = cast(nn.Linear, self.qkv)(x)  # (B, T, H*(2*dqk + dvo)); exists when H, dvo > 0
        q, k, v = qkv.split([H * dqk, H * dqk, H * dvo], dim=-1)
        v = v.view(B, T, H, dvo).transpose(1, 2)  # (B, H, T, dvo)
        if dqk == 0:
            # every q/k dim dead: scores are all 0, attention is uniform over unmasked keys
            q = x.new_zeros(B, H, T, 1)
            k = x.new_zeros(B, H, T, 1)
        else:
            q = q.view(B, T, H, dqk).transpose(1, 2)  # (B, H, T, dqk)
            k = k.view(B, T, H, dqk).transpose(1, 2)  # (B, H, T, dqk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, H * dvo)  # (B, T, H*dvo)
        return self.o(y)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.ln1(x + self.attention(x, mask))
        return self.ln2(x + self.down(self.act(self.up(x))))


class PrunedBertModel(nn.Module):
    """Encoder + optional sequence-classification/regression head, HF-equivalent."""

    family = "bert"

    def __init__(self, cfg: PrunedBertConfig):
        super().__init__()
        self.config = cfg
        C = cfg.hidden_size
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg, s) for s in cfg.layers)
        self.pooler: nn.Linear | None = None
        self.head_dense: nn.Linear | None = None
        self.classifier: nn.Linear | None = None
        spec = _spec(cfg)
        head = spec.head or ("", "tanh", "")
        self.head_act = _HEAD_ACTS[head[1]]
        if cfg.num_labels > 0:
            if not spec.pooler_head:
                # RoBERTa / ELECTRA head (dense + act + out_proj), DistilBERT's
                # pre_classifier + ReLU + classifier: all on the first token
                self.head_dense = nn.Linear(C, C)
            elif cfg.has_pooler:
                # BertForSequenceClassification: pooler (dense + tanh on [CLS]) + linear
                self.pooler = nn.Linear(C, C)
            self.classifier = nn.Linear(C, cfg.num_labels)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Last hidden states (B, T, C)."""
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels), or hidden states (B, T, C) when there is no head."""
        x = self.encode(input_ids, attention_mask, token_type_ids)
        if self.classifier is None:
            return x
        h = x[:, 0]  # (B, C): [CLS] / <s>
        if self.head_dense is not None:
            h = self.head_act(self.head_dense(h))
        elif self.pooler is not None:
            h = torch.tanh(self.pooler(h))
        return self.classifier(h)
