"""Worker pieces in-process, on a migrated SQLite database: Celery settings, the batching
callback, the reaper, and the task's state handling and error mapping.

The real worker PROCESS is exercised in tests/e2e; these tests pin the behaviour that is
hard to provoke there (batch boundaries, retry limit, error codes, a shutdown mid-job).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from api import jobstate
from api.db import session_scope
from api.db.models import Checkpoint, Job, JobEvent, JobMetric, utcnow
from api.settings import Settings
from core.callbacks import CheckpointRecord, EvalRecord
from tests.support.worker import Clock, Recorder, job_row, make_job, step

# --- Celery app ---------------------------------------------------------------------------


def test_celery_config_embedded_and_redis(tmp_path: Path) -> None:
    from api.queue import broker_url_for
    from worker.celery_app import make_celery

    s = Settings(data_dir=tmp_path / "d", max_job_seconds=7200)
    url = broker_url_for(s)
    assert url == f"sqla+sqlite:///{s.data_path / 'broker.sqlite'}"
    app = make_celery(s)
    c = app.conf
    assert c.task_acks_late is True and c.task_reject_on_worker_lost is True
    assert c.worker_prefetch_multiplier == 1
    assert c.accept_content == ["json"] and c.task_serializer == "json"
    assert c.result_accept_content == ["json"]
    assert c.result_backend is None and c.task_ignore_result is True
    assert [q.name for q in c.task_queues] == ["gpu", "cpu"]
    assert c.worker_enable_remote_control is False  # virtual transport: no fanout
    assert c.broker_transport_options == {}  # the SQL transport hands options to create_engine
    # ...so its poll interval (kombu's default: 1 s of queue wait) is set on the class
    from worker.celery_app import EMBEDDED_POLL_INTERVAL_S

    with app.connection_for_read() as conn:
        assert conn.transport.polling_interval == EMBEDDED_POLL_INTERVAL_S < 1.0

    r = make_celery(Settings(data_dir=tmp_path / "d", broker_url="redis://h:6379/0"))
    # one hour past the longest job (24 h by default): never redelivered while it runs
    assert r.conf.broker_transport_options == {"visibility_timeout": 24 * 3600 + 3600}
    assert r.conf.worker_enable_remote_control is True


def test_the_worker_consumes_what_the_api_publishes(tmp_path: Path) -> None:
    """api.queue.publish and the worker's app agree on the task, queue and serializer."""
    from api.queue import celery_options, publish
    from worker.celery_app import make_celery

    s = Settings(data_dir=tmp_path / "d")
    publish("ftjob-abc", "gpu", settings=s)
    app = make_celery(s)
    shared = celery_options(s)
    assert {k: app.conf[k] for k in shared} == shared  # the consumer keeps every shared option
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue("gpu")
        try:
            msg = q.get(timeout=10)
            assert msg.content_type == "application/json"
            assert msg.headers["task"] == "finegates.run_job"
            assert msg.payload[0] == ["ftjob-abc"]  # only the id travels
            msg.ack()
        finally:
            q.close()
    with pytest.raises(ValueError, match="unknown queue 'tpu'"):
        publish("ftjob-abc", "tpu", settings=s)


def test_fine_tuned_model_id() -> None:
    from worker.tasks import fine_tuned_model_id

    assert fine_tuned_model_id("minilm-l6", "news", "ftjob-AbCdEfGh12345678") == (
        "ft:minilm-l6:news:AbCdEfGh12345678"
    )
    assert fine_tuned_model_id("smollm2-135m", None, "ftjob-xyzXYZ00") == "ft:smollm2-135m:xyzXYZ00"
    # a folder path or a hub id never puts '/' into the id (it is a URL path segment)
    got = fine_tuned_model_id("/models/my bert", "a/b", "ftjob-0000000000000001")
    assert got == "ft:my-bert:a-b:0000000000000001" and "/" not in got
    # two tenants' jobs whose ids end alike (or differ only in case) get different models
    a = fine_tuned_model_id("minilm-l6", None, "ftjob-aaaaaaaaaaaaaaaa12345678")
    b = fine_tuned_model_id("minilm-l6", None, "ftjob-bbbbbbbbbbbbbbbb12345678")
    c = fine_tuned_model_id("minilm-l6", None, "ftjob-AAAAAAAAAAAAAAAA12345678")
    assert len({a, b, c}) == 3


# --- callback -----------------------------------------------------------------------------


