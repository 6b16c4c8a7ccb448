"""No pickle anywhere: not in the code paths, not in the artifacts.

The code scan walks the AST of every .py file outside tests/ (docstrings and comments that
*mention* pickle are fine; using it is not): pickle-family imports, torch.load/torch.save
(both pickle-based), trust_remote_code=True, weights_only=False, allow_pickle=True, and
"pickle" as a serializer name (e.g. Celery accept_content).
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", "venv", ".git", "tests", "node_modules", "build", "dist", ".agents"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
BAD_KWARGS = {("trust_remote_code", True), ("weights_only", False), ("allow_pickle", True)}


def _py_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        out.append(p)
    return sorted(out)


def _violations(source: str) -> list[str]:
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "torch" and node.attr in ("load", "save"):
                found.append(f"torch.{node.attr}")
            if node.value.id in PICKLE_MODULES:
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
            if (node.arg, node.value.value) in BAD_KWARGS:
                found.append(f"{node.arg}={node.value.value}")
        elif isinstance(node, ast.List | ast.Tuple | ast.Set):
            for elt in node.elts:  # serializer lists like accept_content=["pickle"]
                if isinstance(elt, ast.Constant) and elt.value == "pickle":
                    found.append("'pickle' serializer")
        elif isinstance(node, ast.keyword) and node.arg and "serializer" in node.arg:
            if isinstance(node.value, ast.Constant) and node.value.value == "pickle":
                found.append(f"{node.arg}='pickle'")
    return found


def test_scanner_catches_what_it_should():
    bad = (
        "import pickle\nfrom joblib import dump\nimport torch\ntorch.load('x')\n"
        "f(trust_remote_code=True, weights_only=False)\napp.conf.accept_content=['pickle']\n"
    )
    assert len(_violations(bad)) == 6
    ok = (
        '"""never pickle, never torch.load"""\n# torch.load is banned\nf(trust_remote_code=False)\n'
    )
    assert _violations(ok) == []


def test_no_pickle_in_code_paths():
    files = _py_files()
    assert any(p.name == "artifacts.py" for p in files)  # the scan really covers core/
    problems = {}
    for p in files:
        v = _violations(p.read_text(encoding="utf-8"))
        if v:
            problems[str(p.relative_to(ROOT))] = v
    assert problems == {}


def _check_safetensors(path: Path) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert isinstance(header, dict) and header  # a JSON header, then raw tensor bytes


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_artifact_holds_no_pickle(tmp_path, family):
    from core.artifacts import save_artifact
    from core.package import rebuild_artifact
    from core.prune import prune_model
    from tests.support.prune_fixtures import apply_pattern, reference_plan
    from tests.support.tiny_models import (
        build_bert_tokenizer,
        build_llama_tokenizer,
        build_tiny_bert_cls,
        build_tiny_llama,
    )

    build = build_tiny_bert_cls if family == "bert" else build_tiny_llama
    model = apply_pattern(build(seed=0), "none")
    pm, plan = prune_model(model, reference_plan(model))
    tok = build_bert_tokenizer(tmp_path / "t") if family == "bert" else build_llama_tokenizer()
    save_artifact(pm, tok, tmp_path / "a", plan=plan, task="x")
    rebuild_artifact(tmp_path / "a", onnx=True)
    files = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert p.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}, p
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p
        if p.suffix == ".safetensors":
            _check_safetensors(p)
        elif p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
