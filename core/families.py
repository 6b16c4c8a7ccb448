"""The one table of model types FineGates trains, prunes and serves.

Why one table: the rule "a model type accepted at job creation must train, prune and
serve" only holds if every place that decides asks the same question. The catalog
(registration, the family shown at /v1/models), ``load_base``, gate injection, the
structure/plan code, the pruned builders and the pruned models themselves all read
``MODEL_TYPES``; a type that is not listed is refused up front with the list of the
supported ones.

A ``Layout`` is how one Hugging Face architecture names the modules of a transformer
layer (suffixes after the layer prefix, e.g. ``bert.encoder.layer.3.``); a
``ModelType`` adds the details the pruned model must reproduce for that type: RoBERTa
position numbering, the classification head's modules and activation, which layers a
sliding window applies to. Geometry (widths, head counts) is read from the modules
and the config at run time, not stored here.

``check_config`` also refuses, per model, configurations of a listed type whose forward
the pruned models do not reproduce exactly (non-SiLU decoders, RoPE variants whose
frequencies change with the sequence length, encoders run as decoders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from core.errors import UnsupportedModelError

ENCODER = "bert"  # pruned family of encoders (core.pruned.bert)
DECODER = "llama"  # pruned family of decoders (core.pruned.llama)


@dataclass(frozen=True)
class Layout:
    """Module names of one architecture's transformer layer, relative to its prefix."""

    name: str
    family: str  # ENCODER | DECODER: which pruned model rebuilds it
    layers: str  # regex of the layer-list path; the layer index follows it
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # encoders: (intermediate,); SwiGLU decoders: (gate, up)
    ffn_out: str
    norm1: str  # encoders: after attention (post-LN); decoders: before attention
    norm2: str
    backbone: tuple[str, ...] = ()  # attribute of a task model holding the base model
    q_norm: str | None = None  # per-head RMSNorm on q / k before RoPE (Qwen3)
    k_norm: str | None = None
    activation_attr: str = "hidden_act"  # config attribute naming the FFN activation

    @property
    def rope(self) -> bool:
        return self.family == DECODER

    @property
    def qk_norm(self) -> bool:
        return self.q_norm is not None

    def projections(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.ffn_in, self.ffn_out)

    def layer_pattern(self) -> re.Pattern[str]:
        """Fullmatches the q projection's name; groups ``prefix`` and ``idx``."""
        return re.compile(rf"(?P<prefix>{self.layers}\.)(?P<idx>\d+)\.{re.escape(self.q)}")

    def default_targets(self) -> list[str]:
        """Gate targets: every projection of every layer, anchored on the layer index so
        an ``output.dense`` never also hits ``attention.output.dense`` (nor a head)."""
        return [rf"{self.layers}\.\d+\.{re.escape(s)}" for s in self.projections()]


@dataclass(frozen=True)
class ModelType:
    """One accepted ``config.model_type``."""

    name: str
    layout: Layout
    # encoders: "absolute" (arange) or "after_padding" (RoBERTa: real tokens are numbered
    # from pad_token_id + 1, padding keeps pad_token_id)
    positions: str = "absolute"
    # encoders' sequence-classification head: (dense module, activation, output module);
    # the dense one is the backbone's pooler when it starts with "{backbone}."
    head: tuple[str, str, str] | None = None
    # decoders: which layers config.sliding_window applies to: "none", "all" (Mistral),
    # "layer_types" (Qwen2/Qwen3: the layers marked "sliding_attention")
    window: str = "none"

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def pooler_head(self) -> bool:
        return self.head is not None and self.head[0].startswith("{backbone}.")


