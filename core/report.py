"""Compression report: parameters, file sizes, paper count vs physical removal, latency.

The "dense" reference is the same engine implementation (core.pruned) at the BASE
model's full per-layer shapes (``Manifest.original_shape``), i.e. what the gated model
becomes when its gates are folded and nothing is removed. Weight values do not change
CPU latency, so the dense reference is built with default-initialised weights; that
keeps `bench` independent of the base model files and compares like with like (same
kernels, same fused projections), so the ratio measures what pruning buys.

Latency: for each shape, dense and pruned runs ALTERNATE in one process (dense, pruned,
dense, ...) after warm-up, and the median of each is reported with ratio = pruned/dense
next to the FLOP-ideal ratio (Linear + attention-matmul MACs, pruned/dense, same shape).
Decoders: the rows are prefill (logits of the last position), plus decode tokens/s at
batch 1.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from core.manifest import ONNX, WEIGHTS, Manifest
from core.pruned import (
    BertLayerShape,
    LlamaLayerShape,
    PrunedBertModel,
    PrunedLlamaModel,
)

if TYPE_CHECKING:
    from core.pruned.bert import BertLayer
    from core.pruned.llama import LlamaBlock

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 64), (32, 128))

__all__ = [
    "dense_reference",
    "flop_count",
    "alternating_medians",
    "compression_report",
    "format_report",
    "machine_info",
    "timing_warning",
    "summarize",
]


# ----------------------------------------------------------------------------- models
def dense_reference(model: nn.Module, original_shape: dict | None) -> nn.Module:
    """Our model family at the base model's full shapes (see module docstring)."""
    if not original_shape:
        raise ValueError("manifest has no original_shape: cannot build the dense reference")
    cfg: Any = copy.deepcopy(model.config)  # PrunedBertConfig | PrunedLlamaConfig
    H, KV = original_shape["num_heads"], original_shape["num_kv_heads"]
    hd, F_ = original_shape["head_dim"], original_shape["intermediate_size"]
    n = original_shape.get("num_layers", len(cfg.layers))
    dense: PrunedBertModel | PrunedLlamaModel
    if isinstance(model, PrunedBertModel):
        cfg.layers = [BertLayerShape(H, hd, hd, F_) for _ in range(n)]
        dense = PrunedBertModel(cfg)
    else:
        cfg.layers = [LlamaLayerShape(KV, hd, hd, F_) for _ in range(n)]
        dense = PrunedLlamaModel(cfg)
        theta = float(cfg.extra.get("rope_theta") or 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        for blk in dense.layers:
            blk.attn.inv_freq.copy_(inv.expand_as(blk.attn.inv_freq))
    return dense.eval()


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def flop_count(model: nn.Module, batch: int, seq_len: int, lm_positions: int | None = None) -> int:
    """MACs of the Linear layers and the attention matmuls for one forward.

    ``lm_positions``: how many positions per sequence go through lm_head (decoders;
    default all)."""
    tokens = batch * seq_len
    total = 0
    if isinstance(model, PrunedBertModel):
        C = model.config.hidden_size
        for lyr in cast("Iterable[BertLayer]", model.layers):
            H, q, v, f = lyr.n_heads, lyr.d_qk, lyr.d_vo, lyr.ffn
            total += tokens * (C * H * (2 * q + v) + H * v * C + 2 * C * f)
            total += batch * seq_len * seq_len * H * (q + v)
        if model.classifier is not None:
            total += batch * (C * C + C * model.config.num_labels)
        return total
    cfg: Any = model.config  # a PrunedLlamaModel's, reached through nn.Module
    C = cfg.hidden_size
    for blk in cast("Iterable[LlamaBlock]", model.layers):
        a = blk.attn
        total += tokens * C * (a.n_q * a.d_qk + a.n_kv * a.d_qk + a.n_kv * a.d_vo)
        total += tokens * a.n_q * a.d_vo * C + tokens * 3 * C * blk.mlp.ffn
        total += batch * seq_len * (seq_len + 1) // 2 * a.n_q * (a.d_qk + a.d_vo)
    lm = seq_len if lm_positions is None else lm_positions
    total += batch * lm * C * cfg.vocab_size
    return total


def _decode_flops(model: nn.Module, context: int) -> int:
    """MACs of one decode step at a given context length (batch 1)."""
    cfg: Any = model.config  # a PrunedLlamaModel's, reached through nn.Module
    C: int = cfg.hidden_size
    total = C * cfg.vocab_size
    for blk in cast("Iterable[LlamaBlock]", model.layers):
        a = blk.attn
        total += C * (a.n_q * a.d_qk + a.n_kv * a.d_qk + a.n_kv * a.d_vo) + a.n_q * a.d_vo * C
        total += 3 * C * blk.mlp.ffn + context * a.n_q * (a.d_qk + a.d_vo)
    return total


# ----------------------------------------------------------------------------- timing
def alternating_medians(
    fns: dict[str, Callable[[], Any]], runs: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median wall time (ms) per function, calls interleaved so drift hits all equally."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return Timings({k: statistics.median(v) for k, v in times.items()}, times)


class Timings(dict):
    """Medians by name (a plain dict to read), with every sample kept in ``samples``."""

    def __init__(self, medians: dict[str, float], samples: dict[str, list[float]]):
        super().__init__(medians)
        self.samples = samples


def spread(samples: list[float]) -> dict[str, float]:
    """The 10th and 90th percentiles (ms) and their distance relative to the median."""
    if len(samples) < 2:
        v = samples[0] if samples else 0.0
        return {"p10_ms": v, "p90_ms": v, "relative_spread": 0.0}
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    med = statistics.median(samples)
    return {
        "p10_ms": round(qs[0], 4),
        "p90_ms": round(qs[-1], 4),
        "relative_spread": (qs[-1] - qs[0]) / med if med > 0 else 0.0,
    }


def _inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=gen)
    return ids, torch.ones_like(ids)


def _torch_fn(model: nn.Module, ids, mask) -> Callable[[], Any]:
    if isinstance(model, PrunedLlamaModel):

        def run():
            with torch.inference_mode():
                return model(ids, last_only=True)

        return run

    def run_enc():
        with torch.inference_mode():
            return model(ids, mask)

    return run_enc


def _decode_tok_s(
    dense: nn.Module, pruned: nn.Module, prompt: int, new_tokens: int, runs: int
) -> dict:
    ids, _ = _inputs(pruned, 1, prompt, seed=1)
    fns = {
        "dense": lambda: dense.generate(ids, new_tokens, stop_token_ids=[]),
        "pruned": lambda: pruned.generate(ids, new_tokens, stop_token_ids=[]),
    }
    # subtract prefill so the figure is decode speed
    pre = alternating_medians(
        {
            "dense": lambda: dense.generate(ids, 1, stop_token_ids=[]),
            "pruned": lambda: pruned.generate(ids, 1, stop_token_ids=[]),
        },
        runs=runs,
        warmup=1,
    )
    full = alternating_medians(fns, runs=runs, warmup=1)
    out: dict[str, float] = {"prompt_tokens": prompt, "new_tokens": new_tokens, "runs": runs}
    for k in ("dense", "pruned"):
        dt = max(full[k] - pre[k], 1e-6) / 1e3
        out[f"{k}_tok_s"] = (new_tokens - 1) / dt
    out["ratio"] = out["pruned_tok_s"] / out["dense_tok_s"]
    ctx = prompt + new_tokens // 2
    out["flop_ideal_speedup"] = _decode_flops(dense, ctx) / _decode_flops(pruned, ctx)
    return out


# ----------------------------------------------------------------------------- report
def compression_report(
    model: nn.Module,
    manifest: Manifest,
    artifact_dir: str | Path | None = None,
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
    runs: int = 20,
    warmup: int = 3,
    backends: tuple[str, ...] = ("torch", "onnxruntime"),
    decode_tokens: int = 32,
    decode_runs: int = 5,
    dense: nn.Module | None = None,
) -> dict:
    """The report as a JSON-able dict (contract keys at the top level)."""
    comp = dict(manifest.compression)
    load_before = _load_average()
    if dense is None:
        dense = dense_reference(model, manifest.original_shape)
    model.eval()
    is_lm = isinstance(model, PrunedLlamaModel)
    report: dict[str, Any] = {
        "family": manifest.family,
        "base_model": manifest.base_model["id"],
        "params_before": comp.get("params_before"),
        "params_after": comp.get("params_after", _n_params(model)),
        "gated_params_before": comp.get("gated_params_before"),
        "gated_params_after": comp.get("gated_params_after"),
        "paper_params_after": comp.get("paper_params_after"),
        "gated_removed_fraction": comp.get("gated_removed_fraction"),
        "paper_removed_fraction": comp.get("paper_removed_fraction"),
        "params_removed_fraction": comp.get("params_removed_fraction"),
        "max_abs_diff_vs_gated": comp.get("max_abs_diff_vs_gated"),
        "max_rel_diff_vs_gated": comp.get("max_rel_diff_vs_gated"),
        "per_layer": comp.get("per_layer"),
        "dense_reference": "core.pruned at the base model's full shapes (gates folded, "
        "nothing removed), default-initialised weights",
        "engine_params": {"dense": _n_params(dense), "pruned": _n_params(model)},
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
    }
    big = max(shapes, key=lambda s: s[0] * s[1])
    lm_pos = 1 if is_lm else None
    report["flop_ideal_ratio"] = flop_count(model, *big, lm_pos) / flop_count(dense, *big, lm_pos)
    files = {}
    if artifact_dir is not None:
        artifact_dir = Path(artifact_dir)
        for name in (WEIGHTS, ONNX):
            p = artifact_dir / name
            if p.is_file():
                files[name] = p.stat().st_size
        files["dense_fp32_estimate"] = _n_params(dense) * 4
    report["file_sizes"] = files

    rows = []
    if "torch" in backends:
        for b, t in shapes:
            ids, mask = _inputs(model, b, t)
            med = alternating_medians(
                {"dense": _torch_fn(dense, ids, mask), "pruned": _torch_fn(model, ids, mask)},
                runs=runs,
                warmup=warmup,
            )
            rows.append(_row("torch", b, t, med, model, dense, lm_pos))
    if "onnxruntime" in backends:
        rows += _onnx_rows(model, dense, shapes, runs, warmup, lm_pos)
    report["latency"] = rows
    if is_lm and decode_tokens > 1:
        report["decode"] = _decode_tok_s(dense, model, 64, decode_tokens, decode_runs)
    report["machine"] = machine_info(load_before)
    report["timing_warning"] = timing_warning(report)
    report["summary"] = summarize(report)
    return report


def _row(backend, b, t, med, model, dense, lm_pos) -> dict:
    ideal = flop_count(model, b, t, lm_pos) / flop_count(dense, b, t, lm_pos)
    ratio = med["pruned"] / med["dense"]
    row = {
        "backend": backend,
        "batch": b,
        "seq_len": t,
        "dense_ms": round(med["dense"], 4),
        "pruned_ms": round(med["pruned"], 4),
        "ratio": ratio,
        "speedup": med["dense"] / med["pruned"] if med["pruned"] > 0 else None,
        "flop_ideal_ratio": ideal,
        "measured_over_ideal": ratio / ideal,
    }
    samples = getattr(med, "samples", None)
    if samples:
        for k in ("dense", "pruned"):
            sp = spread(samples[k])
            row[f"{k}_p10_ms"], row[f"{k}_p90_ms"] = sp["p10_ms"], sp["p90_ms"]
            row[f"{k}_relative_spread"] = sp["relative_spread"]
    return row


def _onnx_rows(model, dense, shapes, runs, warmup, lm_pos) -> list[dict]:
    from core.onnx_export import OnnxRunner, export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pd = export_onnx(dense, Path(tmp) / "dense.onnx", last_only=True)
        pp = export_onnx(model, Path(tmp) / "pruned.onnx", last_only=True)
        rd, rp = OnnxRunner(pd), OnnxRunner(pp)
        for b, t in shapes:
            ids, mask = _inputs(model, b, t)
            x, am = ids.numpy(), mask.numpy()
            med = alternating_medians(
                {
                    "dense": partial(rd, x, am),
                    "pruned": partial(rp, x, am),
                },
                runs=runs,
                warmup=warmup,
            )
            rows.append(_row("onnxruntime", b, t, med, model, dense, lm_pos))
    return rows


def format_report(r: dict) -> str:
    """Short human summary of a compression report."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"FineGates compression report ({r.get('family')}, base {r.get('base_model')})",
    ]
    sentence = (r.get("summary") or {}).get("sentence")
    if sentence:
        lines.append(f"  {sentence}")
    lines += [
        f"  params: {r.get('params_before')} -> {r.get('params_after')} "
        f"({pct(r.get('params_removed_fraction'))} of the whole model removed)",
        f"  gated Linears: {r.get('gated_params_before')} -> {r.get('gated_params_after')} "
        f"({pct(r.get('gated_removed_fraction'))} physically removed; paper per-matrix "
        f"count: {pct(r.get('paper_removed_fraction'))})",
        f"  max |pruned - gated|: {r.get('max_abs_diff_vs_gated')}",
        f"  FLOP-ideal ratio (largest shape): {r['flop_ideal_ratio']:.3f}",
    ]
    for name, size in (r.get("file_sizes") or {}).items():
        lines.append(f"  {name}: {size / 1e6:.2f} MB")
    lines.append("  latency (median ms, dense vs pruned, ratio = pruned/dense):")
    for row in r.get("latency", []):
        lines.append(
            f"    {row['backend']:<12} {row['batch']:>3}x{row['seq_len']:<4} "
            f"{row['dense_ms']:9.2f} {row['pruned_ms']:9.2f}  ratio {row['ratio']:.3f} "
            f"(ideal {row['flop_ideal_ratio']:.3f}, measured/ideal "
            f"{row['measured_over_ideal']:.2f})"
            + (
                f"  p10-p90 dense {row['dense_p10_ms']:.2f}-{row['dense_p90_ms']:.2f}, "
                f"pruned {row['pruned_p10_ms']:.2f}-{row['pruned_p90_ms']:.2f}"
                if "dense_p10_ms" in row
                else ""
            )
        )
    d = r.get("decode")
    if d:
        lines.append(
            f"  decode: {d['dense_tok_s']:.1f} -> {d['pruned_tok_s']:.1f} tok/s "
            f"(x{d['ratio']:.2f}; FLOP-ideal x{d['flop_ideal_speedup']:.2f})"
        )
    m = r.get("machine")
    if m:
        lines.append(
            f"  measured on {m.get('cpu')} ({m.get('logical_cpus')} CPUs, "
            f"{m.get('torch_threads')} torch threads, load average "
            f"{m.get('load_average_before')} -> {m.get('load_average_after')})"
        )
    if r.get("timing_warning"):
        lines.append(f"  WARNING: {r['timing_warning']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary
# A timing whose 10th-90th percentile band is wider than this share of its median was
# taken while something else competed for the CPU; so was one started under a load
# average above the number of CPUs.
NOISY_SPREAD = 0.5
BUSY_PREFIX = "The machine was busy while the latency was measured"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not available on every platform
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(load_before: float | None = None) -> dict[str, Any]:
    """Where the timings were taken: CPU model, logical CPUs, torch threads, load."""
    return {
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }


def timing_warning(report: dict[str, Any]) -> str | None:
    """A plain sentence when the latency figures were measured on a busy machine."""
    m = report.get("machine") or {}
    cpus = m.get("logical_cpus") or 1
    loads = [x for x in (m.get("load_average_before"), m.get("load_average_after")) if x]
    noisy = [
        f"{r['backend']} {r['batch']}x{r['seq_len']}"
        for r in report.get("latency", [])
        if max(r.get("dense_relative_spread", 0.0), r.get("pruned_relative_spread", 0.0))
        > NOISY_SPREAD
    ]
    why = []
    if loads and max(loads) > cpus:
        why.append(f"the load average was {max(loads):.1f} on {cpus} CPUs")
    if noisy:
        why.append(f"repeated runs varied by more than {NOISY_SPREAD:.0%} ({', '.join(noisy)})")
    if not why:
        return None
    return (
        f"{BUSY_PREFIX} (" + "; ".join(why) + "): "
        "treat the latency figures as rough and measure again on an idle machine "
        "(finegates bench ARTIFACT)."
    )


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """How much smaller and how much faster, as fields and one sentence."""
    files = report.get("file_sizes") or {}
    rows = [r for r in report.get("latency", []) if r.get("backend") == "torch"]
    row = min(rows, key=lambda r: r["batch"] * r["seq_len"], default=None)
    out: dict[str, Any] = {
        "gated_removed_fraction": report.get("gated_removed_fraction"),
        "params_removed_fraction": report.get("params_removed_fraction"),
        "file_bytes_dense": files.get("dense_fp32_estimate"),
        "file_bytes_pruned": files.get(WEIGHTS),
        "latency_shape": [row["batch"], row["seq_len"]] if row else None,
        "dense_ms": row["dense_ms"] if row else None,
        "pruned_ms": row["pruned_ms"] if row else None,
        "speedup": row.get("speedup") if row else None,
        "cpu": (report.get("machine") or {}).get("cpu"),
        "torch_threads": report.get("torch_threads"),
    }
    parts = []
    g, p = out["gated_removed_fraction"], out["params_removed_fraction"]
    if g is not None:
        parts.append(
            f"removed {100 * g:.1f}% of the gated weights"
            + (f" ({100 * p:.1f}% of the model)" if p is not None else "")
        )
    a, b = out["file_bytes_dense"], out["file_bytes_pruned"]
    if a and b:
        parts.append(f"weights file {a / 1e6:.1f} MB -> {b / 1e6:.1f} MB")
    if row and out["speedup"]:
        s = out["speedup"]
        how = f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x slower"
        parts.append(
            f"CPU latency at {row['batch']}x{row['seq_len']} dense {row['dense_ms']:.1f} ms "
            f"-> pruned {row['pruned_ms']:.1f} ms ({how}) on {out['cpu']}, "
            f"{out['torch_threads']} threads"
        )
    text = "; ".join(parts)
    out["sentence"] = (text[:1].upper() + text[1:] + ".") if text else ""
    return out
