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

Progress goes to ``on_event``: each phase opens with a ``PackageEvent`` whose data is
``{"phase": "pruning" | "exporting" | "measuring", "eta_seconds": ...}`` and closes with
one saying what it did, so the service can record it without this module knowing about
jobs.

What a user reads first (``run_results``: target reached, the delivered state's
evaluation, the validation set, warnings; the report's summary sentence) goes into
``manifest.results``, and the delivered state's evaluation into ``manifest.metrics``.
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
from core.manifest import HF_DIR, MANIFEST, ONNX, REPORT, WEIGHTS, Manifest
from core.onnx_export import export_onnx
from core.prune import compression_figures, diff_and_scale, prune_model
from core.quantize import INT8_ONNX, quantize_onnx, validation_set
from core.report import BUSY_PREFIX, DEFAULT_SHAPES, compression_report
from core.rundir import RunDir, load_gated_run
from core.structure import describe

log = logging.getLogger(__name__)

__all__ = [
    "PackageEvent",
    "ArtifactResult",
    "PrunedRun",
    "build_artifact",
    "build_checkpoint_artifact",
    "rebuild_artifact",
    "run_results",
    "evaluation_at",
    "downloads",
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
            keep = (
                "backend", "precision", "batch", "seq_len", "dense_ms", "pruned_ms", "ratio",
                "speedup", "vs_dense_fp32",
                "dense_p10_ms", "dense_p90_ms", "pruned_p10_ms", "pruned_p90_ms",
            )  # fmt: skip
            out["latency"] = [{k: r.get(k) for k in keep if k in r} for r in rows]
        if self.report and self.report.get("machine"):
            out["machine"] = self.report["machine"]
        out["artifact_bytes"] = self.size_bytes
        out["downloads"] = downloads(self.manifest)
        res = self.manifest.results or {}
        for key in ("target_reached", "target_sparsity", "eval_metrics", "validation"):
            if key in res:
                out[key] = res[key]
        out["warnings"] = list(res.get("warnings") or [])
        out["summary"] = res.get("summary")
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


def prune_run(
    run_dir: str | Path,
    *,
    check_batch: int = 4,
    checkpoint: str | Path | None = None,
    **prune_kwargs: Any,
) -> PrunedRun:
    """Load a trained gated run (core.rundir.load_gated_run), prune it and check the
    pruned model against the gated one on random inputs.

    ``checkpoint``: a ``checkpoints/step-N`` folder of the run; its trainable tensors
    (gates, head, LoRA factors) replace the final state's before pruning."""
    run_dir = Path(run_dir)
    gated, tokenizer, info = load_gated_run(run_dir)
    if checkpoint is not None:
        from core.checkpoint import load_trainable

        load_trainable(checkpoint, gated)
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
        # names, never absolute paths: the manifest is served to tenants
        "dense_source": Path(info["base_model_path"]).name if info.get("base_model_path") else None,
        "original_shape": original_shape(gated),
        "problem_type": info.get("problem_type"),
        "measured_sparsity": (
            plan.removed_fraction() if checkpoint is not None else info.get("measured_sparsity")
        ),
        "max_length": info.get("max_length"),
        "source_run": run_dir.resolve().name,
    }
    return PrunedRun(pruned=pruned, tokenizer=tokenizer, fields=fields)


# ----------------------------------------------------------------------------- results
# Columns of a metrics.jsonl evaluation row that are not task metrics.
_EVAL_BOOKKEEPING = frozenset(
    {"step", "epoch", "measured_sparsity", "sparsity_by_type", "removable_params",
     "gated_params", "target_sparsity", "is_best"}
)  # fmt: skip
# Below this many validation rows, an accuracy estimate moves in steps of 1 point or more.
SMALL_VALIDATION = 100


def _evaluation(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out: dict[str, Any] = {"step": row.get("step")}
    out.update({k: v for k, v in row.items() if k not in _EVAL_BOOKKEEPING})
    out["measured_sparsity"] = row.get("measured_sparsity")
    return out


def evaluation_at(run_dir: str | Path, step: int) -> dict[str, Any] | None:
    """The evaluation recorded at ``step`` (task metrics, eval_loss, measured sparsity)."""
    rows = [r for r in RunDir(run_dir).read_metrics() if r.get("step") == step]
    return _evaluation(rows[-1]) if rows else None


def run_results(run_dir: str | Path) -> dict[str, Any]:
    """What a user reads first about a trained run: did it reach its target, how well
    does the model it delivers do (and on how many validation rows), and plain-sentence
    warnings. Read from the run directory (config.json, metrics.jsonl, final/)."""
    rd = RunDir(run_dir)
    cfg: dict[str, Any] = dict(rd.read_config() or {})
    job = cfg.get("config") or {}
    hp = job.get("hyperparameters") or {}
    info: dict[str, Any] = dict(rd.read_final_info()[1]) if rd.has_final() else {}
    rows = rd.read_metrics()
    target = info.get("target_sparsity", hp.get("target_sparsity"))
    tol = hp.get("sparsity_tolerance")
    measured = info.get("measured_sparsity")
    reached = info.get("target_reached")
    best_step = info.get("best_step")
    last = _evaluation(rows[-1]) if rows else None
    best = next((_evaluation(r) for r in reversed(rows) if r.get("step") == best_step), None)
    delivered = best if reached and best is not None else last
    eval_metrics: dict[str, Any] | None = None
    if delivered is not None:
        eval_metrics = {
            **delivered,
            "state": "best" if reached and best is not None else "last",
            "best": best,
            "last": last,
        }

    n_val = int(cfg.get("n_val_examples") or 0)
    n_train = cfg.get("n_train_examples")
    given = bool(job.get("validation_file"))
    max_batches, batch = hp.get("eval_max_batches"), hp.get("batch_size")
    used = n_val
    if isinstance(max_batches, int) and isinstance(batch, int):
        used = min(n_val, max_batches * batch)
    validation = {
        "rows": n_val,
        "rows_evaluated": used,
        "source": "validation_file" if given else "carved from the training file",
        "fraction": None if given else job.get("validation_split"),
        "training_rows": n_train,
    }

    if eval_metrics is not None:
        eval_metrics["validation_rows"] = used
        eval_metrics["validation_source"] = validation["source"]
    warnings: list[str] = []
    if reached is False and isinstance(target, int | float) and target > 0:
        got = f"{100 * measured:.1f}%" if isinstance(measured, int | float) else "less"
        within = f" within {100 * tol:.0f} points" if isinstance(tol, int | float) else ""
        warnings.append(
            f"Target missed: asked for {100 * target:.0f}% of the gated weights removed, "
            f"got {got}. No evaluation came{within} of the target, so the model is the "
            "last training state. Train longer (more max_steps or n_epochs) to reach it."
        )
    if used == 0:
        warnings.append(
            "There was no validation set: the evaluation ran on training rows, so its "
            "metrics say little about new data. Upload a validation_file."
        )
    elif used < SMALL_VALIDATION:
        where = "given" if given else "carved from the training file"
        warnings.append(
            f"The validation set is small ({used} rows, {where}): a score moves in steps "
            f"of {100 / used:.1f} points, so differences of a few points are noise. "
            "Upload a validation_file with a few hundred rows for a reliable estimate."
        )
    warnings += [str(w) for w in cfg.get("warnings") or [] if w]
    return {
        "target_sparsity": target,
        "measured_sparsity": measured,
        "target_reached": reached,
        "eval_metrics": eval_metrics,
        "validation": validation,
        "warnings": warnings,
    }


def downloads(manifest: Manifest) -> dict[str, int]:
    """Bytes of what can be downloaded: the default tar (weights, manifest, tokenizer,
    report; no ONNX files, no hf/ copy), and the single files."""
    files = manifest.files
    tar = sum(
        e["size"]
        for n, e in files.items()
        if n not in (ONNX, INT8_ONNX) and not n.startswith(HF_DIR + "/")
    )
    out = {"tar": tar, "safetensors": files[WEIGHTS]["size"] if WEIGHTS in files else 0}
    if ONNX in files:
        out["onnx"] = files[ONNX]["size"]
    if INT8_ONNX in files:
        out["onnx-int8"] = files[INT8_ONNX]["size"]
    return out


# ----------------------------------------------------------------------------- pipeline
def _ignore(event: PackageEvent) -> None:
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


def _default_backends(stage: Path) -> tuple[str, ...]:
    return ("torch", "onnxruntime") if (stage / ONNX).is_file() else ("torch",)


def _started(phase: str, message: str, eta: float | None = None) -> PackageEvent:
    """The event that opens a phase; ``data.phase`` and ``data.eta_seconds`` feed the
    job's progress."""
    kind = {"pruning": "prune", "exporting": "onnx", "measuring": "report"}[phase]
    data = {"phase": phase, "eta_seconds": None if eta is None else round(eta, 1)}
    return PackageEvent(kind, "info", message, data)


def _report_estimate(
    model: nn.Module, manifest: Manifest, kw: dict[str, Any]
) -> tuple[nn.Module | None, float | None]:
    """The dense reference the report needs, and how long the report will take: one
    timed dense and pruned forward per shape, times the runs each backend makes."""
    import time

    from core.report import dense_reference

    dense = kw.get("dense") or dense_reference(model, manifest.original_shape)
    try:
        import torch

        per_round = 0.0
        cfg: Any = model.config  # a core.pruned config
        for b, t in kw["shapes"]:
            ids = torch.randint(3, int(cfg.vocab_size), (b, t))
            mask = torch.ones_like(ids)
            for m in (dense, model):
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    if manifest.family == "bert":
                        m(ids, mask)
                    else:
                        m(ids, last_only=True)
                    per_round += time.perf_counter() - t0
        rounds = int(kw.get("runs", 20)) + int(kw.get("warmup", 3))
        eta = per_round * rounds * max(1, len(kw["backends"]))
        if manifest.family != "bert":
            eta *= 1.5  # decode tokens/s at batch 1
        return dense, eta
    except Exception:  # an estimate only: the report itself says what went wrong
        log.debug("report time estimate failed", exc_info=True)
        return dense, None


def _with_report(
    results: dict[str, Any] | None, report: dict[str, Any] | None, warnings: list[str]
) -> dict[str, Any]:
    """Results + the report's summary and timing warning + the packaging warnings."""
    out = dict(results or {})
    out["warnings"] = list(out.get("warnings") or [])
    if report is not None:  # a new measurement replaces the old one's warning
        out["warnings"] = [w for w in out["warnings"] if not w.startswith(BUSY_PREFIX)]
        summary = report.get("summary") or {}
        out["summary"] = summary.get("sentence") or None
        if report.get("timing_warning"):
            out["warnings"].append(report["timing_warning"])
    out["warnings"] += [w for w in warnings if w not in out["warnings"]]
    return out


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
        emit(_started("exporting", "Exporting the pruned model to ONNX"))
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
            kw["dense"], eta = _report_estimate(model, manifest, kw)
            emit(
                _started(
                    "measuring",
                    "Measuring CPU latency, dense vs pruned"
                    + (f" (about {eta:.0f} s)" if eta is not None else ""),
                    eta,
                )
            )
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
    manifest.results = _with_report(manifest.results, rep, warnings)
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
        emit(_started("pruning", "Pruning the gated model"))
        try:
            pr = prune_run(run_dir, check_batch=check_batch, **(prune_kwargs or {}))
            results = run_results(run_dir)
            pr.fields["metrics"] = _task_metrics(results.get("eval_metrics"))
            write_artifact(pr.pruned, pr.tokenizer, stage, **pr.fields)
            validation = validation_set(run_dir, pr.tokenizer, pr.fields) if report else None
            del pr
            # export and measure what will be served: the model as read back from disk
            loaded = load_artifact(stage, load_tokenizer=False)
            loaded.manifest.results = results
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


def _task_metrics(eval_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``metrics``: the delivered state's evaluation, flat."""
    if not eval_metrics:
        return {}
    return {
        k: v
        for k, v in eval_metrics.items()
        if k not in ("best", "last", "state", "validation_source")
    }


def build_checkpoint_artifact(
    run_dir: str | Path,
    checkpoint: str | Path,
    artifact_dir: str | Path,
    *,
    check_batch: int = 4,
) -> ArtifactResult:
    """A checkpoint of ``run_dir`` as its own published artifact (weights, manifest,
    tokenizer; no ONNX, no report, no hf/ copy): the final state with the checkpoint's trainable
    tensors, pruned. ``metrics`` are the evaluation recorded at that step."""
    dest = Path(artifact_dir).absolute()
    stage = staging_dir(dest)
    try:
        pr = prune_run(run_dir, check_batch=check_batch, checkpoint=checkpoint)
        step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
        ev = evaluation_at(run_dir, step)
        pr.fields["metrics"] = ev or {"step": step}
        # no hf/ copy: a checkpoint is for trying and serving; the final model has one
        write_artifact(pr.pruned, pr.tokenizer, stage, write_hf_copy=False, **pr.fields)
        del pr
        manifest = read_manifest(stage)
        manifest.results = {"checkpoint_step": step, "eval_metrics": ev}
        manifest = seal(stage, manifest)
        publish(stage, dest)
        return ArtifactResult(dest, manifest, None, ["safetensors"], _folder_bytes(dest))
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
