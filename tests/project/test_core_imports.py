"""core/ must import without the service stack (house rule; internals.md)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import core

FORBIDDEN = ("fastapi", "starlette", "celery", "sqlalchemy", "alembic", "api", "worker")
ROOT = Path(__file__).resolve().parents[2]


def _core_modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(core.__path__, prefix="core.") if "__" not in m.name
    )


def test_every_core_module_imports_without_service_stack():
    mods = _core_modules()
    assert {"core.gates", "core.structure", "core.objective"} <= set(mods)
    code = (
        "import importlib, json, sys\n"
        f"mods = {mods!r}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_forbidden_check_would_catch_a_leak():
    """The probe itself works: importing sqlalchemy shows up in the same check."""
    code = (
        "import json, sys, sqlalchemy\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sqlalchemy" in json.loads(out.stdout.strip().splitlines()[-1])
