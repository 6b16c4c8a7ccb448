"""Helpers for the worker tests: job rows in a given state, step records, a fake clock."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from api.auth import get_or_create_tenant
from api.db import session_scope
from api.db.models import File, Job, new_id
from api.settings import Settings
from core.callbacks import StepRecord

CLS = [
    {"text": "a wonderful, moving film", "label": "pos"},
    {"text": "dull and far too long", "label": "neg"},
    {"text": "the cast is superb", "label": "pos"},
    {"text": "I want my evening back", "label": "neg"},
]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, job_id: str, queue: str | None = None) -> None:
        self.calls.append((job_id, queue))


def make_job(
    sessions: Any,
    settings: Settings,
    *,
    status: str = "queued",
    model: str = "tiny",
    hp: dict | None = None,
    rows: int = 16,
    queue: str = "cpu",
) -> str:
    """A tenant, an uploaded training file in storage and a job row in ``status``."""
    from api.storage import LocalStorage

    storage = LocalStorage(settings.storage_dir)
    key = f"files/t/{new_id('file-')}.jsonl"
    data = "\n".join(json.dumps(CLS[i % len(CLS)]) for i in range(rows)) + "\n"
    storage.put_stream(key, [data.encode()], None)
    with session_scope(sessions) as s:
        tenant = get_or_create_tenant(s, "t")
        f = File(
            id=new_id("file-"),
            tenant_id=tenant.id,
            filename="train.jsonl",
            purpose="fine-tune",
            bytes=len(data),
            sha256="0" * 64,
            status="processed",
            format="jsonl",
            task="classification",
            n_rows=rows,
            storage_key=key,
        )
        job = Job(
            id=new_id("ftjob-"),
            tenant_id=tenant.id,
            status=status,
            model=model,
            task="classification",
            training_file=f.id,
            hyperparameters=hp or {},
            seed=1,
            queue=queue,
        )
        s.add_all([f, job])
        s.commit()
        return job.id


def job_row(sessions: Any, job_id: str) -> Job:
    with session_scope(sessions) as s:
        row = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        s.expunge(row)
        return row


def step(n: int, total: int = 100, **kw: Any) -> StepRecord:
    return StepRecord(
        step=n,
        total_steps=total,
        epoch=0.0,
        loss=1.0 / n,
        task_loss=0.5,
        sparsity_loss=0.1,
        lr=0.01,
        examples_per_second=10.0,
        eta_seconds=float(total - n),
        tokens=100 * n,
        **kw,
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