def test_callback_batches_and_flushes_on_eval_and_checkpoint(sessions, settings, tmp_path) -> None:
    from worker.callback import JobCallback

    job_id = make_job(sessions, settings)
    with session_scope(sessions) as s:
        assert jobstate.claim(s, job_id, "w1")
    clock = Clock()
    cb = JobCallback(
        sessions, job_id, "w1", flush_interval_s=2.0, flush_max_records=50, clock=clock
    )

    def n_metrics() -> int:
        with session_scope(sessions) as s:
            return len(s.execute(select(JobMetric).where(JobMetric.job_id == job_id)).all())

    assert cb.on_step(step(1)) is None
    assert n_metrics() == 1 and cb.flushes == 1  # the first step is written at once
    assert job_row(sessions, job_id).step == 1
    for i in range(2, 11):
        assert cb.on_step(step(i)) is None
    assert n_metrics() == 1 and cb.flushes == 1  # then buffered: nothing written per step

    clock.t += 2.5
    cb.on_step(step(11, measured_sparsity=0.25))
    assert cb.flushes == 2 and n_metrics() == 11
    row = job_row(sessions, job_id)
    assert (row.step, row.total_steps, row.trained_tokens) == (11, 100, 1100)
    assert row.measured_sparsity == pytest.approx(0.25)
    assert row.estimated_finish is not None and row.heartbeat_at is not None

    cb.on_eval(
        EvalRecord(step=11, total_steps=100, metrics={"accuracy": 0.75}, measured_sparsity=0.3)
    )
    assert cb.flushes == 3 and n_metrics() == 12  # evaluations flush at once
    ck_dir = tmp_path / "checkpoints" / "step-11"
    ck_dir.mkdir(parents=True)
    cb.on_checkpoint(CheckpointRecord(step=11, path=str(ck_dir), measured_sparsity=0.3))
    with session_scope(sessions) as s:
        ck = s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).scalar_one()
        assert ck.step == 11
        # this step's own losses and evaluation, in OpenAI's names
        assert ck.metrics == {
            "step": 11.0, "train_loss": step(11).task_loss, "accuracy": 0.75,
            "measured_sparsity": 0.3,
        }  # fmt: skip
        evals = s.execute(
            select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.kind == "eval")
        ).scalar_one()
        assert evals.metrics == {"accuracy": 0.75} and evals.measured_sparsity == 0.3
        msgs = [e.message for e in s.execute(select(JobEvent)).scalars()]
    assert any("eval accuracy=0.7500" in m for m in msgs), msgs

    # 50 records flush even inside the time window
    for i in range(12, 62):
        cb.on_step(step(i))
    assert n_metrics() == 62


def test_callback_stops_on_cancel_loss_and_shutdown(sessions, settings) -> None:
    from worker.callback import JobCallback, JobLost

    job_id = make_job(sessions, settings)
    with session_scope(sessions) as s:
        jobstate.claim(s, job_id, "w1")
    cb = JobCallback(sessions, job_id, "w1", flush_interval_s=0.0)
    assert cb.on_step(step(1)) is None
    with session_scope(sessions) as s:
        assert jobstate.request_cancel(s, job_id) == "running"
    assert cb.on_step(step(2)) is False and cb.stop_reason == "cancelled"

    other = make_job(sessions, settings)
    with session_scope(sessions) as s:
        jobstate.claim(s, other, "w2")
    lost = JobCallback(sessions, other, "not-the-owner", flush_interval_s=0.0)
    with pytest.raises(JobLost):  # no clean stop: its "stop" checkpoint is not its to write
        lost.on_step(step(1))
    assert lost.stop_reason == "lost"

    third = make_job(sessions, settings)
    with session_scope(sessions) as s:
        jobstate.claim(s, third, "w3")
    ev = threading.Event()
    down = JobCallback(sessions, third, "w3", flush_interval_s=60.0, shutdown=ev)
    assert down.on_step(step(1)) is None
    ev.set()
    assert down.on_step(step(2)) is False and down.stop_reason == "shutdown"


# --- reaper -------------------------------------------------------------------------------


