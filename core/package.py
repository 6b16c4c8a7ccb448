"""The packaging pipeline: a trained run directory in, one complete published artifact out.

``build_artifact`` is the one implementation the worker (one call per job) and the CLI
(`finegates prune`, `export`, `bench`) share. Its phases, all inside a staging folder
beside the destination (core.artifacts.staging_dir):

1. prune: rebuild the gated model from the run directory (core.rundir), prune it
   (core.prune), check it against the gated model on random inputs, write weights,
   tokenizer, hf/ copy and manifest. Failing here raises ``PruningError``: there is
   no artifact without pruned weights.
2. onnx (optional): model.onnx.
3. report (optional): report.json, the compression report (core.report).
4. seal and publish: every file hashed into manifest.json, then one rename.

Why one staging folder and one rename: the destination holds either the previous
artifact or the complete new one, whose manifest hashes every file it holds (model.onnx
and report.json included), so the serving side never meets a half-written artifact or a
file nobody vouches for. A failing optional phase is an event with level "warning" and
the artifact is published without that file; any other failure leaves the destination
as it was and removes the staging folder.

``rebuild_artifact`` adds model.onnx or report.json to an existing artifact the same
way: the files its manifest lists are copied (and checked against their hashes) into a
staging folder, the file is added, the manifest is sealed again and the folder replaces
the old one in a single rename.

Progress goes to ``on_event`` (one ``PackageEvent`` per phase), so the service can
record it without this module knowing about jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from core.artifacts import (
    load_artifact,
    publish,
    read_manifest,
    seal,
    staging_dir,
    state_hash,
    write_artifact,
)
from core.errors import ArtifactError, PruningError
from core.manifest import MANIFEST, ONNX, REPORT, Manifest
from core.onnx_export import export_onnx
from core.prune import compression_figures, diff_and_scale, prune_model
from core.quantize import INT8_ONNX, quantize_onnx, validation_set
from core.report import DEFAULT_SHAPES, compression_report
from core.rundir import RunDir, load_gated_run
from core.structure import describe

log = logging.getLogger(__name__)

__all__ = [
    "PackageEvent",
    "ArtifactResult",
    "PrunedRun",
    "build_artifact",
    "rebuild_artifact",
    "measure",
    "prune_run",
    "original_shape",
    "base_weights_hash",
    "report_shapes",
]

GATE_PARAMS = frozenset({"row_logits", "col_logits", "lora_A", "lora_B"})
SUMMARY_KEYS = (
    "params_before",
    "params_after",
    "gated_params_before",
    "gated_params_after",
    "params_removed_fraction",
    "gated_removed_fraction",
    "flop_ideal_ratio",
    "max_abs_diff_vs_gated",
)


@dataclass
class PackageEvent:
    phase: str  # "prune" | "onnx" | "report"
    level: str  # "info" | "warning" | "error"
    message: str
    data: dict[str, Any] | None = None


EventCallback = Callable[[PackageEvent], None]


@dataclass
class ArtifactResult:
    path: Path  # the published artifact
    manifest: Manifest
    report: dict[str, Any] | None  # None when not asked for or when it failed
    formats: list[str]  # files a user can take: "safetensors", and "onnx" when exported
    size_bytes: int  # all files, manifest.json included
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The compression figures a job and its model keep: manifest figures first, then
        the report's, plus the latency rows in short form and the artifact's size."""
        out: dict[str, Any] = {}
        for src in (self.manifest.compression, self.report or {}):
            for key in SUMMARY_KEYS:
                if key in src and key not in out:
                    out[key] = src[key]
        rows = [r for r in (self.report or {}).get("latency", []) if isinstance(r, dict)]
        if rows:
            keep = ("backend", "batch", "seq_len", "dense_ms", "pruned_ms", "ratio")
            out["latency"] = [{k: r.get(k) for k in keep} for r in rows]
        out["artifact_bytes"] = self.size_bytes
        return out


