"""ruff and mypy as tests, so the normal test run enforces the house style and types.

Both run with the venv's interpreter (sys.executable -m ...) from the repo root, where
pyproject.toml holds their settings. mypy keeps its default cache (.mypy_cache), so a warm
run takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORMAT_DIRS = ["core", "api", "worker", "tests", "bench", "migrations"]
TYPED_DIRS = ["core", "api", "worker"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, proc.args))}\n{proc.stdout}{proc.stderr}"


def test_ruff_check_and_format() -> None:
    check = _run("ruff", "check", ".")
    assert check.returncode == 0, _report(check)
    fmt = _run("ruff", "format", "--check", *FORMAT_DIRS)
    assert fmt.returncode == 0, _report(fmt)


def test_mypy() -> None:
    proc = _run("mypy", *TYPED_DIRS)
    assert proc.returncode == 0, _report(proc)
