"""Issue-3 pruning benchmark: is the pruned model really faster, and by how much?

Inputs (one of):
- run dirs from the engine benchmark: --minilm-run RUN (MiniLM FineGates@0.4) and
  --smollm-run RUN (SmolLM2-135M sparsified at 0.3), or --engine-out DIR which means
  DIR/runs/finegates_0.4 and DIR/runs/smollm2_sparsify_0.3;
- --synthetic: the real packaged models with random STRUCTURED gates closing a given
  fraction (--minilm-fraction 0.4, --smollm-fraction 0.3) of every gated group (q/k
  dims or RoPE pairs, v/o dims, FFN neurons), so it runs without training.

Each model is pruned into an artifact under --out, then measured in ONE process:
- pruned/dense latency, torch and onnxruntime, at 1x64 and 32x128 (median of --runs
  alternating runs), next to the FLOP-ideal ratio (measured/ideal);
- dynamic int8 (torch.ao.quantization.quantize_dynamic on every nn.Linear) dense vs
  pruned: the alternative a user would pick instead, and whether pruning stacks on it;
- SmolLM2: prefill (last-position logits) latency and decode tokens/s, pruned/dense.
"Dense" = the same engine at the base model's full shapes (core.report.dense_reference).

Prints a markdown table and writes --out/bench_prune.json. Do not run the full version
on a shared 2-core box; a smoke run:

    .venv/bin/python bench/bench_prune.py --synthetic --out /tmp/fg_prune --smoke
    .venv/bin/python bench/bench_prune.py --engine-out /tmp/fg_bench --out /tmp/fg_prune
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

TARGETS = {
    ("minilm", "torch", 32, 128): 0.68,
    ("minilm", "torch", 1, 64): 0.75,
}


# ----------------------------------------------------------------------------- inputs
def synthetic_gates(model: nn.Module, fraction: float, seed: int = 0) -> nn.Module:
    """Gate every default target, all open, then close `fraction` of each coupled group
    in every layer/head: q/k dims (through k rows; RoPE: whole pairs), v/o dims (v rows)
    and FFN neurons (up rows)."""
    from core.gates import GateConfig, inject_gates

    inject_gates(model, None, GateConfig(seed=seed))
    gen = torch.Generator().manual_seed(seed)
    closed, open_ = -3.0, 3.0
    for n, p in model.named_parameters():
        if n.endswith(("row_logits", "col_logits")):
            p.data.fill_(open_)
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    llama = hasattr(model, "model") and hasattr(model.model, "layers")
    kv = (getattr(cfg, "num_key_value_heads", None) or H) if llama else H

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=gen)[:k].tolist()

    if llama:
        layers = [
            (ly.self_attn.k_proj, ly.self_attn.v_proj, ly.mlp.up_proj) for ly in model.model.layers
        ]
    else:
        enc = getattr(model, "bert", None) or getattr(model, "roberta", None) or model
        layers = [
            (ly.attention.self.key, ly.attention.self.value, ly.intermediate.dense)
            for ly in enc.encoder.layer
        ]
    with torch.no_grad():
        for k, v, up in layers:
            for g in range(kv):
                if llama:
                    half = hd // 2
                    pairs = pick(half, round(fraction * half))
                    dims = pairs + [d + half for d in pairs]
                else:
                    dims = pick(hd, round(fraction * hd))
                k.row_logits[[g * hd + d for d in dims]] = closed
                v.row_logits[[g * hd + d for d in pick(hd, round(fraction * hd))]] = closed
            n_ffn = up.row_logits.shape[0]
            up.row_logits[pick(n_ffn, round(fraction * n_ffn))] = closed
    return model.eval()


def _synthetic_artifact(name: str, fraction: float, out: Path, **prune_kw) -> Path:
    from core.artifacts import save_artifact
    from core.catalog import resolve_model
    from core.modeling import load_base
    from core.package import original_shape
    from core.prune import compression_figures, diff_and_scale, prune_model
    from core.train import default_data_dir

    data_dir = default_data_dir()  # the fp32 SmolLM2 cache is shared with training
    if name == "minilm":
        path = resolve_model("minilm-l6", data_dir)
        base = load_base(path, "classification", labels=["negative", "positive"])
        task = "classification"
    else:
        path = resolve_model("smollm2-135m", data_dir)
        base = load_base(path, "causal_lm")
        task = "causal_lm"
    torch.manual_seed(0)
    gated = synthetic_gates(base.model, fraction)
    pruned, plan = prune_model(gated, **prune_kw)
    comp = compression_figures(gated, pruned, plan)
    diff, scale = diff_and_scale(gated, pruned, batch=2, seq_len=32)
    comp["max_abs_diff_vs_gated"] = diff
    comp["max_rel_diff_vs_gated"] = diff / scale if scale else 0.0
    art = out / f"{name}_synthetic_{fraction}"
    save_artifact(
        pruned,
        base.tokenizer,
        art,
        plan=plan,
        base_model=str(path),
        task=task,
        compression=comp,
        original_shape=original_shape(gated),
        extra={"synthetic_fraction": fraction},
    )
    return art


def _run_artifact(run_dir: Path, out: Path, name: str, **prune_kw) -> Path:
    from core.package import build_artifact

    art = out / f"{name}_artifact"
    build_artifact(run_dir, art, onnx=False, report=False, prune_kwargs=prune_kw)
    return art


# ----------------------------------------------------------------------------- measure
def _int8_rows(model, dense, shapes, runs, warmup) -> list[dict]:
    from core.pruned import PrunedLlamaModel
    from core.report import _inputs, _torch_fn, alternating_medians, flop_count

    qd = torch.ao.quantization.quantize_dynamic(dense, {nn.Linear}, dtype=torch.qint8)
    qp = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    lm_pos = 1 if isinstance(model, PrunedLlamaModel) else None
    rows = []
    for b, t in shapes:
        ids, mask = _inputs(model, b, t)
        med = alternating_medians(
            {
                "fp32_dense": _torch_fn(dense, ids, mask),
                "int8_dense": _torch_fn(qd, ids, mask),
                "int8_pruned": _torch_fn(qp, ids, mask),
            },
            runs=runs,
            warmup=warmup,
        )
        ideal = flop_count(model, b, t, lm_pos) / flop_count(dense, b, t, lm_pos)
        rows.append(
            {
                "backend": "torch-int8-dynamic",
                "batch": b,
                "seq_len": t,
                "fp32_dense_ms": med["fp32_dense"],
                "dense_ms": med["int8_dense"],
                "pruned_ms": med["int8_pruned"],
                "ratio": med["int8_pruned"] / med["int8_dense"],
                "int8_dense_over_fp32_dense": med["int8_dense"] / med["fp32_dense"],
                "flop_ideal_ratio": ideal,
            }
        )
    return rows


def measure(art: Path, shapes, runs: int, warmup: int, decode_tokens: int, decode_runs: int):
    from core.artifacts import load_artifact
    from core.report import compression_report, dense_reference

    loaded = load_artifact(art, load_tokenizer=False)
    dense = dense_reference(loaded.model, loaded.manifest.get("original_shape"))
    t0 = time.time()
    report = compression_report(
        loaded.model,
        loaded.manifest,
        artifact_dir=art,
        shapes=shapes,
        runs=runs,
        warmup=warmup,
        decode_tokens=decode_tokens,
        decode_runs=decode_runs,
        dense=dense,
    )
    report["int8"] = _int8_rows(loaded.model, dense, shapes, runs, warmup)
    report["bench_seconds"] = time.time() - t0
    (art / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


# ----------------------------------------------------------------------------- output
def table(results: dict[str, dict]) -> str:
    lines = [
        "| model | measurement | dense | pruned | pruned/dense | FLOP-ideal | measured/ideal | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | gated params removed (physical / paper count) | "
            f"{r['gated_params_before']} | {r['gated_params_after']} | "
            f"{r['gated_params_after'] / r['gated_params_before']:.3f} | | | "
            f"paper: {100 * (r.get('paper_removed_fraction') or 0):.1f}% removed |"
        )
        lines.append(
            f"| {name} | whole-model params | {r['params_before']} | {r['params_after']} | "
            f"{r['params_after'] / r['params_before']:.3f} | | | |"
        )
        for row in r["latency"] + r.get("int8", []):
            key = (name, row["backend"], row["batch"], row["seq_len"])
            target = TARGETS.get(key)
            tgt = f"<= {target}" if target else ""
            if row["backend"] == "torch" and name == "minilm" and row["batch"] == 32:
                tgt += " ; measured/ideal <= 1.10"
            ideal = row["flop_ideal_ratio"]
            unit = "ms"
            label = f"{row['backend']} {row['batch']}x{row['seq_len']} latency ({unit})"
            if name != "minilm":
                label = f"{row['backend']} {row['batch']}x{row['seq_len']} prefill ({unit})"
            lines.append(
                f"| {name} | {label} | {row['dense_ms']:.2f} | {row['pruned_ms']:.2f} | "
                f"{row['ratio']:.3f} | {ideal:.3f} | {row['ratio'] / ideal:.2f} | {tgt} |"
            )
            if "int8_dense_over_fp32_dense" in row:
                lines.append(
                    f"| {name} | int8 dense / fp32 dense {row['batch']}x{row['seq_len']} | "
                    f"{row['fp32_dense_ms']:.2f} | {row['dense_ms']:.2f} | "
                    f"{row['int8_dense_over_fp32_dense']:.3f} | | | (the alternative) |"
                )
        d = r.get("decode")
        if d:
            lines.append(
                f"| {name} | decode tokens/s (batch 1, {d['new_tokens']} new) | "
                f"{d['dense_tok_s']:.1f} | {d['pruned_tok_s']:.1f} | x{d['ratio']:.2f} | "
                f"x{d['flop_ideal_speedup']:.2f} | | >= x1.3 |"
            )
        rel = r.get("max_rel_diff_vs_gated") or 0.0
        lines.append(
            f"| {name} | max abs diff pruned vs gated (relative) | | "
            f"{r['max_abs_diff_vs_gated']:.2e} ({rel:.1e}) | | | | <= 1e-4 |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-out", type=Path, help="bench_engine.py --out directory")
    ap.add_argument("--minilm-run", type=Path)
    ap.add_argument("--smollm-run", type=Path)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--minilm-fraction", type=float, default=0.4)
    ap.add_argument("--smollm-fraction", type=float, default=0.3)
    ap.add_argument("--only", choices=["minilm", "smollm"], help="benchmark one model")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--lm-runs", type=int, default=20, help="runs per shape for SmolLM2")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shapes", default="1x64,32x128")
    ap.add_argument("--lm-shapes", default="1x64,32x128")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--smoke", action="store_true", help="tiny run counts and shapes")
    ap.add_argument(
        "--ffn-multiple", type=int, default=1, help="keep dead FFN neurons up to a multiple"
    )
    ap.add_argument(
        "--dim-multiple", type=int, default=1, help="keep dead head dims up to a multiple"
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    def shapes(text: str):
        return tuple(tuple(int(x) for x in s.split("x")) for s in text.split(","))

    if a.smoke:
        a.runs = a.lm_runs = 2
        a.warmup = 1
        a.shapes = "1x16,2x32"
        a.lm_shapes = "1x16,2x32"
        a.decode_tokens, a.decode_runs = 4, 1
    a.out.mkdir(parents=True, exist_ok=True)
    if a.engine_out:
        a.minilm_run = a.minilm_run or a.engine_out / "runs" / "finegates_0.4"
        a.smollm_run = a.smollm_run or a.engine_out / "runs" / "smollm2_sparsify_0.3"
    kw = {"ffn_multiple": a.ffn_multiple, "dim_multiple": a.dim_multiple}
    jobs = []
    for name, run, frac in (
        ("minilm", a.minilm_run, a.minilm_fraction),
        ("smollm2", a.smollm_run, a.smollm_fraction),
    ):
        if a.only and not name.startswith(a.only):
            continue
        if a.synthetic:
            jobs.append((name, lambda n=name, f=frac: _synthetic_artifact(n, f, a.out, **kw)))
        elif run is not None:
            jobs.append((name, lambda r=run, n=name: _run_artifact(r, a.out, n, **kw)))
    if not jobs:
        ap.error("give --synthetic, --engine-out, --minilm-run or --smollm-run")
    results = {}
    for name, make in jobs:
        print(f"[{name}] pruning ...", file=sys.stderr, flush=True)
        art = make()
        lm = name == "smollm2"
        print(f"[{name}] measuring {art} ...", file=sys.stderr, flush=True)
        results[name] = measure(
            art,
            shapes(a.lm_shapes if lm else a.shapes),
            a.lm_runs if lm else a.runs,
            a.warmup,
            a.decode_tokens if lm else 0,
            a.decode_runs,
        )
    (a.out / "bench_prune.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    print(f"\ntorch threads: {torch.get_num_threads()}; json: {a.out / 'bench_prune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
