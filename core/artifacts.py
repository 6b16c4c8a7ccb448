"""The artifact directory: the contract between training and inference.

Layout (format_version 1; the manifest's schema is core.manifest):

    model.safetensors   pruned weights, our state-dict names (tied lm_head not stored)
    manifest.json       format/engine version, family + per-layer pruned config, base model
                        id and content hash, task, labels, the prune plan (kept indices),
                        training config, metrics, compression figures, and the sha256 and
                        size of EVERY other file in the directory
    tokenizer files     whatever tokenizer.save_pretrained writes
    hf/                 optional: a plain Hugging Face copy (core.hf_export)
    model.onnx          optional (core.onnx_export, added by core.package)
    report.json         optional compression report (core.report, added by core.package)

Hugging Face from_pretrained cannot load per-layer shapes (ignore_mismatched_sizes
silently re-initialises them), so load_artifact rebuilds our skeleton from the manifest
and loads the weights strictly: any missing, extra, mis-shaped or altered tensor, any
hash mismatch, or an unknown format_version raises ArtifactError. Never random weights,
never pickle.

An artifact is never edited once published. It is written into a hidden staging folder
beside its destination (``staging_dir``), sealed (``seal``: every file hashed into
manifest.json) and renamed into place (``publish``), so a reader sees the old artifact
or the complete new one, never a mix; adding a file means building a new artifact.
A file the manifest does not list is not part of the artifact: readers ignore it.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from core.hf_export import hf_representable, write_hf
from core.manifest import (
    FORMAT_VERSION,
    HF_DIR,
    MANIFEST,
    REPORT,
    WEIGHTS,
    BaseModelRef,
    FileEntry,
    Manifest,
)
from core.pruned import PrunedBertModel, PrunedLlamaModel, build_pruned
from core.structure import plan_to_dict

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "LoadedArtifact",
    "Manifest",
    "save_artifact",
    "write_artifact",
    "seal",
    "staging_dir",
    "publish",
    "load_artifact",
    "read_manifest",
    "read_report",
    "verify_files",
    "sha256_file",
    "state_hash",
]


@dataclass
class LoadedArtifact:
    """``model``: the pruned torch module (eval mode, fp32); ``tokenizer``: HF tokenizer or
    None if the artifact has none; ``manifest``: the parsed, validated manifest.json."""

    model: nn.Module
    tokenizer: Any
    manifest: Manifest
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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- writing
def staging_dir(destination: str | Path) -> Path:
    """A fresh hidden folder beside ``destination`` (same filesystem, so publish is a
    rename)."""
    final = Path(destination).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def seal(directory: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``directory`` (but manifest.json) into ``manifest.files`` and
    write manifest.json. Only ever called on a folder that is not published yet."""
    directory = Path(directory)
    files: dict[str, FileEntry] = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    if WEIGHTS not in files:
        raise ArtifactError(f"{directory}: no {WEIGHTS} to seal")
    manifest.files = files
    _write_json(directory / MANIFEST, manifest.to_dict())
    return manifest


def write_artifact(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
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
    problem_type: str | None = None,
    measured_sparsity: float | None = None,
    max_length: int | None = None,
    source_run: str | None = None,
    extra: dict | None = None,
    write_hf_copy: bool = True,
) -> Manifest:
    """Weights, tokenizer, hf/ copy and a sealed manifest.json into ``directory`` (an
    unpublished folder, e.g. from ``staging_dir``); returns the manifest.

    ``original_shape`` (head count, head_dim, ffn, ...) lets `bench` rebuild the dense
    reference at base-model size without the base weights.
    """
    out = Path(directory)
    family = _family_of(model)
    cfg: Any = model.config  # PrunedBertConfig | PrunedLlamaConfig
    save_file(_weights_to_save(model), str(out / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    id2label = None
    if isinstance(labels, dict):
        id2label = {str(k): str(v) for k, v in labels.items()}
    elif labels:
        id2label = {str(i): str(n) for i, n in enumerate(labels)}
    hf_written = False
    if write_hf_copy and hf_representable(model):
        write_hf(model, tokenizer, out / HF_DIR, id2label)
        hf_written = True
    manifest = Manifest(
        family=family,
        model_config=_jsonable(cfg.to_dict()),
        files={},
        format_version=FORMAT_VERSION,
        engine_version=ENGINE_VERSION,
        model_type=cfg.model_type,
        base_model=BaseModelRef(id=base_model, sha256=base_model_hash, path=dense_source),
        task=task,
        id2label=id2label,
        plan=None if plan is None else _jsonable(plan_to_dict(plan)),
        original_shape=_jsonable(original_shape),
        training_config=_jsonable(training_config),
        metrics=_jsonable(metrics or {}),
        compression=_jsonable(compression or {}),
        hf_subfolder=HF_DIR if hf_written else None,
        problem_type=problem_type,
        measured_sparsity=None if measured_sparsity is None else float(measured_sparsity),
        max_length=None if max_length is None else int(max_length),
        source_run=source_run,
        extra=_jsonable(dict(extra or {})),
    )
    return seal(out, manifest)


def publish(staging: str | Path, destination: str | Path) -> Path:
    """Rename the finished folder ``staging`` to ``destination``, replacing any folder there.

    A directory cannot be renamed over a non-empty one, so the old one is first renamed
    aside and deleted afterwards: ``destination`` holds the old or the new artifact (or,
    between the two renames, nothing), never a mix of both.
    """
    src, dst = Path(staging), Path(destination).absolute()
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
    return dst


def save_artifact(model: nn.Module, tokenizer: Any, output_dir: str | Path, **kw: Any) -> Manifest:
    """``write_artifact`` into a staging folder, then ``publish`` it as ``output_dir``:
    a reader (or a second writer, e.g. a worker that lost its job) never sees a
    half-written artifact. Keyword arguments are those of ``write_artifact``."""
    out = staging_dir(output_dir)
    try:
        manifest = write_artifact(model, tokenizer, out, **kw)
        publish(out, output_dir)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mp = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory does not exist")
    if not mp.is_file():
        raise ArtifactError(f"{mp}: missing manifest.json (not a FineGates artifact)")
    try:
        raw = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mp}: manifest is not valid JSON ({e})") from None
    return Manifest.from_dict(raw, where=str(mp))


def verify_files(path: Path, manifest: Manifest) -> None:
    for name, meta in manifest.files.items():
        p = path / name
        if not p.is_file():
            raise ArtifactError(f"{p}: file listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(
                f"{p}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)"
            )
        if sha256_file(p) != meta["sha256"]:
            raise ArtifactError(f"{p}: sha256 mismatch (file was modified or corrupted)")


def read_report(path: str | Path, manifest: Manifest | None = None) -> dict[str, Any] | None:
    """report.json, only when the manifest hashes it and the bytes read match.

    The serving side chooses its backend from this report, so it must be the report the
    artifact was built with: an unlisted, altered or unreadable one gives None (logged).
    The bytes are hashed and parsed from one read, so the file cannot change in between.
    """
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    entry = manifest.files.get(REPORT)
    p = path / REPORT
    if entry is None:
        if p.exists():
            log.warning("%s: not listed in the manifest; ignored", p)
        return None
    try:
        data = p.read_bytes()
    except OSError:
        log.warning("%s: listed in the manifest but unreadable; ignored", p)
        return None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        log.warning("%s: does not match its manifest hash; ignored", p)
        return None
    try:
        report = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


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
            model = build_pruned(manifest.family, manifest.model_config)
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
