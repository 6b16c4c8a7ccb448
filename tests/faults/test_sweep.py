"""The queue sweep: nothing queued waits for a worker restart (issue 13, part 1)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from api import jobstate
from api.db import session_scope
from api.db.models import Job, JobEvent, utcnow
from tests.support.worker import Recorder, job_row, make_job


def _age(sessions, job_id: str, created_s: float, published_s: float | None = None) -> None:
    now = utcnow()
    values = {"created_at": now - timedelta(seconds=created_s)}
    if published_s is not None:
        values["published_at"] = now - timedelta(seconds=published_s)
    with session_scope(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


class Failing(Recorder):
    """A publisher whose broker is down for the listed job ids (records every try)."""

    def __init__(self, down: set[str] | None = None) -> None:
        super().__init__()
        self.down = down

    def __call__(self, job_id: str, queue: str | None = None) -> None:
        super().__call__(job_id, queue)
        if self.down is None or job_id in self.down:
            raise ConnectionError("redis down")


def test_sweep_republishes_a_job_without_a_live_message_once_per_bound(sessions, settings):
    from worker.reaper import sweep_queued

    fresh = make_job(sessions, settings)
    stranded = make_job(sessions, settings, queue="gpu")
    _age(sessions, stranded, created_s=600)
    make_job(sessions, settings, status="running")
    rec = Recorder()
    out = sweep_queued(settings, sessions, ["cpu", "gpu"], rec, after_s=120)
    assert out.republished == [stranded] and rec.calls == [(stranded, "gpu")]
    assert job_row(sessions, stranded).published_at is not None
    # published just now: not again until the bound has passed
    assert sweep_queued(settings, sessions, ["cpu", "gpu"], rec, after_s=120).republished == []
    assert rec.calls == [(stranded, "gpu")] and fresh not in [c[0] for c in rec.calls]


def test_a_long_wait_backs_the_duplicates_off(sessions, settings):
    """Waiting 1000 s behind a long queue: a message 400 s old is presumed live (< half the
    wait), one 600 s old is not."""
    from worker.reaper import sweep_queued

    live = make_job(sessions, settings)
    _age(sessions, live, created_s=1000, published_s=400)
    gone = make_job(sessions, settings)
    _age(sessions, gone, created_s=1000, published_s=600)
    rec = Recorder()
    assert sweep_queued(settings, sessions, ["cpu"], rec, after_s=120).republished == [gone]


def test_only_the_served_queues_are_swept(sessions, settings):
    from worker.reaper import sweep_queued

    gpu = make_job(sessions, settings, queue="gpu")
    _age(sessions, gpu, created_s=600)
    rec = Recorder()
    assert sweep_queued(settings, sessions, ["cpu"], rec, after_s=1).republished == []
    assert rec.calls == []


def test_two_sweepers_racing_publish_a_job_once(sessions, settings):
    job_id = make_job(sessions, settings)
    _age(sessions, job_id, created_s=600)
    with session_scope(sessions) as s:
        due_a = jobstate.due_for_publish(s, ["cpu"], 120)
    with session_scope(sessions) as s:
        due_b = jobstate.due_for_publish(s, ["cpu"], 120)
    assert [d.job_id for d in due_a] == [d.job_id for d in due_b] == [job_id]
    with session_scope(sessions) as s:
        assert jobstate.take_publish(s, due_a[0]) is True
    with session_scope(sessions) as s:
        assert jobstate.take_publish(s, due_b[0]) is False


def test_a_failing_publish_is_retried_every_pass_then_fails_the_job(sessions, settings):
    from worker.reaper import sweep_queued

    down = make_job(sessions, settings)
    up = make_job(sessions, settings)
    for j in (down, up):
        _age(sessions, j, created_s=600)
    pub = Failing({down})
    out = sweep_queued(settings, sessions, ["cpu"], pub, after_s=120)
    # the failure did not stop the pass: the next job was still published
    assert out.failed_publish == [down] and out.republished == [up]
    row = job_row(sessions, down)
    assert row.status == "queued" and row.publish_failed_since is not None
    # due again at once (not after the bound)
    out = sweep_queued(settings, sessions, ["cpu"], pub, after_s=120)
    assert out.failed_publish == [down] and out.republished == []
    # failing for longer than queue_give_up_s: failed with a clear error
    with session_scope(sessions) as s:
        s.execute(
            update(Job)
            .where(Job.id == down)
            .values(publish_failed_since=utcnow() - timedelta(seconds=7200))
        )
        s.commit()
    out = sweep_queued(settings, sessions, ["cpu"], pub, after_s=120)
    assert out.gave_up == [down]
    row = job_row(sessions, down)
    assert row.status == "failed" and row.error_code == "queue_unavailable"
    assert "could not be handed to the job queue for 60 minute(s)" in row.error_message
    assert "broker unreachable: ConnectionError" in row.error_message


def test_a_recovered_publish_clears_the_failure(sessions, settings):
    from worker.reaper import sweep_queued

    job_id = make_job(sessions, settings)
    _age(sessions, job_id, created_s=600)
    sweep_queued(settings, sessions, ["cpu"], Failing(), after_s=120)
    assert job_row(sessions, job_id).publish_failed_since is not None
    rec = Recorder()
    assert sweep_queued(settings, sessions, ["cpu"], rec, after_s=120).republished == [job_id]
    assert job_row(sessions, job_id).publish_failed_since is None


def test_reaper_carries_on_past_a_failed_re_enqueue(sessions, settings):
    from worker.reaper import reap_once

    a = make_job(sessions, settings)
    b = make_job(sessions, settings)
    with session_scope(sessions) as s:
        for j in (a, b):
            jobstate.claim(s, j, "dead")
        s.execute(
            update(Job).where(Job.id.in_([a, b])).values(heartbeat_at=utcnow() - timedelta(days=1))
        )
        s.commit()
    pub = Failing({a})
    reaped = reap_once(settings, sessions, pub)
    assert sorted(r.job_id for r in reaped) == sorted([a, b])
    assert sorted(c[0] for c in pub.calls) == sorted([a, b])  # b published despite a
    assert job_row(sessions, a).publish_failed_since is not None
    # the sweep picks the unpublished one up on its next pass
    from worker.reaper import sweep_queued

    rec = Recorder()
    assert sweep_queued(settings, sessions, ["cpu"], rec, after_s=120).republished == [a]


def test_a_job_delivered_twice_runs_once(sessions, settings, tiny_bert_dir):
    from core.catalog import register_model
    from worker.tasks import execute_job

    register_model("tiny-unit", tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model="tiny-unit", hp={"max_steps": 4, "batch_size": 4})
    rec = Recorder()
    first = execute_job(
        job_id, settings=settings, session_factory=sessions, worker_id="a", enqueue=rec
    )
    second = execute_job(
        job_id, settings=settings, session_factory=sessions, worker_id="b", enqueue=rec
    )
    assert (first.status, second.status) == ("succeeded", "skipped")
    row = job_row(sessions, job_id)
    assert row.attempts == 1
    with session_scope(sessions) as s:
        started = (
            s.query(JobEvent).filter(JobEvent.job_id == job_id, JobEvent.message == "Job started")
        ).count()
    assert started == 1
