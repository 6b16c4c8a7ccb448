"""Liveness that cannot lie, and a lost job writes nothing (issue 13, parts 2 and 3).

The watchdog and the fence are driven here with a controlled clock; the real hung
worker process is in test_inject_services.py."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from api import jobstate
from api.db import session_scope
from api.db.models import JobEvent
from tests.support.worker import Recorder, job_row, make_job


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _claimed(sessions, settings, worker="w", **kw):
    job_id = make_job(sessions, settings, **kw)
    with session_scope(sessions) as s:
        assert jobstate.claim(s, job_id, worker)
    return job_id


def _watchdog(sessions, job_id, clock, **kw):
    from worker.callback import JobCallback, Watchdog

    cb = JobCallback(sessions, job_id, "w", clock=clock, deadline=kw.pop("deadline", None))
    hung, pub = Recorder(), Recorder()
    wd = Watchdog(
        cb,
        1.0,
        progress_timeout_s=kw.pop("progress_timeout_s", 60),
        stop_grace_s=kw.pop("stop_grace_s", 30),
        max_attempts=kw.pop("max_attempts", 2),
        on_hung=lambda reason: hung(reason),
        republish=lambda jid: pub(jid),
    )
    return cb, wd, hung, pub


def _messages(sessions, job_id):
    with session_scope(sessions) as s:
        return list(s.execute(select(JobEvent.message).where(JobEvent.job_id == job_id)).scalars())


def test_progressing_job_beats_and_a_stalled_one_is_requeued(sessions, settings):
    job_id = _claimed(sessions, settings)
    clock = Clock()
    cb, wd, hung, pub = _watchdog(sessions, job_id, clock)
    before = job_row(sessions, job_id).heartbeat_at
    time.sleep(0.01)
    clock.t += 30
    cb.alive()  # a step happened
    assert wd.check() is False and hung.calls == []
    assert job_row(sessions, job_id).heartbeat_at > before  # a fresh, progress-backed beat
    clock.t += 61  # no progress since
    assert wd.check() is True
    row = job_row(sessions, job_id)
    assert (row.status, row.worker_id) == ("queued", None)
    assert hung.calls == [("stalled", None)] and pub.calls == [(job_id, None)]
    assert any("made no progress for 61s" in m for m in _messages(sessions, job_id))
    assert cb.stop_reason == "lost"  # whatever the thread does later, it writes nothing


def test_a_stalled_job_at_the_attempt_limit_fails(sessions, settings):
    job_id = _claimed(sessions, settings)
    clock = Clock()
    _cb, wd, hung, pub = _watchdog(sessions, job_id, clock, max_attempts=1)
    clock.t += 100
    assert wd.check() is True
    row = job_row(sessions, job_id)
    assert row.status == "failed" and row.error_code == "job_stalled"
    assert "made no progress" in row.error_message and pub.calls == []


def test_a_cancel_the_thread_ignores_is_enforced_after_the_grace(sessions, settings):
    job_id = _claimed(sessions, settings)
    clock = Clock()
    cb, wd, hung, _ = _watchdog(sessions, job_id, clock, stop_grace_s=30)
    with session_scope(sessions) as s:
        assert jobstate.request_cancel(s, job_id) == "running"
    clock.t += 5
    cb.alive()
    assert wd.check() is False  # the beat brings the flag back
    assert cb.stop_reason == "cancelled"
    clock.t += 10
    cb.alive()  # the thread is alive (say, tokenizing) but does not look at the flag
    assert wd.check() is False
    clock.t += 25
    cb.alive()
    assert wd.check() is True
    assert job_row(sessions, job_id).status == "cancelled"
    assert hung.calls == [("cancelled", None)]


def test_the_time_limit_is_enforced_from_outside_the_thread(sessions, settings):
    job_id = _claimed(sessions, settings)
    clock = Clock()
    cb, wd, hung, _ = _watchdog(sessions, job_id, clock, deadline=1010.0, stop_grace_s=30)
    clock.t += 20
    cb.alive()
    assert wd.check() is False and cb.stop_reason == "timeout"
    clock.t += 31
    cb.alive()
    assert wd.check() is True
    row = job_row(sessions, job_id)
    assert row.status == "failed" and row.error_code == "job_timeout"
    assert hung.calls == [("timeout", None)]


def test_before_write_refuses_a_job_that_is_not_ours(sessions, settings):
    from worker.callback import JobCallback, JobLost

    job_id = _claimed(sessions, settings, worker="other")
    cb = JobCallback(sessions, job_id, "me")
    with pytest.raises(JobLost):
        cb.before_write("checkpoint")
    assert cb.stop_reason == "lost"


def test_before_write_pauses_while_the_database_is_away_then_resumes(sessions, settings):
    from worker.callback import JobCallback

    job_id = _claimed(sessions, settings)
    fails = {"n": 3}

    def factory():
        if fails["n"] > 0:
            fails["n"] -= 1
            raise OperationalError("connect", {}, ConnectionRefusedError("db down"))
        return sessions()

    cb = JobCallback(factory, job_id, "w", lost_after_s=60)  # type: ignore[arg-type]
    t0 = time.monotonic()
    cb.before_write("checkpoint")  # waits out three failures, then confirms
    assert fails["n"] == 0 and time.monotonic() - t0 >= 0.2 and cb.stop_reason is None


def test_before_write_gives_up_when_ownership_cannot_be_confirmed(sessions, settings):
    from worker.callback import JobCallback, JobLost

    job_id = _claimed(sessions, settings)

    def factory():
        raise OperationalError("connect", {}, ConnectionRefusedError("db down"))

    clock = Clock()
    cb = JobCallback(factory, job_id, "w", lost_after_s=60, clock=clock)  # type: ignore[arg-type]
    clock.t += 61
    with pytest.raises(JobLost, match="ownership not confirmed"):
        cb.before_write("checkpoint")


def test_the_engine_asks_before_every_checkpoint_and_final_write(tmp_path, tiny_bert_dir):
    import json

    from core.config import JobConfig
    from core.train import train
    from tests.support.worker import CLS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(CLS[i % len(CLS)]) for i in range(16)) + "\n")
    order: list[str] = []

    class Spy:
        def on_step(self, r):
            return None

        def on_eval(self, r):
            return None

        def on_checkpoint(self, r):
            order.append(f"saved:{r.step}")

        def before_write(self, what):
            order.append(what)

    cfg = JobConfig(
        model=str(tiny_bert_dir),
        training_file=str(data),
        task="classification",
        hyperparameters={"max_steps": 4, "batch_size": 4, "checkpoint_interval": 2},  # type: ignore[arg-type]
        allow_paths=True,
    )
    train(cfg, tmp_path / "run", Spy())
    saves = [i for i, o in enumerate(order) if o.startswith("saved:")]
    assert saves, order
    for i in saves:
        assert order[i - 1] == "checkpoint", order
    assert order[-1] == "final"

    class Refuse(Spy):
        def before_write(self, what):
            raise RuntimeError("not yours")

    run2 = tmp_path / "run2"
    with pytest.raises(RuntimeError, match="not yours"):
        train(cfg, run2, Refuse())
    assert (
        not list((run2 / "checkpoints").glob("step-*")) if (run2 / "checkpoints").exists() else True
    )


def test_run_dir_lock_is_exclusive(tmp_path):
    from worker.tasks import RunDirLock

    a, b = RunDirLock(tmp_path / "run"), RunDirLock(tmp_path / "run")
    assert a.acquire(1)
    t0 = time.monotonic()
    assert b.acquire(0.5) is False and time.monotonic() - t0 >= 0.5
    a.release()
    assert b.acquire(0.5)
    b.release()


def test_two_workers_racing_for_one_job_only_the_owner_writes(
    sessions, settings, tiny_bert_dir, monkeypatch
):
    """Worker A stalls mid-job past the heartbeat timeout; the reaper requeues the job and
    worker B claims it. B waits for the run directory until A has noticed it lost the job;
    A writes no checkpoint after losing it; B finishes the job."""
    from core import checkpoint as ckpt
    from core.catalog import register_model
    from worker import callback as cbmod
    from worker.reaper import reap_once
    from worker.tasks import execute_job

    settings.heartbeat_timeout_s = 1.0
    settings.progress_timeout_s = 8.0  # A's watchdog gives the job up (or the reaper does)
    register_model("tiny-unit", tiny_bert_dir, settings.data_path)
    job_id = make_job(
        sessions, settings, model="tiny-unit",
        hp={"max_steps": 12, "batch_size": 4, "checkpoint_interval": 3},
    )  # fmt: skip
    paused, resume = threading.Event(), threading.Event()
    writes: list[tuple[str, int]] = []
    original_step, original_save = cbmod.JobCallback.on_step, ckpt.save_checkpoint

    def on_step(self, record):
        if self.worker_id == "A" and record.step == 3 and not resume.is_set():
            paused.set()
            resume.wait(60)  # A hangs here, heartbeat thread still running
        return original_step(self, record)

    def save(*a, **kw):
        writes.append((threading.current_thread().name, kw["step"]))
        return original_save(*a, **kw)

    monkeypatch.setattr(cbmod.JobCallback, "on_step", on_step)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    outcomes: dict[str, str] = {}

    def run(name):
        outcomes[name] = execute_job(
            job_id, settings=settings, session_factory=sessions, worker_id=name,
            enqueue=Recorder(),
        ).status  # fmt: skip

    ta = threading.Thread(target=run, args=("A",), name="A")
    ta.start()
    assert paused.wait(60)
    # A stops beating once it makes no progress: its watchdog or the reaper requeues it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reap_once(settings, sessions, Recorder())
        if job_row(sessions, job_id).status != "running":
            break
        time.sleep(0.2)
    assert job_row(sessions, job_id).status == "queued"
    tb = threading.Thread(target=run, args=("B",), name="B")
    tb.start()
    deadline = time.monotonic() + 30
    while job_row(sessions, job_id).worker_id != "B" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert [w for w in writes if w[0] == "B"] == []  # B waits for the run directory
    lost_at = len(writes)
    resume.set()
    ta.join(60)
    tb.join(120)
    assert outcomes == {"A": "lost", "B": "succeeded"}, outcomes
    assert [w for w in writes[lost_at:] if w[0] == "A"] == []
    assert job_row(sessions, job_id).status == "succeeded"
