"""The job state machine (api/jobstate.py), transition by transition, on SQLite and
PostgreSQL: each guarded change happens only from its expected state (and, for a worker,
only by the job's own worker), the loser of a race learns it from the return value and
changes nothing, and terminal states are final."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.auth import get_or_create_tenant
from api.db import make_sessionmaker
from api.db.models import Checkpoint, FineTunedModel, Job, JobEvent, JobMetric, new_id, utcnow
from tests.support.db import wipe


@pytest.fixture
def db(migrated_engine: Engine) -> Iterator[sessionmaker[Session]]:
    yield make_sessionmaker(migrated_engine)
    wipe(migrated_engine)


@pytest.fixture
def s(db: sessionmaker[Session]) -> Iterator[Session]:
    with db() as session:
        yield session


def _job(s: Session, status: str = jobstate.QUEUED, **columns: Any) -> str:
    tenant = get_or_create_tenant(s, "state-machine")
    job = Job(
        id=new_id("ftjob-"),
        tenant_id=tenant.id,
        status=status,
        model="minilm-l6",
        task="classification",
        training_file="file-x",
        hyperparameters={},
        seed=0,
        **columns,
    )
    s.add(job)
    s.commit()
    return job.id


def _row(s: Session, job_id: str) -> Job:
    s.expire_all()
    return s.execute(select(Job).where(Job.id == job_id)).scalar_one()


def _events(s: Session, job_id: str) -> list[str]:
    rows = s.execute(
        select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.pk)
    )
    return list(rows.scalars())


def _stale(s: Session, job_id: str) -> None:
    s.execute(
        update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=600))
    )
    s.commit()


# --- API side: validating -> queued, cancel --------------------------------------------


def test_mark_queued_only_from_validating(s: Session) -> None:
    jid = _job(s, jobstate.VALIDATING)
    assert jobstate.mark_queued(s, jid) is True
    assert _row(s, jid).status == "queued"
    assert jobstate.mark_queued(s, jid) is False  # already queued: nothing changes
    assert _events(s, jid) == ["Files validated; job queued"]


@pytest.mark.parametrize("status", ["validating_files", "queued"])
def test_cancel_before_it_runs_is_immediate(s: Session, status: str) -> None:
    jid = _job(s, status)
    assert jobstate.request_cancel(s, jid) == "cancelled"
    row = _row(s, jid)
    assert (row.status, row.cancel_requested) == ("cancelled", True)
    assert row.finished_at is not None
    assert _events(s, jid) == ["Job cancelled before it started"]


def test_cancel_of_a_running_job_raises_the_flag_only(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    assert jobstate.request_cancel(s, jid) == "running"
    row = _row(s, jid)
    assert (row.status, row.cancel_requested, row.worker_id) == ("running", True, "w1")
    assert row.finished_at is None
    # the worker learns it from its next progress write, then stops and finishes
    assert jobstate.record_progress(s, jid, "w1", step=3).cancel_requested is True
    assert jobstate.finish_cancelled(s, jid, "w1", "Job cancelled at step 3") is True
    row = _row(s, jid)
    assert (row.status, row.step) == ("cancelled", 3)
    assert row.finished_at is not None
    assert _events(s, jid)[-2:] == [
        "Cancellation requested; the worker stops at the next step",
        "Job cancelled at step 3",
    ]


def test_cancel_of_an_unknown_job_is_a_lookup_error(s: Session) -> None:
    with pytest.raises(LookupError):
        jobstate.request_cancel(s, "ftjob-none")


# --- worker side: claim ----------------------------------------------------------------


def test_claim_takes_a_queued_job_once(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1", run_dir="/runs/a") is True
    row = _row(s, jid)
    assert (row.status, row.worker_id, row.attempts, row.run_dir) == ("running", "w1", 1, "/runs/a")
    assert row.started_at is not None and row.heartbeat_at is not None
    # a second claim (a duplicate message, another worker) loses and changes nothing
    assert jobstate.claim(s, jid, "w2") is False
    after = _row(s, jid)
    assert (after.status, after.worker_id, after.attempts) == ("running", "w1", 1)
    assert _events(s, jid) == ["Job started"]


@pytest.mark.parametrize("status", ["validating_files", "running", "succeeded", "failed"])
def test_claim_only_from_queued(s: Session, status: str) -> None:
    jid = _job(s, status, worker_id="owner" if status == "running" else None)
    assert jobstate.claim(s, jid, "w1") is False
    row = _row(s, jid)
    assert (row.status, row.attempts) == (status, 0)
    assert row.worker_id == ("owner" if status == "running" else None)


def test_claim_of_a_cancel_flagged_queued_job_cancels_it(s: Session) -> None:
    jid = _job(s, cancel_requested=True)
    assert jobstate.claim(s, jid, "w1") is False
    row = _row(s, jid)
    assert (row.status, row.worker_id, row.attempts) == ("cancelled", None, 0)
    assert row.finished_at is not None
    assert _events(s, jid) == ["Job cancelled before it resumed"]


# --- progress and checkpoints ----------------------------------------------------------


def test_progress_is_written_only_by_the_owner(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    ack = jobstate.record_progress(
        s,
        jid,
        "w1",
        step=4,
        total_steps=10,
        trained_tokens=400,
        measured_sparsity=0.2,
        events=[{"message": "step 4", "type": "metrics", "data": {"loss": 0.5}}],
        metrics=[{"step": 4, "loss": 0.5}, {"step": 4, "kind": "eval", "metrics": {"f1": 0.7}}],
    )
    assert (ack.owned, ack.cancel_requested) == (True, False)
    row = _row(s, jid)
    assert (row.step, row.total_steps, row.trained_tokens) == (4, 10, 400)
    assert row.measured_sparsity == pytest.approx(0.2)
    points = s.execute(
        select(JobMetric.kind, JobMetric.step, JobMetric.loss, JobMetric.metrics)
        .where(JobMetric.job_id == jid)
        .order_by(JobMetric.pk)
    ).all()
    assert [tuple(p) for p in points] == [("train", 4, 0.5, None), ("eval", 4, None, {"f1": 0.7})]

    ack = jobstate.record_progress(s, jid, "intruder", step=9, events=[{"message": "x"}])
    assert (ack.owned, ack.cancel_requested) == (False, False)
    assert _row(s, jid).step == 4
    assert "x" not in _events(s, jid)


def test_add_checkpoint_is_idempotent_per_step_and_guarded(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    first = jobstate.add_checkpoint(s, jid, 5, "/runs/a/step-5", {"loss": 1.0}, worker_id="w1")
    again = jobstate.add_checkpoint(s, jid, 5, "/runs/b/step-5", {"loss": 0.9}, worker_id="w1")
    assert first is not None and again == first  # a resumed run saving the same step again
    assert jobstate.add_checkpoint(s, jid, 6, "/x", worker_id="w2") is None  # not the owner
    rows = s.execute(
        select(Checkpoint.step, Checkpoint.path, Checkpoint.metrics).where(Checkpoint.job_id == jid)
    ).all()
    assert [tuple(r) for r in rows] == [(5, "/runs/b/step-5", {"loss": 0.9})]
    assert _events(s, jid).count("Checkpoint saved at step 5") == 1


# --- finishing -------------------------------------------------------------------------


def test_finish_succeeded_only_by_the_owner_and_with_its_model(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    jobstate.record_progress(s, jid, "w1", step=7, total_steps=10)
    kwargs: dict[str, Any] = {"fine_tuned_model": "ft:m:1", "artifact_dir": "artifacts/a"}
    assert jobstate.finish_succeeded(s, jid, "w2", **kwargs) is False
    assert _row(s, jid).status == "running"
    assert s.execute(select(func.count()).select_from(FineTunedModel)).scalar_one() == 0

    assert jobstate.finish_succeeded(
        s, jid, "w1", measured_sparsity=0.4, compression={"params_after": 6}, **kwargs
    )
    row = _row(s, jid)
    assert (row.status, row.fine_tuned_model, row.step) == ("succeeded", "ft:m:1", 7)
    assert row.measured_sparsity == pytest.approx(0.4)
    assert row.compression == {"params_after": 6} and row.finished_at is not None
    model = s.execute(select(FineTunedModel)).scalar_one()
    assert (model.id, model.tenant_id, model.job_id, model.artifact_dir) == (
        "ft:m:1",
        row.tenant_id,
        jid,
        "artifacts/a",
    )
    assert model.summary == {"params_after": 6}
    assert jobstate.finish_succeeded(s, jid, "w1", **kwargs) is False  # only once


def test_finish_failed_by_the_worker_or_from_any_active_state(s: Session) -> None:
    running = _job(s)
    assert jobstate.claim(s, running, "w1")
    assert jobstate.finish_failed(s, running, "bad_data", "line 3", "file", worker_id="w2") is False
    assert jobstate.finish_failed(s, running, "bad_data", "line 3", "file", worker_id="w1")
    row = _row(s, running)
    assert (row.status, row.error_code, row.error_message, row.error_param) == (
        "failed",
        "bad_data",
        "line 3",
        "file",
    )
    queued = _job(s)  # no worker: the service fails a job that never ran
    assert jobstate.finish_failed(s, queued, "model_not_found", "no such model") is True
    assert _row(s, queued).status == "failed"
    assert _events(s, queued) == ["Job failed: no such model"]


def test_finish_cancelled_only_by_the_owner(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    assert jobstate.finish_cancelled(s, jid, "w2") is False
    assert _row(s, jid).status == "running"
    assert jobstate.finish_cancelled(s, jid, "w1") is True
    assert _row(s, jid).status == "cancelled"


# --- release (warm shutdown) and requeue (reaper) --------------------------------------


def test_release_hands_the_job_back_and_gives_the_attempt_back(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    assert jobstate.release(s, jid, "w2") is False  # not the owner
    assert _row(s, jid).worker_id == "w1"
    assert jobstate.release(s, jid, "w1", "shutting down") is True
    row = _row(s, jid)
    assert (row.status, row.worker_id, row.heartbeat_at, row.attempts) == (
        "queued",
        None,
        None,
        0,
    )
    assert jobstate.claim(s, jid, "w3")  # the next worker starts it as attempt 1 again
    assert _row(s, jid).attempts == 1
    assert _events(s, jid) == ["Job started", "shutting down", "Job started"]


def test_release_of_a_cancel_flagged_job_cancels_it(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    assert jobstate.request_cancel(s, jid) == "running"
    assert jobstate.release(s, jid, "w1") is False
    row = _row(s, jid)
    assert row.status == "cancelled" and row.finished_at is not None


def test_requeue_stale_resumes_until_the_retry_limit_then_fails(s: Session) -> None:
    jid = _job(s, queue="gpu")
    assert jobstate.claim(s, jid, "w1")
    first_start = _row(s, jid).started_at
    assert jobstate.requeue_stale(s, 300, max_attempts=2) == []  # fresh heartbeat
    jobstate.add_checkpoint(s, jid, 10, "/runs/a/step-10")
    _stale(s, jid)
    reaped = jobstate.requeue_stale(s, 300, max_attempts=2)
    assert [(r.job_id, r.status, r.queue) for r in reaped] == [(jid, "queued", "gpu")]
    row = _row(s, jid)
    assert (row.status, row.worker_id, row.heartbeat_at, row.attempts) == (
        "queued",
        None,
        None,
        1,
    )
    assert jobstate.record_progress(s, jid, "w1", step=11).owned is False  # the dead worker

    assert jobstate.claim(s, jid, "w2")
    row = _row(s, jid)
    assert row.attempts == 2 and row.started_at == first_start  # the first start counts
    assert _events(s, jid)[-1] == "Job resumed (attempt 2)"
    _stale(s, jid)
    reaped = jobstate.requeue_stale(s, 300, max_attempts=2)
    assert [(r.job_id, r.status) for r in reaped] == [(jid, "failed")]
    row = _row(s, jid)
    assert (row.status, row.error_code, row.worker_id) == ("failed", "worker_lost", None)
    assert "limit 2" in row.error_message and "step 10" in row.error_message


def test_requeue_stale_cancels_a_cancel_flagged_job(s: Session) -> None:
    jid = _job(s)
    assert jobstate.claim(s, jid, "w1")
    assert jobstate.request_cancel(s, jid) == "running"
    _stale(s, jid)
    reaped = jobstate.requeue_stale(s, 300, max_attempts=3)
    assert [(r.job_id, r.status) for r in reaped] == [(jid, "cancelled")]
    assert _row(s, jid).status == "cancelled"


# --- terminal states are final ---------------------------------------------------------


@pytest.mark.parametrize("status", sorted(jobstate.TERMINAL))
def test_terminal_states_are_final(s: Session, status: str) -> None:
    jid = _job(s, status, worker_id="w1", heartbeat_at=utcnow() - timedelta(days=1))
    before = _events(s, jid)
    assert jobstate.mark_queued(s, jid) is False
    assert jobstate.claim(s, jid, "w1") is False
    assert jobstate.request_cancel(s, jid) == status
    assert jobstate.record_progress(s, jid, "w1", step=1).owned is False
    assert jobstate.add_checkpoint(s, jid, 1, "/x", worker_id="w1") is None
    assert jobstate.release(s, jid, "w1") is False
    assert jobstate.finish_cancelled(s, jid, "w1") is False
    assert jobstate.finish_cancelled(s, jid) is False
    assert jobstate.finish_failed(s, jid, "x", "y") is False
    assert jobstate.finish_succeeded(s, jid, "w1", fine_tuned_model="m", artifact_dir="a") is False
    assert jobstate.requeue_stale(s, 1, max_attempts=5) == []
    row = _row(s, jid)
    assert (row.status, row.step, row.error_code) == (status, 0, None)
    assert _events(s, jid) == before


# --- queue position --------------------------------------------------------------------


def test_queue_position_counts_queued_jobs_ahead_in_the_same_queue(s: Session) -> None:
    a, b, other, c = _job(s), _job(s), _job(s, queue="gpu"), _job(s)
    assert [jobstate.queue_position(s, _row(s, j)) for j in (a, b, other, c)] == [0, 1, 0, 2]
    assert jobstate.claim(s, a, "w1")
    assert [jobstate.queue_position(s, _row(s, j)) for j in (a, b, c)] == [None, 0, 1]


def test_the_public_schema_names_every_state_level_and_event_type() -> None:
    """api/schemas.py spells these out as Literals for the OpenAPI document."""
    from typing import get_args

    from api.schemas import JobEventObject, JobStatus

    assert get_args(JobStatus) == jobstate.STATUSES
    fields = JobEventObject.model_fields
    assert get_args(fields["level"].annotation) == jobstate.LEVELS
    assert get_args(fields["type"].annotation) == jobstate.EVENT_TYPES
