"""Review fixes in the worker: a lost job writes nothing, the checkpoint row is guarded,
cancel wins over a requeue, the time limit counts from the first start, a pruning failure
has its own code, and a tenant's model id never names a server folder."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from api import jobstate
from api.db import session_scope
from api.db.models import Checkpoint, Job, JobEvent, utcnow
from core.callbacks import CheckpointRecord
from tests.support.worker import job_row, make_job, step

TINY = "tiny-review"


def _n_events(sessions: Any, job_id: str) -> int:
    with session_scope(sessions) as s:
        return s.execute(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)
        ).scalar_one()


def _steal(sessions: Any, job_id: str, new_owner: str = "other-worker") -> None:
    """What the reaper + another worker's claim do to the row, in one write."""
    with session_scope(sessions) as s:
        s.execute(Job.__table__.update().where(Job.id == job_id).values(worker_id=new_owner))
        s.commit()


def test_callback_raises_job_lost_and_records_no_checkpoint(sessions, settings) -> None:
    from worker.callback import JobCallback, JobLost

    job_id = make_job(sessions, settings)
    with session_scope(sessions) as s:
        assert jobstate.claim(s, job_id, "w1")
    cb = JobCallback(sessions, job_id, "w1", flush_interval_s=0.0)
    assert cb.on_step(step(1)) is None
    _steal(sessions, job_id)
    with pytest.raises(JobLost):
        cb.on_step(step(2))
    assert cb.stop_reason == "lost"
    with pytest.raises(JobLost):
        cb.on_checkpoint(CheckpointRecord(step=2, path="/runs/x/checkpoints/step-2"))
    with session_scope(sessions) as s:
        assert s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).first() is None


def test_add_checkpoint_only_for_the_owning_worker(sessions, settings) -> None:
    job_id = make_job(sessions, settings)
    with session_scope(sessions) as s:
        assert jobstate.claim(s, job_id, "w1")
        assert jobstate.add_checkpoint(s, job_id, 3, "/x/step-3", worker_id="w2") is None
        assert jobstate.add_checkpoint(s, job_id, 4, "/x/step-4", worker_id="w1")
        steps = s.execute(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).scalars()
        assert list(steps) == [4]


