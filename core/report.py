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
Each precision (fp32, and int8: core.quantize) is a row of its own, timed in the same
rounds as fp32, with ``vs_dense_fp32`` = pruned time / dense fp32 time. The rounds are
adaptive (quick report): they stop once every ratio's 95% CI is within 5% of it, or at
``runs`` rounds, or when the latency budget (30 s for the whole table) is spent; each
row keeps its spread (IQR of both sides, CI of the ratio) and ``timing`` says whether
the machine was busy (load average) or a ratio's CI stayed wide.
Decoders: the rows are prefill (logits of the last position), plus decode tokens/s at
batch 1.
"""

from __future__ import annotations

import copy
import math
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
LATENCY_BUDGET_S = 30.0  # the whole latency table (every backend, precision and shape)

__all__ = [
    "dense_reference",
    "flop_count",
    "alternating_medians",
    "adaptive_timing",
    "median_ci",
    "compression_report",
    "format_report",
    "machine_info",
    "timing_warning",
    "summarize",
    "spread",
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
    return {k: v["median_ms"] for k, v in adaptive_timing(fns, runs, warmup, runs).items()}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci(xs: list[float]) -> tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median (order statistics:
    ranks n/2 -+ 0.98 sqrt(n)); the whole range for fewer than 6 values."""
    xs = sorted(xs)
    n = len(xs)
    if n < 6:
        return (xs[0], xs[-1]) if xs else (float("nan"), float("nan"))
    half = 0.98 * math.sqrt(n)
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return xs[lo], xs[hi]


