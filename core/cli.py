"""The engine commands `finegates train | prune | export | bench`, usable without the service.

``register(subparsers)`` adds them to a parser: the ``finegates`` console script
(worker/cli.py) composes them with the service commands, and ``python -m core.cli`` runs
them alone. Registering only declares arguments; every handler imports what it needs
when it runs, so ``finegates train --help`` loads neither torch nor the service stack.

Why ``run(args)`` returns an exit code instead of calling sys.exit deep inside: the
composed CLI reuses it. User errors (bad data, bad hyperparameters, unknown model) print
one line that names the file/line or the parameter on stderr and exit 2; internal faults
exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core import cli_prune
from core.callbacks import CheckpointRecord, EvalRecord, StepRecord
from core.errors import ConfigError, FineGatesError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _parse_hp_value(raw: str) -> Any:
    """--hp values: JSON when it parses (numbers, true/false, lists), else the raw string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_hp(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise ConfigError(item, "expected NAME=VALUE after --hp")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_hp_value(v.strip())
    return out


class ProgressBar:
    """tqdm bar: the task loss, the sparsity penalty (and distillation) apart, measured
    sparsity (at the last eval) and ETA. The total is not shown: it includes the weighted
    penalty and would read as divergence while the gates close."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def _ensure(self, total: int, initial: int) -> None:
        if self.bar is None and not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=max(0, initial - 1), unit="step",
                            dynamic_ncols=True, file=sys.stderr)  # fmt: skip

    def on_step(self, r: StepRecord) -> None:
        self._ensure(r.total_steps, r.step)
        if self.bar is not None:
            post = {"loss": f"{r.task_loss:.4f}", "penalty": f"{r.loss - r.task_loss:.4f}"}
            if r.measured_sparsity is not None:
                post["sparsity"] = f"{r.measured_sparsity:.3f}"
            if r.eta_seconds is not None:
                post["eta"] = f"{r.eta_seconds:.0f}s"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_eval(self, r: EvalRecord) -> None:
        msg = " ".join(f"{k}={v:.4g}" for k, v in r.metrics.items())
        line = f"[eval step {r.step}] {msg} measured_sparsity={r.measured_sparsity:.4f}"
        if r.is_best:
            line += " (best)"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif not self.quiet:
            print(line, file=sys.stderr)

    def on_checkpoint(self, r: CheckpointRecord) -> None:
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="run a FineGates job locally (no service)")
    p.add_argument("--model", help="model id (minilm-l6, smollm2-135m, registered id, folder)")
    p.add_argument("--training-file", help="JSONL or CSV training data")
    p.add_argument("--validation-file", default=None)
    p.add_argument("--task", choices=["classification", "causal_lm", "sparsify"], default=None)
    p.add_argument("--hp", action="append", metavar="NAME=VALUE", default=[],
                   help="hyperparameter (repeatable), e.g. --hp target_sparsity=0.4")  # fmt: skip
    p.add_argument("--config", default=None, help="job config JSON (flags override it)")
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--data-dir", default=None, help="model cache / registry directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--allow-hub", action="store_true", help="allow Hugging Face hub model ids")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)


def build_config(args: argparse.Namespace) -> Any:
    from core.config import Hyperparameters, JobConfig

    base: dict[str, Any] = {}
    if args.config:
        base = JobConfig.load(args.config).to_dict()
    hp = dict(base.get("hyperparameters") or {})
    hp.update(parse_hp(args.hp))
    for flag, key in (
        ("model", "model"),
        ("training_file", "training_file"),
        ("validation_file", "validation_file"),
        ("task", "task"),
        ("data_dir", "data_dir"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            base[key] = v
    if getattr(args, "allow_hub", False):
        base["allow_hub"] = True
    for req, flag in (("model", "--model"), ("training_file", "--training-file")):
        if not base.get(req):
            raise ConfigError(req, f"is required ({flag} or --config)")
    base["hyperparameters"] = Hyperparameters.from_dict(hp).to_dict()
    return JobConfig.from_dict(base)


def _cmd_train(args: argparse.Namespace) -> int:
    from core.train import train

    cfg = build_config(args)
    bar = ProgressBar(quiet=args.quiet)
    try:
        res = train(cfg, Path(args.output), callback=bar, resume=not args.no_resume,
                    device=args.device)  # fmt: skip
    finally:
        bar.close()
    summary = {
        "status": res.status,
        "steps": res.steps,
        "measured_sparsity": res.measured_sparsity,
        "best_step": res.best_step,
        "best_metrics": res.best_metrics,
        "target_reached": res.target_reached,
        "final_dir": res.final_dir,
    }
    print(json.dumps(summary, default=float))
    return 0


def register(subparsers: Any) -> None:
    """Add train, prune, export and bench to ``subparsers`` (an ``add_subparsers()`` result)."""
    _add_train(subparsers)
    cli_prune.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The engine commands alone (``python -m core.cli``)."""
    parser = argparse.ArgumentParser(
        prog="finegates", description="FineGates: finetune while compressing"
    )
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``); engine errors become one line and an exit code."""
    try:
        return int(args.func(args) or 0)
    except FineGatesError as exc:
        where = ""
        if isinstance(exc, ConfigError):
            where = f" (parameter: {exc.field})"
        print(f"error [{exc.code}]{where}: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR if exc.user_error else EXIT_INTERNAL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
