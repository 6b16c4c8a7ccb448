"""Model adapters behind the inference routes.

Three kinds of model are served through two interfaces:
- ``ClassifierBackend``: a FineGates classification artifact (pruned encoder, on PyTorch or
  ONNX Runtime, whichever its compression report measured faster) or a dense Hugging Face
  sequence-classification folder (so users can compare against the dense model).
- ``CausalLMBackend``: a pruned FineGates decoder artifact or a dense HF causal LM (the
  base catalog's smollm2-135m), both generating token by token with a KV cache.

Nothing here knows about HTTP or tenants; the engine maps errors raised here to responses.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from core.manifest import Manifest

log = logging.getLogger(__name__)

ClassifyInput = str | tuple[str, str]

CLASSIFICATION_TASKS = {"classification", "regression", "sequence_classification"}
GENERATION_TASKS = {"causal_lm", "sparsify", "text_generation", "generation"}


class InputTooLongError(ValueError):
    """An input exceeds the model's token limit and the request did not ask to truncate."""

    def __init__(self, limit: int, length: int, index: int | None = None, param: str = "input"):
        where = f"{param}[{index}]" if index is not None else param
        super().__init__(
            f"{where} is {length} tokens long, above this model's limit of {limit} tokens; "
            f'shorten it or pass "truncate": true'
        )
        self.limit = limit
        self.length = length
        self.index = index
        self.param = param


@dataclass
class ModelSpec:
    """What a model id resolves to. ``kind`` is "artifact" (FineGates) or "dense" (HF folder)."""

    id: str
    path: Path
    kind: str
    owner: str | None = None  # tenant id; None for the shared base catalog
    task: str | None = None  # known from the DB row / catalog, else read at load time

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.kind, str(Path(self.path).resolve()))


def module_bytes(module: Any) -> int:
    """Bytes held by parameters and buffers: the cache's memory estimate for a model."""
    if not isinstance(module, torch.nn.Module):
        return 0
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    return int(total)


def _sane_limit(value: Any) -> int | None:
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 1_000_000 else None


def _model_limit(model: Any, tokenizer: Any, model_config: dict | None = None) -> int:
    """The smallest position limit the model config(s) and the tokenizer state."""
    candidates: list[int] = []
    config = getattr(model, "config", None)
    for obj in (config, model_config or {}):
        for name in ("max_position_embeddings", "max_seq_len", "max_sequence_length"):
            v = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
            lim = _sane_limit(v)  # int(v) when sane
            if lim:
                candidates.append(lim)
    tok_limit = _sane_limit(getattr(tokenizer, "model_max_length", None))
    if tok_limit:
        candidates.append(tok_limit)
    return min(candidates) if candidates else 512


