"""`finegates prune | export | bench`: the artifact commands (registered by core.cli).

All three go through core.package, the pipeline the worker uses: an artifact is built
in a staging folder and published with one rename, its manifest hashing every file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.package import PackageEvent


def register(subparsers) -> None:
    """Add prune/export/bench to core.cli's subparsers."""
    p = subparsers.add_parser("prune", help="physically prune a trained gated run")
    p.add_argument("run_dir", type=Path, help="training run directory (with final/)")
    p.add_argument("--output", "-o", type=Path, required=True, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_cmd_prune)

    e = subparsers.add_parser(
        "export",
        help="export an artifact (ONNX)",
        description="Add model.onnx to an existing artifact. The artifact is rebuilt in a "
        "staging folder beside it (files checked against the manifest, model.onnx added, "
        "manifest re-hashed) and republished in place with one rename: readers see the "
        "old artifact or the new one, never a mix. If the export fails, the artifact is "
        "left as it was.",
    )
    e.add_argument("artifact_dir", type=Path)
    e.add_argument("--onnx", action="store_true", required=True, help="write model.onnx")
    e.set_defaults(func=_cmd_export)

    b = subparsers.add_parser("bench", help="compression report: params, sizes, latency")
    b.add_argument("artifact_dir", type=Path)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--runs", type=int, default=20,
        help="at most this many timed rounds per shape (fewer once the ratios are tight or "
        "the 30 s latency budget is spent)",
    )  # fmt: skip
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
    b.add_argument(
        "--no-save",
        action="store_true",
        help="do not write report.json (by default it is added to the artifact, which is "
        "republished with a re-hashed manifest)",
    )
    b.set_defaults(func=_cmd_bench)


def _warn(event: PackageEvent) -> None:
    if event.level == "warning":
        print(f"warning: {event.message}", file=sys.stderr)


def _cmd_prune(args: argparse.Namespace) -> int:
    from core.package import build_artifact

    result = build_artifact(args.run_dir, args.output, onnx=False, report=False, on_event=_warn)
    manifest = result.manifest
    c = manifest.compression
    if args.json:
        print(json.dumps(manifest.to_dict(), default=float))
    else:
        print(
            f"wrote {args.output}: gated params {c.get('gated_params_before')} -> "
            f"{c.get('gated_params_after')} ({100 * c.get('gated_removed_fraction', 0):.1f}% "
            f"removed), max |pruned - gated| = {c.get('max_abs_diff_vs_gated'):.2e}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from core.manifest import ONNX
    from core.package import rebuild_artifact

    rebuild_artifact(args.artifact_dir, onnx=True, on_event=_warn)
    print(f"wrote {Path(args.artifact_dir) / ONNX}")
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
    from core.package import measure, rebuild_artifact
    from core.report import format_report

    kw: dict[str, Any] = {
        "shapes": _parse_shapes(args.shapes),
        "backends": tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        "runs": args.runs,
        "warmup": args.warmup,
        "decode_tokens": args.decode_tokens,
    }
    report: dict[str, Any] | None
    if args.no_save:
        report = measure(args.artifact_dir, **kw)
    else:
        report = rebuild_artifact(args.artifact_dir, report=True, on_event=_warn, **kw).report
    assert report is not None  # a required phase here: it raises instead of giving None
    print(json.dumps(report, default=float) if args.json else format_report(report))
    return 0
