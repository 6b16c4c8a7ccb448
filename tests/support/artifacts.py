"""Helpers for tests that need a gated run directory or a hand-edited artifact.

``reseal`` re-hashes an artifact's files into its manifest: what a writer with access to
the storage could do after editing a file. Tests use it to build artifacts with chosen
contents (a synthetic report.json) and to check that the reader's other defences still
hold when the hashes match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.artifacts import read_manifest, seal
from core.gates import gated_modules
from core.manifest import Manifest
from core.rundir import RunDir
from tests.support.tiny_models import build_bert_tokenizer


def reseal(artifact: Path) -> Manifest:
    """Hash every file of ``artifact`` into its manifest again (a forger's step)."""
    return seal(artifact, read_manifest(artifact))


def write_report(artifact: Path, rows: list[dict[str, Any]], hashed: bool = True) -> None:
    """A report.json with these latency rows; listed in the manifest when ``hashed``."""
    (artifact / "report.json").write_text(json.dumps({"latency": rows}), encoding="utf-8")
    if hashed:
        reseal(artifact)


def fake_artifact_dir(directory: Path, with_onnx: bool = True) -> Path:
    """A folder with a valid manifest over placeholder files (for code that reads only
    the manifest and the file list, never the weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    if with_onnx:
        (directory / "model.onnx").write_bytes(b"onnx")
    seal(directory, Manifest(family="bert", model_config={}, files={}, task="classification"))
    return directory


def bert_run(run_dir: Path, model: Any, tokenizer_dir: Path) -> Path:
    """A run directory whose final/ holds ``model`` (a gated tiny BERT classifier)."""
    info = {
        "base_model": "tiny-bert",
        "family": "bert",
        "task": "classification",
        "problem_type": "single_label_classification",
        "labels": ["negative", "neutral", "positive"],
        "gated_modules": list(gated_modules(model)),
        "gate_config": {"seed": 0},
        "head_modules": ["bert.pooler", "classifier"],
        "metrics": {"accuracy": 0.5},
    }
    rd = RunDir(run_dir)
    rd.prepare()
    rd.write_final(model, build_bert_tokenizer(tokenizer_dir), info)
    return run_dir
