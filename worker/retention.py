"""Retention: run directories of ended jobs and artifacts of cancelled ones are deleted
after FINEGATES_RUN_RETENTION_HOURS (0 keeps everything).

Why: a run directory holds checkpoints (trainable state, optimizer moments) that only a
running or resumable job needs; without a policy they fill the disk. A succeeded job's
artifact is the model and stays until its model is deleted. Only folders inside the data
directory are ever removed. ``sweep`` is the plain function (tests, ``finegates
cleanup``); the worker runs it hourly from its webhook dispatcher thread.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.models import Job, utcnow
from api.db.session import session_scope

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)
ENDED = (jobstate.SUCCEEDED, jobstate.FAILED, jobstate.CANCELLED)


def _inside(path: Path, root: Path) -> bool:
    try:
        return root.resolve() in path.resolve().parents
    except OSError:
        return False


def sweep(settings: Settings, factory: sessionmaker[Session]) -> list[str]:
    """Delete what the policy allows; returns the removed folders (relative names)."""
    hours = float(settings.run_retention_hours)
    if hours <= 0:
        return []
    cutoff = utcnow() - timedelta(hours=hours)
    data = settings.data_path
    removed: list[str] = []
    with session_scope(factory) as s:
        rows = s.execute(
            select(Job.id, Job.status, Job.run_dir).where(
                Job.status.in_(ENDED), Job.finished_at.is_not(None), Job.finished_at < cutoff
            )
        ).all()
        for job_id, status, run_dir in rows:
            targets = []
            if run_dir:
                targets.append(Path(run_dir))
            if status == jobstate.CANCELLED:
                targets.append(data / "artifacts" / job_id)
            for path in targets:
                if path.is_dir() and _inside(path, data):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path.relative_to(data)))
            if run_dir:
                s.execute(update(Job).where(Job.id == job_id).values(run_dir=None))
        s.commit()
    if removed:
        log.info("retention: removed %d folders older than %g h", len(removed), hours)
    return removed
