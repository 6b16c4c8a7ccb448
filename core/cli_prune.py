"""`finegates prune | export | bench`: the artifact commands (registered by core.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    """Add prune/export/bench to core.cli's subparsers."""
    p = subparsers.add_parser("prune", help="physically prune a trained gated run")
    p.add_argument("run_dir", type=Path, help="training run directory (with final/)")
    p.add_argument("--output", "-o", type=Path, required=True, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_cmd_prune)

    e = subparsers.add_parser("export", help="export an artifact (ONNX)")
    e.add_argument("artifact_dir", type=Path)
    e.add_argument("--onnx", action="store_true", required=True, help="write model.onnx")
    e.set_defaults(func=_cmd_export)

    b = subparsers.add_parser("bench", help="compression report: params, sizes, latency")
    b.add_argument("artifact_dir", type=Path)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--runs", type=int, default=20, help="timed runs per model and shape")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument(
        "--shapes",
        default="1x64,32x128",
        help="comma-separated BATCHxSEQ shapes (default 1x64,32x128)",
    )
    b.add_argument(
        "--backends", default="torch,onnxruntime", help="torch and/or onnxruntime (comma list)"
    )
    b.add_argument("--decode-tokens", type=int, default=32, help="decoders: tokens per run")
    b.add_argument("--no-save", action="store_true", help="do not write report.json")
    b.set_defaults(func=_cmd_bench)


def _cmd_prune(args: argparse.Namespace) -> int:
    from core.prune import prune_run

    manifest = prune_run(args.run_dir, args.output)
    c = manifest.get("compression", {})
    if args.json:
        print(json.dumps(manifest, default=float))
    else:
        print(
            f"wrote {args.output}: gated params {c.get('gated_params_before')} -> "
            f"{c.get('gated_params_after')} ({100 * c.get('gated_removed_fraction', 0):.1f}% "
            f"removed), max |pruned - gated| = {c.get('max_abs_diff_vs_gated'):.2e}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from core.onnx_export import export_artifact_onnx

    path = export_artifact_onnx(args.artifact_dir)
    print(f"wrote {path}")
    return 0


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    from core.errors import ConfigError

    out = []
    for part in text.split(","):
        try:
            b, t = part.lower().split("x")
            out.append((int(b), int(t)))
        except ValueError:
            raise ConfigError("shapes", f"expected BATCHxSEQ like 32x128, got {part!r}") from None
    return tuple(out)


def _cmd_bench(args: argparse.Namespace) -> int:
    from core.artifacts import load_artifact
    from core.report import compression_report, format_report

    loaded = load_artifact(args.artifact_dir, load_tokenizer=False)
    report = compression_report(
        loaded.model,
        loaded.manifest,
        artifact_dir=args.artifact_dir,
        shapes=_parse_shapes(args.shapes),
        runs=args.runs,
        warmup=args.warmup,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        decode_tokens=args.decode_tokens,
    )
    if not args.no_save:  # not hashed in the manifest: a measurement, re-made at will
        (Path(args.artifact_dir) / "report.json").write_text(
            json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8"
        )
    print(json.dumps(report, default=float) if args.json else format_report(report))
    return 0
