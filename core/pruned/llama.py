"""Pruned Llama-family decoder with per-layer shapes, GQA, RoPE on kept pairs, KV cache.

Each layer keeps ``n_kv`` whole KV groups (each with its ``group`` query heads),
``d_qk`` query/key dims and ``d_vo`` value/output dims per group, and ``ffn`` SwiGLU
neurons. The residual width never changes.

RoPE: dims ``i`` and ``i + head_dim/2`` rotate together, so a kept q/k dim set is a
set of pairs. Kept dims are stored sorted, which puts the kept first halves before
the kept second halves; ``rotate_half`` on the pruned vector then pairs them exactly
as the original did. Each layer stores ``inv_freq`` (n_kv, d_qk/2) holding the
ORIGINAL frequency of every kept pair of every kept group, so no gather happens at
run time and rope scaling variants come along for free. The model concatenates all
layers' frequencies once, so one cos and one sin op per forward serve every layer
(per-token op count matters for batch-1 decode speed).

The attention scale stays the ORIGINAL ``1/sqrt(head_dim)``; a layer with ``d_qk == 0``
attends uniformly over the causal prefix.

Qwen3's per-head RMSNorm on q and k (``qk_norm``) keeps, per kept group, the weights of
the kept dims and divides by the ORIGINAL ``head_dim``: the dims pruning removed were
exactly 0 before the norm (core.structure keeps a q/k dim unless it is closed on both
sides), so the sum of squares and hence the norm are unchanged. Mistral/Qwen sliding
windows (``sliding_window`` on ``sliding_layers``) mask keys more than the window behind
the query, by cache slot, as Hugging Face does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.sampling import sample

__all__ = ["LlamaLayerShape", "PrunedLlamaConfig", "PrunedLlamaModel", "KVCache"]


@dataclass
class LlamaLayerShape:
    n_kv: int  # KV groups kept (each keeps all its query heads)
    d_qk: int  # kept q/k dims per group (even: RoPE pairs)
    d_vo: int  # kept v/o dims per group
    ffn: int  # kept SwiGLU neurons


@dataclass
class PrunedLlamaConfig:
    vocab_size: int
    hidden_size: int
    head_dim: int  # ORIGINAL head dim: fixes the attention scale
    group_size: int  # query heads per KV head (num_heads // num_kv_heads)
    rms_norm_eps: float
    layers: list[LlamaLayerShape]
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_scaling: float = 1.0  # rope attention scaling (1.0 for default rope)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    model_type: str = "llama"
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # keys more than this many slots back are masked ...
    sliding_layers: list[int] = field(default_factory=list)  # ... in these layers
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrunedLlamaConfig:
        d = dict(d)
        d["layers"] = [LlamaLayerShape(**x) for x in d["layers"]]
        return cls(**d)


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """nn.Linear that may be empty (a fully pruned FFN or attention): no init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(n_in, n_out, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadNorm(nn.Module):
    """RMSNorm over a head's kept dims, normalised by the ORIGINAL head_dim; one weight
    row per kept KV group (its query heads share it)."""

    def __init__(self, n_kv: int, d: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_kv, d))
        self.head_dim = head_dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (B, T, n_kv, heads, d)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.head_dim + self.eps)
        return self.weight[:, None, :] * x.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class KVCache:
    """Preallocated per-layer key/value buffers: decode writes in place, no torch.cat."""

    def __init__(self, model: PrunedLlamaModel, batch: int, max_len: int):
        p = next(model.parameters())
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for layer in cast("Iterable[LlamaBlock]", model.layers):
            a = layer.attn
            self.k.append(p.new_zeros(batch, a.n_kv, max_len, max(a.d_qk, 1)))
            self.v.append(p.new_zeros(batch, a.n_kv, max_len, a.d_vo))
        self.length = 0
        self.max_len = max_len

    def update(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > max_len {self.max_len}")
        self.k[i][:, :, self.length : end] = k
        self.v[i][:, :, self.length : end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]  # (B, n_kv, S, d)


class LlamaAttention(nn.Module):
    inv_freq: Tensor  # registered buffer (n_kv, d_qk/2)

    def __init__(self, cfg: PrunedLlamaConfig, shape: LlamaLayerShape):
        super().__init__()
        C, g = cfg.hidden_size, cfg.group_size
        self.n_kv, self.group, self.d_qk, self.d_vo = shape.n_kv, g, shape.d_qk, shape.d_vo
        self.n_q = self.n_kv * g
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # q, k and v in one GEMM (fewer kernel launches per decode step):
        # rows [q: n_q*d_qk | k: n_kv*d_qk | v: n_kv*d_vo]
        self.splits = [self.n_q * self.d_qk, self.n_kv * self.d_qk, self.n_kv * self.d_vo]
        self.qkv = _linear(C, sum(self.splits), cfg.attention_bias)
        self.o_proj = _linear(self.n_q * self.d_vo, C, cfg.o_bias)
        # original frequency of each kept rope pair of each kept group
        self.register_buffer("inv_freq", torch.zeros(self.n_kv, self.d_qk // 2))
        self.q_norm: HeadNorm | None = None
        self.k_norm: HeadNorm | None = None
        if cfg.qk_norm and self.d_qk:
            self.q_norm = HeadNorm(self.n_kv, self.d_qk, cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = HeadNorm(self.n_kv, self.d_qk, cfg.head_dim, cfg.rms_norm_eps)
        # ONNX export cannot take enable_gqa: it switches to an explicit expand
        self.expand_kv = False

    def _rope(
        self, x: Tensor, cos: Tensor, sin: Tensor, heads: int, norm: HeadNorm | None
    ) -> Tensor:
        B, T, _ = x.shape
        x = x.view(B, T, self.n_kv, heads, self.d_qk)  # (B, T, n_kv, heads, d_qk)
        if norm is not None:
            x = norm(x)
        x = x * cos + _rotate_half(x) * sin
        return x.view(B, T, self.n_kv * heads, self.d_qk).transpose(1, 2)  # (B, h, T, d)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        index: int,
    ) -> Tensor:
        """``rope``: this layer's (cos, sin), each (B, T, n_kv, 1, d_qk)."""
        B, T, _ = x.shape
        if self.n_kv == 0 or self.d_vo == 0:
            return self.o_proj(x.new_zeros(B, T, 0))
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        v = v.view(B, T, self.n_kv, self.d_vo).transpose(1, 2)  # (B, kv, T, dvo)
        if self.d_qk == 0:
            # no q/k dim left: scores are 0, attention is uniform over the allowed keys
            k = x.new_zeros(B, self.n_kv, T, 1)
            q = x.new_zeros(B, self.n_q, T, 1)
        else:
            assert rope is not None  # the model passes rope whenever d_qk > 0
            cos, sin = rope
            q = self._rope(q, cos, sin, self.group, self.q_norm)  # (B, n_q, T, d_qk)
            k = self._rope(k, cos, sin, 1, self.k_norm)  # (B, n_kv, T, d_qk)
        if cache is not None:
            k, v = cache.update(index, k, v)  # (B, n_kv, S, d)
        causal = mask is None and k.shape[2] == T  # no past keys: plain causal prefill
        if self.expand_kv and self.group > 1:
            # (B, kv, S, d) -> (B, kv*group, S, d); only for exporters without enable_gqa
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and T > 1, scale=self.scale
            )
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal and T > 1,
                scale=self.scale,
                enable_gqa=self.group > 1,
            )  # (B, n_q, T, d_vo)
        y = y.transpose(1, 2).reshape(B, T, self.n_q * self.d_vo)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: PrunedLlamaConfig, ffn: int):
        super().__init__()
        C = cfg.hidden_size
        self.ffn = ffn
        # gate and up in one GEMM: rows [0, ffn) are gate, [ffn, 2*ffn) are up
        self.gate_up = _linear(C, 2 * ffn, cfg.mlp_bias)
        self.down_proj = _linear(ffn, C, cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        g, u = self.gate_up(x).split([self.ffn, self.ffn], dim=-1)  # (B, T, ffn) each
        return self.down_proj(F.silu(g) * u)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: PrunedLlamaConfig, shape: LlamaLayerShape):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg, shape)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, shape.ffn)

    def forward(self, x, rope, mask, cache, index) -> Tensor:
        x = x + self.attn(self.input_layernorm(x), rope, mask, cache, index)
        return x + self.mlp(self.post_attention_layernorm(x))


