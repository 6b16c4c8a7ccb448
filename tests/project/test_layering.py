"""Dependencies run core <- api <- worker: no module under api/ imports worker.

Read from the source (AST), not from sys.modules after an import: an import inside a
function only runs when that function does, and it still makes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the module named ``module``) imports, wherever it does:
    import statements at any depth, and ``importlib.import_module("...")`` /
    ``__import__("...")`` with a literal name."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.add(node.args[0].value)
    return found


def _module_name(path: Path) -> str:
    # a package's __init__ keeps its name part, so relative imports resolve to the package
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_no_api_module_imports_worker() -> None:
    files = sorted((ROOT / "api").rglob("*.py"))
    assert len(files) > 20  # the walk really covers the package
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m
            for m in imported_modules(p.read_text(encoding="utf-8"), _module_name(p))
            if m == "worker" or m.startswith("worker.")
        )
        for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_every_form_of_import() -> None:
    source = (
        "import os\n"
        "def later():\n"
        "    from worker.tasks import run_job\n"
        "    import worker.reaper as r\n"
        "    importlib.import_module('worker.cli')\n"
        "    __import__('worker')\n"
        "from . import deps\n"
        "from ..queue import publish\n"
    )
    got = imported_modules(source, "api.routes.jobs")
    assert {"worker.tasks", "worker.reaper", "worker.cli", "worker"} <= got
    assert {"api.routes.deps", "api.queue", "api.queue.publish", "os"} <= got