def adaptive_timing(
    fns: dict[str, Callable[[], Any]],
    max_runs: int = 20,
    warmup: int = 3,
    min_runs: int = 5,
    budget_s: float | None = None,
    pairs: Iterable[tuple[str, str]] = (),
    rel_ci: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Interleaved timing rounds (every function once per round, so drift hits all
    equally) until each ratio ``a/b`` of ``pairs`` has a 95% CI narrower than ``rel_ci``
    of its value (after ``min_runs`` rounds), or ``max_runs`` rounds, or ``budget_s``.

    Per function: median_ms, p25_ms, p75_ms, runs, and the raw times (ms). The ratio of
    a pair is taken per round (paired: both ran back to back) so a slow second for the
    machine hits both sides."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    pairs = list(pairs)
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    min_runs = min(min_runs, max_runs)
    for n in range(1, max_runs + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
        over = budget_s is not None and time.perf_counter() - t_start >= budget_s
        if over and n >= min(3, max_runs):  # out of time: 3 rounds give a median and IQR
            break
        if n < min_runs:
            continue
        if pairs and all(_ci_tight(times[a], times[b], rel_ci) for a, b in pairs):
            break
    return {
        k: {
            "median_ms": statistics.median(v),
            "p25_ms": _quantile(v, 0.25),
            "p75_ms": _quantile(v, 0.75),
            "runs": len(v),
            "times_ms": v,
        }
        for k, v in times.items()
    }


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios a/b and its ~95% CI."""
    r = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    lo, hi = median_ci(r)
    return statistics.median(r), lo, hi


def _ci_tight(a: list[float], b: list[float], rel: float) -> bool:
    mid, lo, hi = paired_ratio(a, b)
    return mid > 0 and (hi - lo) <= rel * mid


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
    precisions: tuple[str, ...] = ("fp32", "int8"),
    budget_s: float | None = LATENCY_BUDGET_S,
    min_runs: int = 5,
    validation: dict[str, Any] | None = None,
) -> dict:
    """The report as a JSON-able dict (contract keys at the top level).

    ``runs`` caps the timed rounds per shape; timing stops earlier once the ratios are
    tight or ``budget_s`` (all latency rows together) is spent. ``validation``:
    {"examples": encoded classification examples, "pad_token_id", "regression"}, to
    measure the int8 model's metric against fp32 (the ``int8.validation`` block)."""
    comp = dict(manifest.compression)
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

    t_start = time.perf_counter()
    load_before = _load_average()
    groups = len(shapes) * sum(1 for k in ("torch", "onnxruntime") if k in backends)
    clock = _Budget(budget_s, groups)
    timing_kw = {"max_runs": runs, "warmup": warmup, "min_runs": min_runs}
    rows: list[dict] = []
    int8_models: dict[str, nn.Module] = {}
    if "torch" in backends:
        variants: dict[str, tuple[nn.Module, nn.Module]] = {"fp32": (dense, model)}
        if "int8" in precisions:
            from core.quantize import torch_int8

            int8_models = {"dense": torch_int8(dense), "pruned": torch_int8(model)}
            variants["int8"] = (int8_models["dense"], int8_models["pruned"])
        for b, t in shapes:
            ids, mask = _inputs(model, b, t)
            fns = {}
            for prec, (dm, pm) in variants.items():
                fns[f"dense/{prec}"] = _torch_fn(dm, ids, mask)
                fns[f"pruned/{prec}"] = _torch_fn(pm, ids, mask)
            timed = adaptive_timing(fns, budget_s=clock.next(), pairs=_pairs(variants), **timing_kw)
            rows += _rows("torch", b, t, timed, model, dense, lm_pos)
    if "onnxruntime" in backends:
        rows += _onnx_rows(model, dense, shapes, lm_pos, precisions, clock, timing_kw)
    report["latency"] = rows
    if is_lm and decode_tokens > 1:
        report["decode"] = _decode_tok_s(dense, model, 64, decode_tokens, decode_runs)
    report["timing"] = _timing_block(rows, load_before, time.perf_counter() - t_start, budget_s)
    report["machine"] = machine_info(load_before)
    report["timing_warning"] = timing_warning(report)
    if report["timing_warning"]:
        report["timing"]["warnings"].insert(0, report["timing_warning"])
    if "int8" in precisions:
        report["int8"] = _int8_block(rows, model, int8_models, artifact_dir, validation)
    report["summary"] = summarize(report)
    return report


class _Budget:
    """Splits a time budget over the timing groups still to run (what one group leaves
    unspent goes to the next)."""

    def __init__(self, total_s: float | None, groups: int) -> None:
        self.total = total_s
        self.left = max(1, groups)
        self.t0 = time.perf_counter()

    def next(self) -> float | None:
        if self.total is None:
            return None
        spent = time.perf_counter() - self.t0
        share = max(0.0, self.total - spent) / self.left
        self.left = max(1, self.left - 1)
        return share


def _pairs(variants: Iterable[str]) -> list[tuple[str, str]]:
    """The ratios whose CI decides when timing may stop."""
    out = [(f"pruned/{p}", f"dense/{p}") for p in variants]
    if "int8" in variants:
        out.append(("pruned/int8", "dense/fp32"))
    return out


WIDE_CI = 0.10  # a ratio CI wider than this share of the ratio is called noisy


def _timing_block(rows: list[dict], before: float | None, elapsed: float, budget) -> dict:
    after = _load_average()
    warnings: list[str] = []
    noisy = [
        f"{r['backend']}/{r['precision']} {r['batch']}x{r['seq_len']}"
        for r in rows
        if r.get("ratio_ci95")
        and r["ratio"] > 0
        and (r["ratio_ci95"][1] - r["ratio_ci95"][0]) > WIDE_CI * r["ratio"]
    ]
    if noisy:
        warnings.append(
            f"wide confidence interval (> {WIDE_CI:.0%} of the ratio) for: {', '.join(noisy)}"
        )
    return {
        "method": "interleaved rounds, adaptive: stop when every pruned/dense ratio's 95% "
        "CI is within 5% of it, or at the run cap, or at the time budget",
        "budget_s": budget,
        "elapsed_s": round(elapsed, 2),
        "load_avg_before": before,
        "load_avg_after": after,
        "warnings": warnings,
    }


def _rows(backend, b, t, timed, model, dense, lm_pos) -> list[dict]:
    """One row per precision timed: dense and pruned of that precision, side by side;
    ``vs_dense_fp32`` divides the pruned time by the dense fp32 time of the same
    backend and shape."""
    ideal = flop_count(model, b, t, lm_pos) / flop_count(dense, b, t, lm_pos)
    base = timed["dense/fp32"]
    out = []
    for prec in ("fp32", "int8"):
        if f"dense/{prec}" not in timed:
            continue
        d, p = timed[f"dense/{prec}"], timed[f"pruned/{prec}"]
        ratio = p["median_ms"] / d["median_ms"]
        _, lo, hi = paired_ratio(p["times_ms"], d["times_ms"])
        _, vlo, vhi = paired_ratio(p["times_ms"], base["times_ms"])
        out.append(
            {
                "backend": backend,
                "precision": prec,
                "batch": b,
                "seq_len": t,
                "dense_ms": round(d["median_ms"], 4),
                "pruned_ms": round(p["median_ms"], 4),
                "ratio": ratio,
                "speedup": d["median_ms"] / p["median_ms"] if p["median_ms"] > 0 else None,
                "flop_ideal_ratio": ideal,
                "measured_over_ideal": ratio / ideal,
                "vs_dense_fp32": p["median_ms"] / base["median_ms"],
                "runs": p["runs"],
                "ratio_ci95": [lo, hi],
                "vs_dense_fp32_ci95": [vlo, vhi],
                "dense_iqr_ms": [round(d["p25_ms"], 4), round(d["p75_ms"], 4)],
                "pruned_iqr_ms": [round(p["p25_ms"], 4), round(p["p75_ms"], 4)],
            }
        )
        for k, v in (("dense", d), ("pruned", p)):
            sp = spread(v["times_ms"])
            out[-1][f"{k}_p10_ms"], out[-1][f"{k}_p90_ms"] = sp["p10_ms"], sp["p90_ms"]
            out[-1][f"{k}_relative_spread"] = sp["relative_spread"]
    return out


def _onnx_rows(model, dense, shapes, lm_pos, precisions, clock, timing_kw) -> list[dict]:
    from core.onnx_export import OnnxRunner, export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "dense/fp32": export_onnx(dense, Path(tmp) / "dense.onnx", last_only=True),
            "pruned/fp32": export_onnx(model, Path(tmp) / "pruned.onnx", last_only=True),
        }
        if "int8" in precisions:
            from core.quantize import quantize_onnx

            for side in ("dense", "pruned"):
                files[f"{side}/int8"] = quantize_onnx(
                    files[f"{side}/fp32"], Path(tmp) / f"{side}.int8.onnx"
                )
        runners = {k: OnnxRunner(f) for k, f in files.items()}
        variants = sorted({k.split("/")[1] for k in files})
        for b, t in shapes:
            ids, mask = _inputs(model, b, t)
            x, am = ids.numpy(), mask.numpy()
            fns = {k: partial(r, x, am) for k, r in runners.items()}
            timed = adaptive_timing(fns, budget_s=clock.next(), pairs=_pairs(variants), **timing_kw)
            rows += _rows("onnxruntime", b, t, timed, model, dense, lm_pos)
    return rows


def _int8_block(rows, model, int8_models, artifact_dir, validation) -> dict:
    """Which int8 form serving uses (the faster one at the largest batch timed) and, when
    a validation set was given, the accuracy of fp32 and int8 on it."""
    from core.quantize import INT8_ONNX, int8_verdict, validation_metrics

    int8_rows = [r for r in rows if r["precision"] == "int8"]
    serving = "torch"
    if int8_rows:
        big = max(int8_rows, key=lambda r: (r["batch"] * r["seq_len"], r["backend"] == "torch"))
        same = [
            r for r in int8_rows if (r["batch"], r["seq_len"]) == (big["batch"], big["seq_len"])
        ]
        serving = min(same, key=lambda r: r["pruned_ms"])["backend"]
    onnx_file = artifact_dir is not None and (Path(artifact_dir) / INT8_ONNX).is_file()
    if serving == "onnxruntime" and not onnx_file:
        serving = "torch"
    block: dict[str, Any] = {
        "quantization": "dynamic int8 of every Linear (weights per tensor, activations "
        "per call); torch: torch.ao quantize_dynamic at load; onnxruntime: quantize_dynamic "
        f"QInt8 ({INT8_ONNX})",
        "serving_backend": serving,
        "onnx_file": INT8_ONNX if onnx_file else None,
        "validation": None,
    }
    if validation is None or isinstance(model, PrunedLlamaModel):
        return block
    q = int8_models.get("pruned")
    if q is None:
        from core.quantize import torch_int8

        q = torch_int8(model)
    runners = {"fp32": _enc_logits(model), "int8": _enc_logits(q)}
    if serving == "onnxruntime":
        from core.onnx_export import OnnxRunner

        r = OnnxRunner(Path(artifact_dir) / INT8_ONNX)
        runners["int8"] = lambda f: r(f["input_ids"], f["attention_mask"], f.get("token_type_ids"))
    m = validation_metrics(
        runners, validation["examples"], int(validation.get("pad_token_id") or 0),
        regression=bool(validation.get("regression")),
    )  # fmt: skip
    block["validation"] = int8_verdict(
        m["fp32"], m["int8"], len(validation["examples"]), bool(validation.get("regression"))
    )
    return block


def _enc_logits(model: nn.Module) -> Callable[[dict], Any]:
    def run(feeds: dict) -> Any:
        return model(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))

    return run


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
        ci = row.get("ratio_ci95")
        band = f" CI [{ci[0]:.3f}, {ci[1]:.3f}], {row.get('runs')} runs" if ci else ""
        if "dense_p10_ms" in row:
            band += (
                f"  p10-p90 dense {row['dense_p10_ms']:.2f}-{row['dense_p90_ms']:.2f}, "
                f"pruned {row['pruned_p10_ms']:.2f}-{row['pruned_p90_ms']:.2f}"
            )
        lines.append(
            f"    {row['backend']:<12} {row.get('precision', 'fp32'):<5} "
            f"{row['batch']:>3}x{row['seq_len']:<4} "
            f"{row['dense_ms']:9.2f} {row['pruned_ms']:9.2f}  ratio {row['ratio']:.3f} "
            f"(ideal {row['flop_ideal_ratio']:.3f}, measured/ideal "
            f"{row['measured_over_ideal']:.2f}; vs dense fp32 "
            f"{row.get('vs_dense_fp32', row['ratio']):.3f}){band}"
        )
    for w in (r.get("timing") or {}).get("warnings", []):
        lines.append(f"  warning: {w}")
    val = (r.get("int8") or {}).get("validation")
    if val:
        lines.append(
            f"  int8 validation {val['metric']}: fp32 {val['fp32']:.4f}, int8 {val['int8']:.4f} "
            f"on {val['examples']} examples (within {val['tolerance']}: {val['within_tolerance']})"
        )
    d = r.get("decode")
    if d:
        lines.append(
            f"  decode: {d['dense_tok_s']:.1f} -> {d['pruned_tok_s']:.1f} tok/s "
            f"(x{d['ratio']:.2f}; FLOP-ideal x{d['flop_ideal_speedup']:.2f})"
        )
    mi = r.get("machine")
    if mi:
        lines.append(
            f"  measured on {mi.get('cpu')} ({mi.get('logical_cpus')} CPUs, "
            f"{mi.get('torch_threads')} torch threads, load average "
            f"{mi.get('load_average_before')} -> {mi.get('load_average_after')})"
        )
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
        + (f" {r['precision']}" if r.get("precision", "fp32") != "fp32" else "")
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
    rows = [
        r
        for r in report.get("latency", [])
        if r.get("backend") == "torch" and r.get("precision", "fp32") == "fp32"
    ]
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