class PrunedLlamaModel(nn.Module):
    """Causal LM. ``forward`` returns logits (B, T, vocab); ``generate``/``stream`` decode."""

    family = "llama"

    def __init__(self, cfg: PrunedLlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg, s) for s in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_key: tuple = ()
        self._rope_freqs: Tensor | None = None
        self._rope_slices: list[tuple[int, int]] = []
        self._sliding = set(cfg.sliding_layers) if cfg.sliding_window else set()

    def _all_freqs(self) -> tuple[Tensor, list[tuple[int, int]]]:
        """Every layer's [inv_freq, inv_freq] (n_kv*d_qk values) in one vector, so cos/sin
        for all layers come from ONE elementwise op per forward; rebuilt when a layer's
        inv_freq buffer changes (load_state_dict, copy_)."""
        blocks = cast("Iterable[LlamaBlock]", self.layers)
        bufs: list[Tensor] = [blk.attn.inv_freq for blk in blocks]
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        key = () if tracing else tuple((b.data_ptr(), b._version, b.device) for b in bufs)
        if tracing or key != self._rope_key or self._rope_freqs is None:
            parts, slices, off = [], [], 0
            for blk, b in zip(blocks, bufs, strict=True):
                n = blk.attn.n_kv * blk.attn.d_qk  # python ints (tracing-safe)
                parts.append(torch.cat([b, b], dim=-1).reshape(n))
                slices.append((off, off + n))
                off += n
            self._rope_freqs = torch.cat(parts) if parts else bufs[0].new_zeros(0)
            self._rope_slices = slices
            self._rope_key = key
        return self._rope_freqs, self._rope_slices

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits. ``attention_mask`` (B, S_total) marks real tokens (left padding)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        mask = None
        dev = input_ids.device
        qpos = torch.arange(past, S, device=dev)[:, None]  # (T, 1) absolute query positions
        kpos = torch.arange(S, device=dev)[None, :]  # (1, S)
        if attention_mask is not None:
            am = attention_mask.to(torch.bool)[:, None, None, :S]  # (B, 1, 1, S)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:S]  # (B, T)
            # causal AND not padding; a padding query row would see no key at all, so it
            # may see itself (avoids NaN rows; its output is never used)
            mask = ((kpos <= qpos)[None, None] & am) | (kpos == qpos)[None, None]
        else:
            pos = torch.arange(past, S, device=dev)[None].expand(B, T)
            if cache is not None and past > 0 and T > 1:
                mask = (kpos <= qpos)[None, None]  # chunk after a prefix: bottom-right causal
        window_mask = mask
        w = self.config.sliding_window
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if self._sliding and w and (tracing or S > w):
            base = mask if mask is not None else (kpos <= qpos)[None, None]
            window_mask = base & (kpos > qpos - w)[None, None]  # (B|1, 1, T, S)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        freqs, slices = self._all_freqs()
        ang = pos[:, :, None].float() * freqs  # (B, T, sum over layers of n_kv*d_qk)
        scale = self.config.attention_scaling
        cos_all = (ang.cos() * scale).to(x.dtype)
        sin_all = (ang.sin() * scale).to(x.dtype)
        for i, layer in enumerate(self.layers):
            a = layer.attn
            lo, hi = slices[i]
            rope = None
            if a.d_qk:
                shape = (B, T, a.n_kv, 1, a.d_qk)
                rope = (cos_all[..., lo:hi].view(shape), sin_all[..., lo:hi].view(shape))
            x = layer(x, rope, window_mask if i in self._sliding else mask, cache, i)
        if cache is not None:
            cache.length = S
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    # ---------------------------------------------------------------- generation
    @torch.inference_mode()
    def stream(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield the next token of every row (B,), one decode step at a time.

        Stops when every row has produced a stop token or after max_new_tokens; the stop
        token itself is yielded. Rows that already stopped keep yielding their stop token.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        stops = set(self.config.eos_token_id if stop_token_ids is None else stop_token_ids)
        stop_t = torch.tensor(sorted(stops) or [-1], device=input_ids.device)
        cache = KVCache(self, B, T + max_new_tokens)
        logits = self(input_ids, attention_mask, cache, last_only=True)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        prev = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        am = attention_mask
        for step in range(max_new_tokens):
            nxt = torch.where(done, prev, sample(logits, temperature, top_p, generator))
            yield nxt
            done = done | torch.isin(nxt, stop_t)
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            prev = nxt
            if am is not None:
                am = torch.cat([am, am.new_ones(B, 1)], dim=1)
            logits = self(nxt[:, None], am, cache)[:, -1]

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prompt + new tokens (B, T + n); rows that stopped early are padded with their
        stop token."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        new = list(
            self.stream(
                input_ids,
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop_token_ids=stop_token_ids,
                attention_mask=attention_mask,
                generator=generator,
            )
        )
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
