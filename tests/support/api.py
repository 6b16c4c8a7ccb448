"""Data and request helpers shared by the API tests (`tests.support.api`)."""

from __future__ import annotations

from typing import Any

# --- data helpers ---------------------------------------------------------------------

CLS_LINES = [
    '{"text": "a wonderful, moving film", "label": "pos"}',
    '{"text": "dull and far too long", "label": "neg"}',
    '{"text": "the cast is superb", "label": "pos"}',
    '{"text": "I want my evening back", "label": "neg"}',
    '{"text": "sharp writing and real warmth", "label": "pos"}',
    '{"text": "lifeless and predictable", "label": "neg"}',
]


def cls_bytes(n: int = 6) -> bytes:
    lines = [CLS_LINES[i % len(CLS_LINES)] for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def upload(client: Any, headers: dict[str, str], content: bytes, name: str = "train.jsonl"):
    return client.post(
        "/v1/files",
        headers=headers,
        files={"file": (name, content, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )


def job_body(file_id: str, **hp: Any) -> dict[str, Any]:
    return {
        "model": "minilm-l6",
        "training_file": file_id,
        "method": {"type": "finegates", "finegates": {"hyperparameters": hp}},
    }


def fake_artifact(root: Any, with_onnx: bool = False) -> dict[str, bytes]:
    """Write an artifact-shaped folder (no model needed: routes only move bytes)."""
    import json
    from pathlib import Path

    root = Path(root)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    files = {
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 5,
        "manifest.json": json.dumps({"format": "finegates-artifact", "version": 1}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "report.json": json.dumps({"params": {"dense": 100, "pruned": 60}}).encode(),
    }
    if with_onnx:
        files["model.onnx"] = b"onnx-bytes"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def succeed_job(sessions: Any, job_id: str, model_id: str, artifact_dir: str) -> None:
    from api import jobstate

    with sessions() as s:
        assert jobstate.claim(s, job_id, "w-test")
        assert jobstate.finish_succeeded(
            s,
            job_id,
            "w-test",
            fine_tuned_model=model_id,
            artifact_dir=artifact_dir,
            trained_tokens=1234,
            measured_sparsity=0.41,
            compression={"params_before": 100, "params_after": 60},
        )
