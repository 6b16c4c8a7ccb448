"""The artifact directory: the contract between training and inference.

Layout (format_version 1):

    model.safetensors   pruned weights, our state-dict names (tied lm_head not stored)
    manifest.json       format/engine version, family + per-layer pruned config, base model
                        id and content hash, task, labels, the prune plan (kept indices),
                        training config, metrics, compression figures, and the sha256 and
                        size of every other file in the directory
    tokenizer files     whatever tokenizer.save_pretrained writes
    hf/                 ONLY when every layer has the same, HF-representable shape: a
                        standard HF folder (config.json + HF-named model.safetensors +
                        tokenizer) that plain AutoModelFor*.from_pretrained(dir / "hf")
                        loads. The root holds our own names, so the HF copy lives in a
                        subfolder rather than next to them.
    model.onnx          optional, added by core.onnx_export (then listed in the manifest)
    report.json         optional, added by `finegates bench`

Hugging Face from_pretrained cannot load per-layer shapes (ignore_mismatched_sizes
silently re-initialises them), so load_artifact rebuilds our skeleton from the manifest
and loads the weights strictly: any missing, extra, mis-shaped or altered tensor, any
hash mismatch, or an unknown format_version raises ArtifactError. Never random weights,
never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from core import ENGINE_VERSION
from core.errors import ArtifactError
from core.pruned import PrunedBertModel, PrunedLlamaModel, build_pruned

FORMAT_VERSION = 1
SUPPORTED_FORMATS = frozenset({1})
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
HF_DIR = "hf"

__all__ = [
    "FORMAT_VERSION",
    "LoadedArtifact",
    "save_artifact",
    "load_artifact",
    "read_manifest",
    "register_files",
    "sha256_file",
    "state_hash",
    "hf_representable",
]


@dataclass
class LoadedArtifact:
    """``model``: the pruned torch module (eval mode, fp32); ``tokenizer``: HF tokenizer or
    None if the artifact has none; ``manifest``: the parsed manifest.json; ``path``."""

    model: nn.Module
    tokenizer: Any
    manifest: dict
    path: Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (name, dtype, shape, bytes), order-independent."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tied_keys(model: nn.Module) -> set[str]:
    if isinstance(model, PrunedLlamaModel) and model.config.tie_word_embeddings:
        return {"lm_head.weight"}
    return set()


def _weights_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    tied = _tied_keys(model)
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if k not in tied
    }


def _family_of(model: nn.Module) -> str:
    if isinstance(model, PrunedBertModel):
        return "bert"
    if isinstance(model, PrunedLlamaModel):
        return "llama"
    raise ArtifactError(f"cannot save a {type(model).__name__}: not a pruned model family")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: getattr(o, "__dict__", str(o))))


def register_files(directory: str | Path, names: list[str]) -> dict:
    """Add (or refresh) files in the manifest's hash list, e.g. after ONNX export."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in names:
        p = directory / name
        manifest["files"][name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    _write_json(directory / MANIFEST, manifest)
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_artifact(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    *,
    plan: Any = None,
    base_model: str | None = None,
    base_model_hash: str | None = None,
    task: str | None = None,
    labels: list[str] | dict | None = None,
    training_config: dict | None = None,
    metrics: dict | None = None,
    compression: dict | None = None,
    dense_source: str | None = None,
    original_shape: dict | None = None,
    extra: dict | None = None,
    write_hf: bool = True,
) -> dict:
    """Write the artifact directory; returns the manifest that was written.

    ``original_shape`` (head count, head_dim, ffn, ...) lets `bench` rebuild the dense
    reference at base-model size without the base weights.
    """
    from core.structure import plan_to_dict

    # Written into a hidden sibling, then renamed into place: a reader (or a second
    # writer, e.g. a worker that lost its job) never sees a half-written artifact.
    final = Path(output_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        family = _family_of(model)
        save_file(_weights_to_save(model), str(out / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        id2label = None
        if isinstance(labels, dict):
            id2label = {str(k): v for k, v in labels.items()}
        elif labels:
            id2label = {str(i): str(n) for i, n in enumerate(labels)}
        hf_written = False
        if write_hf and hf_representable(model):
            _write_hf(model, tokenizer, out / HF_DIR, id2label)
            hf_written = True
        files = {}
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and rel not in (MANIFEST, "report.json") and not rel.endswith(".tmp"):
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "engine_version": ENGINE_VERSION,
            "family": family,
            "model_type": model.config.model_type,
            "model_config": model.config.to_dict(),
            "base_model": {"id": base_model, "sha256": base_model_hash, "path": dense_source},
            "task": task,
            "id2label": id2label,
            "plan": None if plan is None else plan_to_dict(plan),
            "original_shape": original_shape,
            "training_config": training_config,
            "metrics": metrics or {},
            "compression": compression or {},
            "hf_subfolder": HF_DIR if hf_written else None,
            "files": files,
        }
        for k, v in (extra or {}).items():
            manifest.setdefault(k, v)
        manifest = _jsonable(manifest)
        _write_json(out / MANIFEST, manifest)
        _replace_dir(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return manifest


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any folder there.

    A directory cannot be renamed over a non-empty one, so the old one is first renamed
    aside and deleted afterwards: ``dst`` holds the old or the new artifact (or, between
    the two renames, nothing), never a mix of both.
    """
    os.chmod(src, 0o755)  # mkdtemp makes it 0700
    old: Path | None = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None and not dst.exists():
            os.replace(old, dst)  # put the previous artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mp = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory does not exist")
    if not mp.is_file():
        raise ArtifactError(f"{mp}: missing manifest.json (not a FineGates artifact)")
    try:
        manifest = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mp}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mp}: manifest must be a JSON object")
    fv = manifest.get("format_version")
    if fv not in SUPPORTED_FORMATS:
        raise ArtifactError(
            f"{mp}: unknown format_version {fv!r} (this engine {ENGINE_VERSION} reads "
            f"{sorted(SUPPORTED_FORMATS)})"
        )
    for key in ("family", "model_config", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mp}: manifest lacks required field '{key}'")
    if WEIGHTS not in manifest["files"]:
        raise ArtifactError(f"{mp}: manifest does not list {WEIGHTS}")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    for name, meta in manifest["files"].items():
        p = path / name
        if not p.is_file():
            raise ArtifactError(f"{p}: file listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta.get("size", size):
            raise ArtifactError(
                f"{p}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)"
            )
        digest = sha256_file(p)
        if digest != meta.get("sha256"):
            raise ArtifactError(f"{p}: sha256 mismatch (file was modified or corrupted)")


def _load_weights_strict(model: nn.Module, wpath: Path) -> None:
    expected = {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    try:
        with safe_open(str(wpath), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise ArtifactError(
                    f"{wpath}: tensors do not match the manifest's model: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
                )
            state = {}
            for k, ref in expected.items():
                t = f.get_tensor(k)
                if tuple(t.shape) != tuple(ref.shape):
                    raise ArtifactError(
                        f"{wpath}: tensor '{k}' has shape {tuple(t.shape)}, the manifest's "
                        f"per-layer shapes need {tuple(ref.shape)}"
                    )
                state[k] = t.to(ref.dtype)
    except SafetensorError as e:
        raise ArtifactError(f"{wpath}: not a readable safetensors file ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:  # cannot happen after the checks above; never load partially
        raise ArtifactError(f"{wpath}: strict load failed: {missing} {unexpected}")
    if isinstance(model, PrunedLlamaModel) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def load_artifact(
    path: str | Path, verify: bool = True, load_tokenizer: bool = True
) -> LoadedArtifact:
    """Rebuild the pruned model from manifest.json and load model.safetensors strictly.

    ``verify`` checks the sha256 and size of every file the manifest lists first.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        # skeleton on the meta device: no random init for weights about to be replaced
        with torch.device("meta"):
            model = build_pruned(manifest["family"], manifest["model_config"])
        model = model.to_empty(device="cpu")
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path / MANIFEST}: model_config is invalid ({e})") from None
    _load_weights_strict(model, path / WEIGHTS)
    model.eval()
    tokenizer = None
    if load_tokenizer and (
        (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    ):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedArtifact(model=model, tokenizer=tokenizer, manifest=manifest, path=path)


# ----------------------------------------------------------------------------- HF copy
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


def _write_hf(model: nn.Module, tokenizer: Any, directory: Path, id2label: dict | None) -> None:
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