def _stale(sessions: Any, job_id: str, seconds: float = 120.0) -> None:
    with session_scope(sessions) as s:
        s.execute(
            Job.__table__.update()
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        s.commit()


def test_reaper_requeues_then_fails_after_the_retry_limit(sessions, settings) -> None:
    from worker.reaper import reap_once, republish_queued

    job_id = make_job(sessions, settings, queue="gpu")
    rec = Recorder()
    with session_scope(sessions) as s:
        jobstate.claim(s, job_id, "dead-worker")
    assert reap_once(settings, sessions, rec) == []  # fresh heartbeat: left alone
    _stale(sessions, job_id)
    reaped = reap_once(settings, sessions, rec)
    assert [(r.job_id, r.status) for r in reaped] == [(job_id, "queued")]
    assert rec.calls == [(job_id, "gpu")]  # re-published on the job's own queue
    assert job_row(sessions, job_id).status == "queued"

    # second crash: attempts (2) reach job_max_attempts (2) -> failed, not re-published
    with session_scope(sessions) as s:
        jobstate.claim(s, job_id, "dead-again")
    _stale(sessions, job_id)
    reaped = reap_once(settings, sessions, rec)
    assert [r.status for r in reaped] == ["failed"] and len(rec.calls) == 1
    row = job_row(sessions, job_id)
    assert row.status == "failed" and row.error_code == "worker_lost"
    assert "stopped responding" in (row.error_message or "")

    queued = make_job(sessions, settings)
    make_job(sessions, settings, status="succeeded")
    rec2 = Recorder()
    assert republish_queued(settings, sessions, ["cpu", "gpu"], rec2) == [queued]
    assert rec2.calls == [(queued, "cpu")]


# --- task ---------------------------------------------------------------------------------


def test_execute_job_skips_what_it_must_not_run(sessions, settings) -> None:
    from worker.tasks import execute_job

    assert execute_job("ftjob-missing", settings=settings, session_factory=sessions).status == (
        "missing"
    )
    done = make_job(sessions, settings, status="cancelled")
    out = execute_job(done, settings=settings, session_factory=sessions, worker_id="w")
    assert (out.status, out.detail) == ("skipped", "cancelled")
    running = make_job(sessions, settings)
    with session_scope(sessions) as s:
        jobstate.claim(s, running, "someone-else")
    out = execute_job(running, settings=settings, session_factory=sessions, worker_id="w")
    assert (out.status, out.detail) == ("skipped", "running")
    assert job_row(sessions, running).worker_id == "someone-else"  # untouched


def test_user_error_fails_the_job_with_code_and_message(sessions, settings) -> None:
    from worker.tasks import execute_job

    job_id = make_job(sessions, settings, model="no-such-model")
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "failed"
    row = job_row(sessions, job_id)
    assert row.status == "failed" and row.error_code == "model_not_found"
    assert "no-such-model" in row.error_message and row.finished_at is not None


def test_internal_error_keeps_the_traceback_in_the_log_only(
    sessions, settings, monkeypatch, caplog
) -> None:
    import core.train
    from worker.tasks import execute_job

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(core.train, "train", boom)
    job_id = make_job(sessions, settings)
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "failed"
    row = job_row(sessions, job_id)
    assert row.error_code == "internal_error"
    # the tenant sees a message written for them with a reference, not the exception
    assert "disk on fire" not in row.error_message and "RuntimeError" not in row.error_message
    ref = out.data["reference"]
    assert ref.startswith("err_") and ref in row.error_message
    with session_scope(sessions) as s:
        ev = list(s.execute(select(JobEvent).where(JobEvent.job_id == job_id)).scalars())
    for e in ev:
        text = e.message + repr(e.data)
        assert "Traceback" not in text and "disk on fire" not in text, text
        assert "traceback" not in (e.data or {})
        assert "worker_id" not in (e.data or {})  # host:pid stays on the server
    # ... and the server log has the traceback under the same reference
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def test_shutdown_mid_job_checkpoints_and_requeues_without_using_an_attempt(
    sessions, settings, tiny_bert_dir
) -> None:
    """A warm shutdown stops training at the next step; the job goes back to the queue
    with its attempt given back, and its checkpoint is on disk for the next worker."""
    from core.catalog import register_model
    from worker.tasks import execute_job

    register_model("tiny-unit", tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model="tiny-unit", hp={"max_steps": 50, "batch_size": 4})
    ev = threading.Event()
    ev.set()
    rec = Recorder()
    out = execute_job(
        job_id,
        settings=settings,
        session_factory=sessions,
        worker_id="w",
        shutdown=ev,
        enqueue=rec,
    )
    assert out.status == "requeued", out
    row = job_row(sessions, job_id)
    assert row.status == "queued" and row.attempts == 0 and row.worker_id is None
    assert 1 <= row.step < 50
    assert rec.calls == [(job_id, "cpu")]
    ckpts = list((Path(row.run_dir) / "checkpoints").glob("step-*"))
    assert ckpts, f"no checkpoint under {row.run_dir}"