BERT = Layout(
    name="bert",
    family=ENCODER,
    layers=r"(.*\.)?layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    norm1="attention.output.LayerNorm",
    norm2="output.LayerNorm",
    backbone=("bert", "roberta", "electra"),
)
DISTILBERT = Layout(
    name="distilbert",
    family=ENCODER,
    layers=r"(.*\.)?transformer\.layer",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    ffn_in=("ffn.lin1",),
    ffn_out="ffn.lin2",
    norm1="sa_layer_norm",
    norm2="output_layer_norm",
    backbone=("distilbert",),
    activation_attr="activation",
)
LLAMA = Layout(
    name="llama",
    family=DECODER,
    layers=r"(.*\.)?layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    norm1="input_layernorm",
    norm2="post_attention_layernorm",
    backbone=("model",),
)
QWEN3 = replace(LLAMA, name="qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
LAYOUTS: dict[str, Layout] = {x.name: x for x in (BERT, DISTILBERT, LLAMA, QWEN3)}

_BERT_HEAD = ("{backbone}.pooler.dense", "tanh", "classifier")
_ROBERTA_HEAD = ("classifier.dense", "tanh", "classifier.out_proj")

MODEL_TYPES: dict[str, ModelType] = {
    t.name: t
    for t in (
        ModelType("bert", BERT, head=_BERT_HEAD),
        ModelType("roberta", BERT, positions="after_padding", head=_ROBERTA_HEAD),
        ModelType("xlm-roberta", BERT, positions="after_padding", head=_ROBERTA_HEAD),
        ModelType("camembert", BERT, positions="after_padding", head=_ROBERTA_HEAD),
        # ElectraClassificationHead: dense + GELU (not tanh) + out_proj
        ModelType("electra", BERT, head=("classifier.dense", "gelu", "classifier.out_proj")),
        ModelType("distilbert", DISTILBERT, head=("pre_classifier", "relu", "classifier")),
        ModelType("llama", LLAMA),
        ModelType("mistral", LLAMA, window="all"),
        ModelType("qwen2", LLAMA, window="layer_types"),
        ModelType("qwen3", QWEN3, window="layer_types"),
    )
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(sorted(MODEL_TYPES))

# Tasks each pruned family serves: pruned decoders keep only the language-model head, so a
# decoder classification job would train and then fail to prune.
FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    ENCODER: ("classification",),
    DECODER: ("causal_lm", "sparsify"),
}

# FFN activations the pruned encoder reproduces, by config name (decoders: SiLU only)
ENCODER_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# RoPE variants whose frequencies depend on the sequence length (recomputed per forward)
_SEQ_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def supported_text() -> str:
    encoders = [t for t, s in MODEL_TYPES.items() if s.family == ENCODER]
    decoders = [t for t, s in MODEL_TYPES.items() if s.family == DECODER]
    return f"encoders {', '.join(encoders)}; decoders {', '.join(decoders)}"


def task_error(family: str, task: str) -> str | None:
    """Why ``family`` cannot run ``task`` (None when it can, or the task is unknown)."""
    known = {t for ts in FAMILY_TASKS.values() for t in ts}
    if task not in known or task in FAMILY_TASKS.get(family, ()):
        return None
    kind = "an encoder" if family == ENCODER else "a decoder"
    other = [f for f, ts in FAMILY_TASKS.items() if task in ts][0]
    needs = "an encoder" if other == ENCODER else "a decoder"
    return (
        f"task {task!r} needs {needs}, this model is {kind} "
        f"(it supports: {', '.join(FAMILY_TASKS.get(family, ()))})"
    )


def _model_type(model_or_config: Any) -> str | None:
    if isinstance(model_or_config, dict):
        mt = model_or_config.get("model_type")
    else:
        cfg = getattr(model_or_config, "config", model_or_config)
        mt = getattr(cfg, "model_type", None)
    return None if mt is None else str(mt)


def lookup(model_or_config: Any) -> ModelType | None:
    """The table entry for a model, an HF config, a config dict or a model_type string."""
    mt = model_or_config if isinstance(model_or_config, str) else _model_type(model_or_config)
    return MODEL_TYPES.get(mt) if mt is not None else None


def family_of(model_or_config: Any) -> str | None:
    """ENCODER ("bert") | DECODER ("llama") | None for types outside the table."""
    spec = lookup(model_or_config)
    return None if spec is None else spec.family


def require(model_or_config: Any) -> ModelType:
    """The table entry, or UnsupportedModelError naming the supported types."""
    spec = lookup(model_or_config)
    if spec is None:
        mt = model_or_config if isinstance(model_or_config, str) else _model_type(model_or_config)
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; supported model types: {supported_text()}"
        )
    return spec


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _rope_type(cfg: Any) -> str:
    rp = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
    if not isinstance(rp, dict):
        return "default"
    return str(rp.get("rope_type") or rp.get("type") or "default")


def check_config(cfg: Any) -> ModelType:
    """Refuse, before any training, a config the pruned models cannot reproduce exactly.

    Accepts an HF config or the config.json dict; returns the table entry.
    """
    spec = require(cfg)
    mt = spec.name
    if spec.family == ENCODER:
        if _get(cfg, "is_decoder", False) or _get(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(
                f"{mt}: is_decoder / add_cross_attention encoders are not supported"
            )
        act = _get(cfg, spec.layout.activation_attr, "gelu")
        if act not in ENCODER_ACTIVATIONS:
            raise UnsupportedModelError(
                f"{mt}: {spec.layout.activation_attr} {act!r} is not supported "
                f"(supported: {', '.join(ENCODER_ACTIVATIONS)})"
            )
        pe = _get(cfg, "position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            raise UnsupportedModelError(
                f"{mt}: position_embedding_type {pe!r} is not supported (only 'absolute')"
            )
        return spec
    act = _get(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{mt}: hidden_act {act!r} is not supported (only silu)")
    rt = _rope_type(cfg)
    if rt in _SEQ_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"{mt}: rope_type {rt!r} changes its frequencies with the sequence length; "
            "supported: default, linear, llama3, yarn"
        )
    return spec


def sliding_window(cfg: Any, spec: ModelType | None = None) -> tuple[int | None, list[int]]:
    """(window, indices of the layers it applies to) as the HF model attends."""
    spec = spec or require(cfg)
    window = _get(cfg, "sliding_window")
    if spec.window == "none" or not window:
        return None, []
    n = int(_get(cfg, "num_hidden_layers"))
    if spec.window == "all":
        return int(window), list(range(n))
    types = _get(cfg, "layer_types") or []
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (int(window), layers) if layers else (None, [])


def backbone(model: Any, spec: ModelType | None = None) -> Any:
    """The base model inside a task model (``model.bert``, ``model.distilbert``...)."""
    spec = spec or require(model)
    for attr in spec.layout.backbone:
        sub = getattr(model, attr, None)
        if sub is not None and hasattr(sub, "embeddings" if spec.family == ENCODER else "layers"):
            return sub
    return model


def head_paths(model: Any, spec: ModelType) -> tuple[str, str, str] | None:
    """(dense, activation, output) module names of the classification head, if present."""
    if spec.head is None:
        return None
    dense, act, out = spec.head
    if "{backbone}" in dense:
        bb = next((a for a in spec.layout.backbone if hasattr(model, a)), None)
        if bb is None:
            return None
        dense = dense.format(backbone=bb)
    return dense, act, out
