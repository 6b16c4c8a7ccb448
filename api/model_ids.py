"""Public model ids: ``ft:<base>:<suffix>:<short job id>`` and its checkpoints'
``<model id>:ckpt-step-<N>`` (OpenAI's forms). The API lists checkpoint ids while a job
runs and the worker registers them when it finishes, so both build them here."""

from __future__ import annotations

import os
import re
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
CHECKPOINT_MARK = ":ckpt-step-"


def fine_tuned_model_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI-style ``ft:<base>:<suffix>:<short id>`` (``ft:<base>:<short id>`` without a
    suffix). A base given as a folder path contributes only its last part; characters
    that would break a URL path segment become ``-``."""
    base_part = Path(base).name if ("/" in base or os.sep in base) and Path(base).name else base
    base_part = _SAFE.sub("-", base_part).strip("-") or "model"
    # the job id's whole random part (24 characters, case kept): models.id is unique
    # across tenants, so 8 characters could collide, and only once training had finished
    short = job_id.split("-", 1)[-1]
    parts = ["ft", base_part]
    if suffix:
        s = _SAFE.sub("-", suffix).strip("-")
        if s:
            parts.append(s)
    parts.append(short)
    return ":".join(parts)


def checkpoint_model_id(base: str, suffix: str | None, job_id: str, step: int) -> str:
    return f"{fine_tuned_model_id(base, suffix, job_id)}{CHECKPOINT_MARK}{int(step)}"


def is_checkpoint_id(model_id: str) -> bool:
    return CHECKPOINT_MARK in model_id