def _forward_kwargs(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


# ---------------------------------------------------------------- classification

PAD_WASTE = 1.25  # a bucket's padded tokens may be at most this times its real tokens
MIN_BUCKET = 8  # ... unless it has fewer rows than this (a call has a fixed cost too)


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by similar length: sorted by length, a new bucket starts when
    adding the next (longer) input would pad the bucket beyond ``PAD_WASTE`` x its real
    tokens and the bucket already has ``MIN_BUCKET`` rows."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if cur and len(cur) >= MIN_BUCKET and (len(cur) + 1) * n > PAD_WASTE * (real + n):
            buckets.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        buckets.append(cur)
    return buckets


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None


class ClassifierBackend:
    """Tokenize per request (length checks), run padded batches (one model call each)."""

    task = "classification"
    _onnx_bytes: int  # set by load_backend for ONNX sessions (no model to measure)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        id2label: dict[int, str],
        max_length: int,
        backend: str = "torch",
        regression: bool = False,
        onnx_session: Any = None,
        precision: str = "fp32",
    ) -> None:
        self.model = model
        self.precision = precision  # "fp32" | "int8" (core.quantize)
        self.tokenizer = tokenizer
        self.labels = [id2label[i] for i in sorted(id2label)]
        self.max_length = int(max_length)
        self.backend = backend
        self.regression = regression
        self._session = onnx_session
        # HF fast tokenizers keep truncation/padding settings as shared mutable state: two
        # threads encoding at once (one truncating, one not) corrupt each other's output
        self._tok_lock = threading.Lock()
        self._accepts = _forward_kwargs(model) if model is not None else set()
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        if onnx_session is not None:
            self._onnx_inputs = [i.name for i in onnx_session.get_inputs()]

    @property
    def nbytes(self) -> int:
        size = module_bytes(self.model) if self.backend == "torch" else 0
        return size + int(getattr(self, "_onnx_bytes", 0))

    def encode(self, inputs: Sequence[ClassifyInput], truncate: bool = False) -> list[Encoded]:
        """Tokenize; raise InputTooLongError (naming the limit) unless ``truncate``."""
        with self._tok_lock:
            return self._encode(inputs, truncate)

    def _encode(self, inputs: Sequence[ClassifyInput], truncate: bool) -> list[Encoded]:
        out: list[Encoded] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                enc = self.tokenizer(item, truncation=False)
            else:
                enc = self.tokenizer(item[0], item[1], truncation=False)
            n = len(enc["input_ids"])
            if n > self.max_length:
                if not truncate:
                    raise InputTooLongError(self.max_length, n, i if len(inputs) > 1 else None)
                if isinstance(item, str):
                    enc = self.tokenizer(item, truncation=True, max_length=self.max_length)
                else:
                    enc = self.tokenizer(
                        item[0], item[1], truncation="longest_first", max_length=self.max_length
                    )
            tt = enc.get("token_type_ids")
            out.append(Encoded(list(enc["input_ids"]), list(tt) if tt is not None else None))
        return out

    def _pad(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            if e.token_type_ids is not None:
                types[row, :n] = torch.tensor(e.token_type_ids)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def logits(self, batch: Sequence[Encoded]) -> torch.Tensor:
        feeds = self._pad(batch)
        if self._session is not None:
            np_feeds = {k: feeds[k].numpy() for k in self._onnx_inputs if k in feeds}
            return torch.from_numpy(self._session.run(None, np_feeds)[0]).float()
        kwargs = {k: v for k, v in feeds.items() if not self._accepts or k in self._accepts}
        with torch.inference_mode():
            return _logits_of(self.model(**kwargs)).float()

    def predict(self, batch: Sequence[Encoded]) -> list[dict[str, Any]]:
        """One result dict per input, in order: the batch sorted by length and cut into
        buckets of similar length (``length_buckets``), one model call per bucket, so
        a micro-batch of one long and 31 short inputs does not pad 31 rows to the long
        one."""
        if len(batch) <= 1:
            return self._predict(batch)
        out: list[dict[str, Any] | None] = [None] * len(batch)
        for bucket in length_buckets([len(e.input_ids) for e in batch]):
            for i, r in zip(bucket, self._predict([batch[i] for i in bucket]), strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    def _predict(self, batch: Sequence[Encoded]) -> list[dict[str, Any]]:
        logits = self.logits(batch)  # (B, num_labels)
        results: list[dict[str, Any]] = []
        if self.regression:
            for row in logits:
                results.append({"label": None, "score": float(row.reshape(-1)[0]), "scores": {}})
            return results
        probs = torch.softmax(logits, dim=-1)
        for row in probs:
            best = int(torch.argmax(row))
            scores = {label: float(row[j]) for j, label in enumerate(self.labels)}
            results.append(
                {"label": self.labels[best], "score": float(row[best]), "scores": scores}
            )
        return results


# ---------------------------------------------------------------- generation


class HFStepper:
    """KV-cached decoding for Hugging Face causal LMs.

    transformers 5 renamed ``past_key_values`` to ``cache``; use whichever the model takes.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        names = _forward_kwargs(model)
        self._arg = "cache" if "cache" in names else "past_key_values"
        self.past: Any = None

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if self.past is not None:
            kwargs[self._arg] = self.past
        out = self.model(**kwargs)
        new = getattr(out, "cache", None)
        if new is None:
            new = getattr(out, "past_key_values", None)
        self.past = new
        return _logits_of(out)[0, -1]

    def prefill(self, input_ids: list[int]) -> torch.Tensor:
        self.past = None
        return self._run(torch.tensor([input_ids]))  # (1, T)

    def step(self, token_id: int) -> torch.Tensor:
        return self._run(torch.tensor([[token_id]]))  # (1, 1)


class FineGatesStepper:
    """KV-cached decoding for core.pruned.llama.PrunedLlamaModel.

    Its cache is preallocated (no torch.cat per token), so the stepper is told the longest
    sequence it will see: prompt + max_tokens, which the routes have already checked against
    the model's context limit.
    """

    def __init__(self, model: Any, max_len: int) -> None:
        self.model = model
        self.max_len = int(max_len)
        self.cache: Any = None

    def prefill(self, input_ids: list[int]) -> torch.Tensor:
        from core.pruned.llama import KVCache

        self.cache = KVCache(self.model, 1, max(self.max_len, len(input_ids) + 1))
        ids = torch.tensor([input_ids])  # (1, T)
        return self.model(ids, cache=self.cache, last_only=True)[0, -1]

    def step(self, token_id: int) -> torch.Tensor:
        return self.model(torch.tensor([[token_id]]), cache=self.cache)[0, -1]


class CausalLMBackend:
    task = "causal_lm"
    backend = "torch"

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int, hf_style: bool, precision: str = "fp32"
    ) -> None:
        self.model = model
        self.precision = precision
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.hf_style = hf_style
        self.batch_decoder: Any = None  # api.inference.decode_batch.DecodeBatcher, lazily
        self._tok_lock = threading.Lock()  # see ClassifierBackend: tokenizer state is shared
        eos = getattr(tokenizer, "eos_token_id", None)
        cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        ids: set[int] = set()
        for v in (eos, cfg_eos):
            if isinstance(v, list) and not v:
                continue
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        self.eos_token_ids = sorted(ids)

    @property
    def nbytes(self) -> int:
        return module_bytes(self.model)

    def new_stepper(self, max_len: int) -> HFStepper | FineGatesStepper:
        """A fresh decoding session; ``max_len`` = prompt + max_tokens (cache size)."""
        return HFStepper(self.model) if self.hf_style else FineGatesStepper(self.model, max_len)

    def encode_prompt(self, prompt: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            with self._tok_lock:
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            return [int(x) for x in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_prompt(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- loading


def prefer_onnx(artifact_dir: Path, manifest: Manifest | None = None) -> bool:
    """True when the artifact's manifest hashes model.onnx and report.json, and that
    report measured ONNX Runtime faster.

    Only files the manifest vouches for are trusted (core.artifacts.read_report checks the
    report's hash on the bytes it parses): an unlisted or altered report.json cannot
    switch the backend. Compares the PRUNED model's latency per backend at each shape the
    report measured (e.g. 1x64 and 32x128) and picks ONNX only if it wins at the largest
    batch measured, because the micro-batcher makes large batches the common case.
    """
    from core.artifacts import read_manifest, read_report
    from core.errors import ArtifactError
    from core.manifest import ONNX

    try:
        manifest = manifest if manifest is not None else read_manifest(artifact_dir)
    except ArtifactError:
        return False
    if ONNX not in manifest.files or not (artifact_dir / ONNX).is_file():
        return False
    report = read_report(artifact_dir, manifest) or {}
    rows = report.get("latency") or []
    by_shape: dict[tuple[int, int], dict[str, float]] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("precision", "fp32") != "fp32":
            continue  # int8 rows choose the int8 form (serving_precision), not this
        try:
            shape = (int(row["batch"]), int(row["seq_len"]))
            by_shape.setdefault(shape, {})[str(row["backend"])] = float(row["pruned_ms"])
        except (KeyError, TypeError, ValueError):
            continue
    shapes = [s for s, v in by_shape.items() if "torch" in v and "onnxruntime" in v]
    if not shapes:
        return False
    biggest = max(shapes)
    return by_shape[biggest]["onnxruntime"] < by_shape[biggest]["torch"]


def _id2label(id2label: dict[str, str] | None, model: Any) -> dict[int, str]:
    """The artifact's labels (manifest ``id2label``), else the model config's."""
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    cfg = getattr(model, "config", None)
    raw = getattr(cfg, "id2label", None) if cfg is not None else None
    if raw:
        return {int(k): str(v) for k, v in raw.items()}
    n = int(getattr(cfg, "num_labels", 2) or 2)
    return {i: f"LABEL_{i}" for i in range(n)}


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_dense(path: Path) -> ClassifierBackend | CausalLMBackend:
    """A plain HF folder (safetensors only, never remote code), served as it is."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    archs = config.architectures or []
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if any(a.endswith("ForCausalLM") for a in archs):
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
        model.eval()
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return CausalLMBackend(model, tokenizer, _model_limit(model, tokenizer), hf_style=True)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
        model.eval()
        regression = getattr(config, "problem_type", None) == "regression" or config.num_labels == 1
        return ClassifierBackend(
            model,
            tokenizer,
            _id2label(None, model),
            _model_limit(model, tokenizer),
            regression=regression,
        )
    raise UnsupportedTaskError(
        f"model folder {path.name} has architectures {archs}: it has neither a classification "
        "head nor a language-model head, so it cannot serve /v1/classify or completions; "
        "finetune it first"
    )


class UnsupportedTaskError(ValueError):
    """The model exists but cannot serve any inference route (e.g. a headless encoder)."""


def requested_precision(manifest: Manifest) -> str | None:
    """The job's ``serving_precision`` hyperparameter, as the manifest recorded it."""
    tc = manifest.training_config or {}
    for hp in ((tc.get("config") or {}).get("hyperparameters"), tc.get("hyperparameters")):
        if isinstance(hp, dict) and hp.get("serving_precision"):
            return str(hp["serving_precision"])
    return None


def serving_precision(path: Path, manifest: Manifest, override: str = "job") -> tuple[str, dict]:
    """(precision, the report's int8 block) for an artifact: the operator's override when
    set, else the job's ``serving_precision``, else int8 only when the hashed report
    measured int8 within tolerance of fp32 on the validation set (core.quantize)."""
    from core.artifacts import read_report
    from core.quantize import choose_precision

    report = read_report(path, manifest) or {}
    block = report.get("int8") if isinstance(report.get("int8"), dict) else {}
    requested = override if override in ("fp32", "int8") else requested_precision(manifest)
    precision, why = choose_precision(requested, report)
    log.info("artifact %s serves %s (%s)", path.name, precision, why)
    return precision, block or {}


def load_artifact_backend(
    path: Path, classifier_backend: str = "auto", precision_override: str = "job"
) -> Any:
    """A FineGates artifact directory, loaded strictly by core.artifacts (hash-checked)."""
    from core.artifacts import load_artifact
    from core.manifest import ONNX
    from core.quantize import INT8_ONNX, torch_int8

    loaded = load_artifact(path)
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    if hasattr(model, "eval"):
        model.eval()
    task = (manifest.task or "").lower()
    limit = _model_limit(model, tokenizer, manifest.model_config)
    precision, int8_info = serving_precision(path, manifest, precision_override)
    if task in GENERATION_TASKS:
        if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        names = _forward_kwargs(model)
        hf_style = "use_cache" in names and ("past_key_values" in names or "cache" in names)
        if precision == "int8":
            model = torch_int8(model)
        return CausalLMBackend(model, tokenizer, limit, hf_style=hf_style, precision=precision)
    if task in CLASSIFICATION_TASKS:
        id2label = _id2label(manifest.id2label, model)
        regression = task == "regression" or manifest.problem_type == "regression"
        kw: dict[str, Any] = {"regression": regression, "precision": precision}
        if precision == "int8":
            # the int8 form the report measured faster; its file only when the manifest
            # lists it (load_artifact checked its hash)
            int8_onnx = path / INT8_ONNX
            if int8_info.get("serving_backend") == "onnxruntime" and (
                INT8_ONNX in manifest.files and int8_onnx.is_file()
            ):
                return _onnx_backend(int8_onnx, tokenizer, id2label, limit, kw)
            return ClassifierBackend(torch_int8(model), tokenizer, id2label, limit, **kw)
        onnx_path = path / ONNX
        # model.onnx is used only when the manifest lists it: load_artifact checked its hash
        has_onnx = ONNX in manifest.files and onnx_path.is_file()
        use_onnx = classifier_backend == "onnxruntime" or (
            classifier_backend == "auto" and prefer_onnx(path, manifest)
        )
        if use_onnx and has_onnx:
            return _onnx_backend(onnx_path, tokenizer, id2label, limit, kw)
        return ClassifierBackend(model, tokenizer, id2label, limit, **kw)
    raise UnsupportedTaskError(f"artifact {path.name} has task {task!r}, which is not servable")


def _onnx_backend(
    onnx_path: Path, tokenizer: Any, id2label: dict[int, str], limit: int, kw: dict
) -> ClassifierBackend:
    backend = ClassifierBackend(
        None, tokenizer, id2label, limit, backend="onnxruntime",
        onnx_session=_onnx_session(onnx_path), **kw,
    )  # fmt: skip
    backend._onnx_bytes = onnx_path.stat().st_size
    return backend


def load_backend(
    spec: ModelSpec, classifier_backend: str = "auto", precision_override: str = "job"
) -> Any:
    """A FineGates artifact when the folder has manifest.json, else a plain HF folder.

    A models row may point at a plain HF folder (e.g. a dense export); it is served dense.
    """
    path = Path(spec.path)
    if (path / "manifest.json").is_file():
        return load_artifact_backend(path, classifier_backend, precision_override)
    if (path / "config.json").is_file():
        return load_dense(path)
    raise FileNotFoundError(
        f"model '{spec.id}': {path} holds neither a FineGates artifact (manifest.json) "
        "nor a Hugging Face model folder (config.json)"
    )
