"""Data and request helpers shared by the API tests (import as `api_helpers`)."""

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