def test_lost_job_stops_without_a_stop_checkpoint_or_any_write(
    sessions,
    settings,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stolen at step 2; the worker learns it at the step-4 evaluation. Before the fix it
    then saved a "stop" checkpoint into the run directory the new owner uses."""
    from core.catalog import register_model
    from worker.callback import JobCallback
    from worker.tasks import execute_job

    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(
        sessions,
        settings,
        model=TINY,
        hp={"max_steps": 40, "batch_size": 4, "eval_interval": 4, "checkpoint_interval": 40},
    )
    seen: dict[str, int] = {}
    real_on_step = JobCallback.on_step

    def on_step(self: JobCallback, record: Any) -> Any:
        out = real_on_step(self, record)
        if record.step == 2:
            _steal(sessions, job_id)
            seen["events"] = _n_events(sessions, job_id)
        return out

    monkeypatch.setattr(JobCallback, "on_step", on_step)
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "lost", out
    row = job_row(sessions, job_id)
    assert (row.status, row.worker_id) == ("running", "other-worker")  # untouched
    assert _n_events(sessions, job_id) == seen["events"]  # no event written after the loss
    ckpts = sorted(p.name for p in (Path(row.run_dir) / "checkpoints").glob("step-*"))
    assert ckpts == [], ckpts
    assert not (settings.data_path / "artifacts" / job_id).exists()


def test_time_limit_counts_from_the_first_start(sessions, settings, tiny_bert_dir) -> None:
    """A requeued job that started two hours ago has no time left under a one-hour limit."""
    from core.catalog import register_model
    from worker.tasks import execute_job

    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model=TINY, hp={"max_steps": 8, "batch_size": 4})
    with session_scope(sessions) as s:
        s.execute(
            Job.__table__.update()
            .where(Job.id == job_id)
            .values(started_at=utcnow() - timedelta(hours=2), attempts=1)
        )
        s.commit()
    limited = settings.model_copy(update={"max_job_seconds": 3600})
    out = execute_job(job_id, settings=limited, session_factory=sessions, worker_id="w")
    assert (out.status, out.detail) == ("failed", "job_timeout")
    assert job_row(sessions, job_id).error_code == "job_timeout"


def test_pruning_failure_has_its_own_code_and_keeps_the_run(
    sessions,
    settings,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import core.package
    from core.catalog import register_model
    from worker.tasks import execute_job

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("plan does not fit")

    monkeypatch.setattr(core.package, "prune_run", broken)
    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model=TINY, hp={"max_steps": 4, "batch_size": 4})
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert (out.status, out.detail) == ("failed", "pruning_failed")
    row = job_row(sessions, job_id)
    assert row.error_code == "pruning_failed" and "plan does not fit" in row.error_message
    assert (Path(row.run_dir) / "final" / "gated_model.json").is_file()  # kept for a retry
    assert not (settings.data_path / "artifacts" / job_id).exists()  # no fake artifact


def _events(sessions: Any, job_id: str) -> list[tuple[str, str]]:
    with session_scope(sessions) as s:
        rows = s.execute(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.pk)
        ).scalars()
        return [(e.level, e.message) for e in rows]


def test_packaging_records_one_event_per_phase_and_publishes_a_fully_hashed_artifact(
    sessions, settings, tiny_bert_dir: Path
) -> None:
    from core.artifacts import load_artifact, sha256_file
    from core.catalog import register_model
    from worker.tasks import execute_job

    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model=TINY, hp={"max_steps": 4, "batch_size": 4})
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "succeeded", out
    msgs = [m for _, m in _events(sessions, job_id)]
    phases = [
        "Pruned the gated model into a smaller dense model",
        "Exported the pruned model to ONNX",
        "Wrote the compression report (parameters, sizes, latency dense vs pruned)",
    ]
    assert [m for m in msgs if m in phases] == phases
    art = settings.data_path / "artifacts" / job_id
    on_disk = {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()}
    manifest = load_artifact(art).manifest
    assert on_disk - set(manifest.files) == {"manifest.json"}
    assert {"model.onnx", "report.json"} <= set(manifest.files)
    assert all(sha256_file(art / n) == e["sha256"] for n, e in manifest.files.items())
    summary = out.data["summary"]
    assert summary["formats"] == ["tar", "safetensors", "onnx", "onnx-int8"]
    assert summary["pruned"] is True
    assert summary["artifact_bytes"] == sum((art / n).stat().st_size for n in on_disk)
    # no staging folder left; checkpoints other than the final state have their own
    names = sorted(p.name for p in art.parent.iterdir())
    assert names[0] == job_id
    assert all(re.fullmatch(rf"{job_id}\.ckpt-step-\d+", n) for n in names[1:]), names


def test_a_failed_optional_phase_is_a_warning_and_the_job_succeeds(
    sessions, settings, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.package
    from core.artifacts import read_manifest
    from core.catalog import register_model
    from worker.tasks import execute_job

    def no_onnx(*a: Any, **k: Any) -> None:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(core.package, "export_onnx", no_onnx)
    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model=TINY, hp={"max_steps": 4, "batch_size": 4})
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "succeeded", out
    assert ("warning", "ONNX export skipped: RuntimeError: exporter unavailable") in _events(
        sessions, job_id
    )
    assert out.data["summary"]["formats"] == ["tar", "safetensors"]
    art = settings.data_path / "artifacts" / job_id
    files = read_manifest(art).files
    assert "model.onnx" not in files and not (art / "model.onnx").exists()
    assert "report.json" in files  # measured on torch alone


def test_a_tenant_model_id_is_never_a_server_path(sessions, settings, tiny_bert_dir) -> None:
    from worker.tasks import execute_job

    job_id = make_job(sessions, settings, model=str(tiny_bert_dir))
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "failed"
    row = job_row(sessions, job_id)
    assert row.error_code == "model_not_found" and row.step == 0  # failed before a step


def test_shutdown_of_a_cancel_requested_job_cancels_instead_of_requeueing(
    sessions,
    settings,
) -> None:
    from worker.callback import JobCallback
    from worker.tasks import _stopped

    job_id = make_job(sessions, settings)
    with session_scope(sessions) as s:
        assert jobstate.claim(s, job_id, "w")
        assert jobstate.request_cancel(s, job_id) == "running"
    cb = JobCallback(sessions, job_id, "w")
    cb.stop_reason = "shutdown"  # the shutdown won the race against the cancel flag
    calls: list[str] = []
    out = _stopped(job_id, cb, sessions, "w", lambda j, queue=None: calls.append(j), settings)
    assert out.status == "cancelled" and calls == []
    assert job_row(sessions, job_id).status == "cancelled"
