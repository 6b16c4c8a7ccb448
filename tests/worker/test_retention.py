"""Retention (issue 12): run directories of jobs that ended long enough ago are deleted,
and so are artifacts of cancelled jobs; nothing outside the data directory, nothing young."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from api.db.models import Job, utcnow
from api.db.session import session_scope
from tests.support.worker import job_row, make_job


def _ended(sessions, settings, status: str, hours_ago: float, run_dir: Path) -> str:
    jid = make_job(sessions, settings, status=status)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.safetensors").write_bytes(b"x" * 100)
    with session_scope(sessions) as s:
        s.execute(
            update(Job)
            .where(Job.id == jid)
            .values(finished_at=utcnow() - timedelta(hours=hours_ago), run_dir=str(run_dir))
        )
        s.commit()
    return jid


def test_sweep_removes_old_run_dirs_and_cancelled_artifacts(sessions, settings, tmp_path):
    from worker.retention import sweep

    runs = settings.runs_dir
    old = _ended(sessions, settings, "succeeded", 100, runs / "old")
    young = _ended(sessions, settings, "failed", 1, runs / "young")
    cancelled = _ended(sessions, settings, "cancelled", 100, runs / "cancelled")
    art = settings.data_path / "artifacts" / cancelled
    art.mkdir(parents=True)
    kept_art = settings.data_path / "artifacts" / old
    kept_art.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    stranger = _ended(sessions, settings, "failed", 100, outside)
    running = make_job(sessions, settings, status="running")

    removed = sweep(settings, sessions)
    assert sorted(removed) == sorted(["runs/old", "runs/cancelled", f"artifacts/{cancelled}"])
    assert not (runs / "old").exists() and not art.exists()
    assert (runs / "young").is_dir() and kept_art.is_dir()  # a succeeded job's model stays
    assert outside.is_dir()  # never outside the data directory
    assert job_row(sessions, old).run_dir is None and job_row(sessions, young).run_dir
    assert job_row(sessions, running).status == "running" and job_row(sessions, stranger)
    assert sweep(settings, sessions) == []  # idempotent


def test_zero_keeps_everything(sessions, settings):
    from worker.retention import sweep

    _ended(sessions, settings, "succeeded", 10_000, settings.runs_dir / "r")
    settings.run_retention_hours = 0
    assert sweep(settings, sessions) == [] and (settings.runs_dir / "r").is_dir()