# ----------------------------------------------------------------------------- figures
def original_shape(model: nn.Module) -> dict[str, int]:
    """Base-model geometry: lets `bench` rebuild the dense reference from an artifact."""
    s = describe(model)
    return {
        "num_layers": len(s.layers),
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads if s.family == "llama" else s.num_heads,
        "head_dim": s.head_dim,
        "intermediate_size": s.intermediate_size,
    }


def base_weights_hash(gated_model: nn.Module, head_modules: list[str] | None = None) -> str:
    """Content hash of the weights the run started from: every tensor except gate logits
    and the task head (what a user needs to match the base model, not the training)."""
    heads = tuple(f"{h}." for h in (head_modules or []))
    tensors = {}
    for n, t in gated_model.state_dict().items():
        if n.rsplit(".", 1)[-1] in GATE_PARAMS or n.startswith(heads):
            continue
        tensors[n.replace(".base.", ".")] = t
    return state_hash(tensors)


def report_shapes(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """The report's default (batch, seq_len) shapes, capped at the model's position limit
    (a small model cannot time a 128-token input it has no positions for)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return tuple(DEFAULT_SHAPES)
    return tuple((b, min(t, limit)) for b, t in DEFAULT_SHAPES)


# ----------------------------------------------------------------------------- prune
@dataclass
class PrunedRun:
    """A pruned run in memory, with everything its manifest records."""

    pruned: nn.Module
    tokenizer: Any
    fields: dict[str, Any]  # keyword arguments of core.artifacts.write_artifact


def prune_run(run_dir: str | Path, *, check_batch: int = 4, **prune_kwargs: Any) -> PrunedRun:
    """Load a trained gated run (core.rundir.load_gated_run), prune it and check the
    pruned model against the gated one on random inputs."""
    run_dir = Path(run_dir)
    gated, tokenizer, info = load_gated_run(run_dir)
    gated.eval()
    pruned, plan = prune_model(gated, **prune_kwargs)
    diff, scale = diff_and_scale(gated, pruned, batch=check_batch)
    figures = compression_figures(gated, pruned, plan)
    figures["max_abs_diff_vs_gated"] = diff
    figures["max_abs_output_gated"] = scale
    figures["max_rel_diff_vs_gated"] = diff / scale if scale else 0.0
    if diff > 1e-3:
        log.warning("pruned model differs from the gated model by %.3g", diff)
    rd = RunDir(run_dir)
    training_config: dict[str, Any] | None = None
    run_config = rd.read_config() if rd.has_final() else None
    if run_config is not None:
        training_config = dict(run_config)
    elif "hyperparameters" in info:
        training_config = {"hyperparameters": info["hyperparameters"]}
    labels = info.get("labels")
    cfg: Any = gated.config  # an HF PretrainedConfig
    if not labels and getattr(cfg, "id2label", None) and hasattr(gated, "classifier"):
        labels = {str(k): v for k, v in cfg.id2label.items()}
    fields = {
        "plan": plan,
        "base_model": info.get("base_model"),
        "base_model_hash": base_weights_hash(gated, info.get("head_modules")),
        "task": info.get("task"),
        "labels": labels,
        "training_config": training_config,
        "metrics": info.get("metrics") or {},
        "compression": figures,
        "dense_source": info.get("base_model_path"),
        "original_shape": original_shape(gated),
        "problem_type": info.get("problem_type"),
        "measured_sparsity": info.get("measured_sparsity"),
        "max_length": info.get("max_length"),
        "source_run": str(run_dir.resolve()),
    }
    return PrunedRun(pruned=pruned, tokenizer=tokenizer, fields=fields)


# ----------------------------------------------------------------------------- pipeline
def _ignore(event: PackageEvent) -> None:
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


def _default_backends(stage: Path) -> tuple[str, ...]:
    return ("torch", "onnxruntime") if (stage / ONNX).is_file() else ("torch",)


def _complete(
    stage: Path,
    dest: Path,
    model: nn.Module,
    manifest: Manifest,
    emit: EventCallback,
    *,
    onnx: bool,
    report: bool,
    strict: bool,
    report_kw: dict[str, Any],
) -> ArtifactResult:
    """Phases 2-4 on an artifact in ``stage``: the optional files, then seal and publish.

    ``strict`` (a rebuild: the caller asked for exactly these files): any failure raises
    as it is. Otherwise a failing optional phase is a warning, and a failing seal or
    publish is a ``PruningError`` like the rest of getting the pruned model out."""
    warnings: list[str] = []

    def skipped(phase: str, what: str, exc: Exception) -> None:
        if strict:
            raise exc
        msg = f"{what} skipped: {type(exc).__name__}: {exc}"[:500]
        warnings.append(msg)
        emit(PackageEvent(phase, "warning", msg))

    if onnx:
        try:
            export_onnx(model, stage / ONNX)
        except Exception as exc:  # optional extra
            (stage / ONNX).unlink(missing_ok=True)
            log.warning("ONNX export failed", exc_info=True)
            skipped("onnx", "ONNX export", exc)
        else:
            emit(PackageEvent("onnx", "info", "Exported the pruned model to ONNX"))
    if onnx and (stage / ONNX).is_file():
        try:
            quantize_onnx(stage / ONNX, stage / INT8_ONNX)
        except Exception as exc:  # optional extra
            (stage / INT8_ONNX).unlink(missing_ok=True)
            log.warning("int8 ONNX quantization failed", exc_info=True)
            skipped("onnx", "int8 ONNX quantization", exc)
        else:
            emit(PackageEvent("onnx", "info", f"Quantized model.onnx to int8 ({INT8_ONNX})"))
    rep: dict[str, Any] | None = None
    if report:
        kw = dict(report_kw)
        kw["shapes"] = kw.get("shapes") or report_shapes(model)
        kw["backends"] = kw.get("backends") or _default_backends(stage)
        try:
            rep = compression_report(model, manifest, stage, **kw)
            _write_report(stage / REPORT, rep)
        except Exception as exc:  # the model is usable without its latency report
            rep = None
            (stage / REPORT).unlink(missing_ok=True)
            log.exception("compression report failed")
            skipped("report", "Compression report", exc)
        else:
            emit(
                PackageEvent(
                    "report",
                    "info",
                    "Wrote the compression report (parameters, sizes, latency dense vs pruned)",
                )
            )
    try:
        manifest = seal(stage, manifest)
        publish(stage, dest)
    except Exception as exc:
        if strict:
            raise
        what = f"{type(exc).__name__}: {exc}"[:300]
        raise PruningError(f"publishing the pruned artifact failed ({what})") from exc
    formats = ["safetensors"] + (["onnx"] if ONNX in manifest.files else [])
    formats += ["onnx-int8"] if INT8_ONNX in manifest.files else []
    return ArtifactResult(dest, manifest, rep, formats, _folder_bytes(dest), warnings)


def build_artifact(
    run_dir: str | Path,
    artifact_dir: str | Path,
    *,
    onnx: bool = True,
    report: bool = True,
    shapes: tuple[tuple[int, int], ...] | None = None,
    backends: tuple[str, ...] | None = None,
    runs: int = 20,
    warmup: int = 3,
    decode_tokens: int = 32,
    check_batch: int = 4,
    prune_kwargs: dict[str, Any] | None = None,
    on_event: EventCallback | None = None,
) -> ArtifactResult:
    """Prune ``run_dir`` and publish the whole artifact as ``artifact_dir`` (replacing
    any artifact there); see the module docstring.

    ``shapes`` default to the report's shapes capped at the model's positions;
    ``backends`` to torch, plus onnxruntime when model.onnx was written.
    """
    emit = on_event or _ignore
    dest = Path(artifact_dir).absolute()
    stage = staging_dir(dest)
    try:
        try:
            pr = prune_run(run_dir, check_batch=check_batch, **(prune_kwargs or {}))
            write_artifact(pr.pruned, pr.tokenizer, stage, **pr.fields)
            validation = validation_set(run_dir, pr.tokenizer, pr.fields) if report else None
            del pr
            # export and measure what will be served: the model as read back from disk
            loaded = load_artifact(stage, load_tokenizer=False)
        except Exception as exc:
            log.exception("pruning %s failed", run_dir)
            tb = traceback.format_exc()[-8000:]
            emit(PackageEvent("prune", "error", "Pruning traceback", {"traceback": tb}))
            what = f"{type(exc).__name__}: {exc}"[:300]
            raise PruningError(f"pruning the trained model failed ({what})") from exc
        emit(PackageEvent("prune", "info", "Pruned the gated model into a smaller dense model"))
        report_kw = {
            "shapes": shapes,
            "backends": backends,
            "runs": runs,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "validation": validation,
        }
        return _complete(
            stage, dest, loaded.model, loaded.manifest, emit,
            onnx=onnx, report=report, strict=False, report_kw=report_kw,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _copy_verified(src: Path, stage: Path, manifest: Manifest) -> None:
    """Copy the files ``manifest`` lists (and manifest.json) into ``stage``, checking each
    one's size and sha256 on the bytes copied. Files it does not list stay behind."""
    for name, meta in manifest.files.items():
        p = src / name
        if not p.is_file():
            raise ArtifactError(f"{p}: file listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(
                f"{p}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)"
            )
        out = stage / name
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(p, "rb") as fi, open(out, "wb") as fo:
            while chunk := fi.read(1 << 20):
                h.update(chunk)
                fo.write(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise ArtifactError(f"{p}: sha256 mismatch (file was modified or corrupted)")
    shutil.copyfile(src / MANIFEST, stage / MANIFEST)


def rebuild_artifact(
    artifact_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    onnx: bool = False,
    report: bool = False,
    shapes: tuple[tuple[int, int], ...] | None = None,
    backends: tuple[str, ...] | None = None,
    runs: int = 20,
    warmup: int = 3,
    decode_tokens: int = 32,
    on_event: EventCallback | None = None,
) -> ArtifactResult:
    """Add model.onnx and/or report.json to an existing artifact and publish the result
    as ``output_dir`` (default: in place, replacing ``artifact_dir`` in one rename).

    The phases asked for are required here: their failure raises and leaves the artifact
    as it was. Files the old manifest does not list are not carried over.
    """
    src = Path(artifact_dir)
    dest = Path(output_dir if output_dir is not None else artifact_dir).absolute()
    manifest = read_manifest(src)
    stage = staging_dir(dest)
    try:
        _copy_verified(src, stage, manifest)
        for name in ([ONNX, INT8_ONNX] if onnx else []) + ([REPORT] if report else []):
            (stage / name).unlink(missing_ok=True)  # replaced, never kept stale
        loaded = load_artifact(stage, verify=False, load_tokenizer=False)  # just checked
        report_kw = {
            "shapes": shapes,
            "backends": backends,
            "runs": runs,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
        }
        return _complete(
            stage, dest, loaded.model, loaded.manifest, on_event or _ignore,
            onnx=onnx, report=report, strict=True, report_kw=report_kw,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def measure(
    artifact_dir: str | Path,
    *,
    shapes: tuple[tuple[int, int], ...] | None = None,
    backends: tuple[str, ...] | None = None,
    runs: int = 20,
    warmup: int = 3,
    decode_tokens: int = 32,
) -> dict[str, Any]:
    """The compression report of a published artifact, without writing anything."""
    loaded = load_artifact(artifact_dir, load_tokenizer=False)
    path = Path(artifact_dir)
    return compression_report(
        loaded.model,
        loaded.manifest,
        path,
        shapes=shapes or report_shapes(loaded.model),
        backends=backends or _default_backends(path),
        runs=runs,
        warmup=warmup,
        decode_tokens=decode_tokens,
    )
