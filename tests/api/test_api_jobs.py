"""Jobs: create (validated, idempotent, enqueued after commit), list, get, cancel, events,
checkpoints, metrics; plus the state machine functions the worker calls."""

from __future__ import annotations

from datetime import timedelta

from api import jobstate
from api.db.models import Job, utcnow
from tests.support.api import cls_bytes, job_body, upload


def _file(client, h):
    r = upload(client, h, cls_bytes(6))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_create_job_shape_and_enqueue(client, make_headers, enqueued):
    h = make_headers("jobs-a")
    fid = _file(client, h)
    body = job_body(fid, target_sparsity=0.3, max_steps=20)
    body.update(suffix="demo", seed=7, metadata={"team": "nlp"})
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["id"].startswith("ftjob-")
    assert j["object"] == "fine_tuning.job"
    assert j["status"] == "queued"
    assert j["model"] == "minilm-l6"
    assert j["training_file"] == fid
    assert j["task"] == "classification"  # detected from the file
    assert j["seed"] == 7 and j["hyperparameters"]["seed"] == 7
    assert j["hyperparameters"]["target_sparsity"] == 0.3
    assert j["hyperparameters"]["sparsity_weight"] == 50.0  # default filled in
    assert j["metadata"] == {"team": "nlp"}
    assert j["suffix"] == "demo"
    assert j["sparsity"] == {"target": 0.3, "measured": None}
    assert j["progress"] == {
        "step": 0, "total_steps": None, "percent": None, "eta_seconds": None, "phase": None,
    }  # fmt: skip
    assert (j["target_reached"], j["eval_metrics"], j["warnings"]) == (None, None, [])
    assert j["method"]["type"] == "finegates"
    assert j["queue_position"] == 0
    assert j["error"] is None and j["fine_tuned_model"] is None
    assert enqueued.calls == [(j["id"], "cpu")]

    ev = client.get(f"/v1/fine_tuning/jobs/{j['id']}/events", headers=h).json()
    assert [e["message"] for e in ev["data"]] == [  # newest first
        "Files validated; job queued",
        f"Created fine-tuning job {j['id']} (classification on minilm-l6)",
    ]


def test_invalid_hyperparameters_name_the_param(client, make_headers, enqueued):
    h = make_headers("jobs-hp")
    fid = _file(client, h)
    for hp, param in [
        ({"target_sparsity": 1.5}, "target_sparsity"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"trainable": "everything"}, "trainable"),
        ({"no_such_knob": 1}, "no_such_knob"),
    ]:
        r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid, **hp))
        assert r.status_code == 400, (hp, r.text)
        err = r.json()["error"]
        assert err["param"] == param
        assert param in err["message"]
        assert err["code"] == "invalid_hyperparameter"
    assert enqueued.calls == []
    assert client.get("/v1/fine_tuning/jobs", headers=h).json()["data"] == []


def test_bad_requests(client, make_headers):
    h = make_headers("jobs-bad")
    fid = _file(client, h)
    r = client.post("/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "model": "gpt-9"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "minilm-l6" in r.json()["error"]["message"]  # lists the choices
    body = job_body(fid)
    body["method"]["finegates"]["task"] = "causal_lm"
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # encoder can't LM
    body = job_body(fid)
    body["method"]["type"] = "supervised"
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.type"
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body("file-nope"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    r = client.post("/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "suffix": "a b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = client.post(
        "/v1/fine_tuning/jobs", headers={**h, "Content-Type": "application/json"}, content=b"{"
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_models_that_cannot_prune_are_refused_at_creation(client, make_headers, settings, tmp_path):
    """A type/task pair that could train but not prune never becomes a job."""
    import json

    h = make_headers("jobs-types")
    fid = _file(client, h)  # a classification file
    r = client.post(
        "/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "model": "smollm2-135m"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_task_mismatch"
    assert "decoder" in err["message"] and "classification" in err["message"]
    # a registry entry written before the family table (registration now refuses it)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    settings.data_path.mkdir(parents=True, exist_ok=True)
    (settings.data_path / "models.json").write_text(json.dumps({"old-gpt2": str(folder)}))
    r = client.post("/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "model": "old-gpt2"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_supported" and "distilbert" in err["message"]


def test_idempotency_key(client, make_headers, enqueued):
    h = make_headers("jobs-idem")
    fid = _file(client, h)
    hk = {**h, "Idempotency-Key": "abc-123"}
    r1 = client.post("/v1/fine_tuning/jobs", headers=hk, json=job_body(fid, max_steps=5))
    r2 = client.post("/v1/fine_tuning/jobs", headers=hk, json=job_body(fid, max_steps=5))
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["id"] == r2.json()["id"]
    assert r2.headers.get("Idempotent-Replayed") == "true"
    assert len(enqueued.calls) == 1
    r3 = client.post("/v1/fine_tuning/jobs", headers=hk, json=job_body(fid, max_steps=6))
    assert r3.status_code == 409
    assert r3.json()["error"]["code"] == "idempotency_key_reused"
    # the same key from another tenant is independent
    h2 = make_headers("jobs-idem-2")
    fid2 = _file(client, h2)
    r4 = client.post(
        "/v1/fine_tuning/jobs", headers={**h2, "Idempotency-Key": "abc-123"}, json=job_body(fid2)
    )
    assert r4.status_code == 200 and r4.json()["id"] != r1.json()["id"]


def test_list_pagination_and_queue_position(client, make_headers):
    h = make_headers("jobs-list")
    fid = _file(client, h)
    ids = [
        client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
        for _ in range(3)
    ]
    p1 = client.get("/v1/fine_tuning/jobs?limit=2", headers=h).json()
    assert [j["id"] for j in p1["data"]] == [ids[2], ids[1]] and p1["has_more"] is True
    assert p1["count"] == 3
    p2 = client.get(f"/v1/fine_tuning/jobs?limit=2&after={ids[1]}", headers=h).json()
    assert [j["id"] for j in p2["data"]] == [ids[0]] and p2["has_more"] is False
    positions = {j["id"]: j["queue_position"] for j in p1["data"] + p2["data"]}
    assert positions == {ids[0]: 0, ids[1]: 1, ids[2]: 2}


def test_cancel_queued_job(client, make_headers):
    h = make_headers("jobs-cancel")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_worker_lifecycle_through_jobstate(client, make_headers, sessions, settings):
    """The functions C2's worker calls, observed through the API."""
    h = make_headers("jobs-life")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1", run_dir="/tmp/run") is True
        assert jobstate.claim(s, jid, "w2") is False  # only one claim wins
        ack = jobstate.record_progress(
            s,
            jid,
            "w1",
            step=5,
            total_steps=20,
            trained_tokens=640,
            estimated_finish=utcnow() + timedelta(seconds=60),
            measured_sparsity=0.12,
            events=[{"message": "step 5: loss 0.9", "type": "metrics", "data": {"loss": 0.9}}],
            metrics=[
                {"step": 5, "loss": 0.9, "lr": 1e-3, "measured_sparsity": 0.12},
                {"step": 5, "kind": "eval", "metrics": {"accuracy": 0.75}},
            ],
        )
        assert ack.owned and not ack.cancel_requested
        assert jobstate.record_progress(s, jid, "intruder", step=6).owned is False
        jobstate.add_checkpoint(s, jid, 5, "/tmp/run/checkpoints/step-5", {"train_loss": 0.9})

    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "running"
    assert j["progress"]["step"] == 5 and j["progress"]["total_steps"] == 20
    assert j["progress"]["percent"] == 25.0
    assert 0 < j["progress"]["eta_seconds"] <= 60
    assert j["sparsity"]["measured"] == 0.12
    assert j["trained_tokens"] == 640
    assert j["queue_position"] is None

    m = client.get(f"/v1/fine_tuning/jobs/{jid}/metrics", headers=h).json()
    assert [(p["kind"], p["step"]) for p in m["data"]] == [("train", 5), ("eval", 5)]
    assert m["data"][1]["metrics"] == {"accuracy": 0.75}
    ev = client.get(f"/v1/fine_tuning/jobs/{jid}/events?limit=100", headers=h).json()
    assert any(e["type"] == "metrics" for e in ev["data"])
    ck = client.get(f"/v1/fine_tuning/jobs/{jid}/checkpoints", headers=h).json()
    assert ck["data"][0]["step_number"] == 5
    assert ck["data"][0]["metrics"]["train_loss"] == 0.9

    # cancel while running raises the flag; the worker sees it on its next write
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h).json()
    assert r["status"] == "running" and r["cancel_requested"] is True
    with sessions() as s:
        assert jobstate.record_progress(s, jid, "w1", step=6).cancel_requested is True
        assert jobstate.finish_cancelled(s, jid, "w1") is True
        assert jobstate.finish_failed(s, jid, "x", "late", worker_id="w1") is False
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "cancelled" and j["finished_at"] is not None


def test_failed_job_carries_error(client, make_headers, sessions):
    h = make_headers("jobs-fail")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1")
        assert jobstate.finish_failed(
            s, jid, "invalid_training_file", "train.jsonl, line 3: bad", "training_file",
            worker_id="w1",
        )  # fmt: skip
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "failed"
    assert j["error"] == {
        "code": "invalid_training_file",
        "message": "train.jsonl, line 3: bad",
        "param": "training_file",
    }
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h)
    assert r.status_code == 409


def test_reaper_requeues_then_fails(client, make_headers, sessions):
    h = make_headers("jobs-reap")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    later = utcnow() + timedelta(seconds=1000)
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1")
        jobstate.add_checkpoint(s, jid, 10, "/tmp/ckpt")
        assert jobstate.requeue_stale(s, 60, max_attempts=2) == []  # fresh heartbeat
        reaped = jobstate.requeue_stale(s, 60, max_attempts=2, now=later)
        assert [(r.job_id, r.status) for r in reaped] == [(jid, "queued")]
        # the dead worker can no longer write
        assert jobstate.record_progress(s, jid, "w1", step=11).owned is False
        assert jobstate.claim(s, jid, "w2")
        reaped = jobstate.requeue_stale(s, 60, max_attempts=2, now=later)
        assert [(r.job_id, r.status) for r in reaped] == [(jid, "failed")]
        job = s.get(Job, s.query(Job.pk).filter(Job.id == jid).scalar())
        assert job.attempts == 2
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "failed"
    assert j["error"]["code"] == "worker_lost"
    assert "step 10" in j["error"]["message"] and "limit 2" in j["error"]["message"]
    msgs = [e["message"] for e in client.get(
        f"/v1/fine_tuning/jobs/{jid}/events?limit=100", headers=h).json()["data"]]  # fmt: skip
    assert any("resume from step 10" in m for m in msgs)


def test_enqueue_failure_keeps_job_queued(client, make_headers, enqueued):
    h = make_headers("jobs-q")
    fid = _file(client, h)
    enqueued.fail = ConnectionError("broker down")
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid))
    assert r.status_code == 200
    assert r.json()["status"] == "queued"
    ev = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/events", headers=h).json()["data"]
    assert ev[0]["level"] == "warning" and "queue could not be reached" in ev[0]["message"]


def test_release_gives_the_attempt_back(client, make_headers, sessions):
    h = make_headers("jobs-rel")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1")
        assert jobstate.release(s, jid, "w2") is False  # not the owner
        assert jobstate.release(s, jid, "w1", "shutting down") is True
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "queued" and j["attempts"] == 0 and j["queue_position"] == 0


def test_events_pagination(client, make_headers, sessions):
    h = make_headers("jobs-ev")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        for i in range(5):
            jobstate.add_event(s, jid, f"note {i}")
    p1 = client.get(f"/v1/fine_tuning/jobs/{jid}/events?limit=3", headers=h).json()
    assert [e["message"] for e in p1["data"]] == ["note 4", "note 3", "note 2"]
    assert p1["has_more"] is True
    last = p1["data"][-1]["id"]
    assert (p1["first_id"], p1["last_id"]) == (p1["data"][0]["id"], last)
    p2 = client.get(f"/v1/fine_tuning/jobs/{jid}/events?limit=3&after={last}", headers=h).json()
    assert [e["message"] for e in p2["data"]] == ["note 1", "note 0", "Files validated; job queued"]
    assert p2["has_more"] is True
    p3 = client.get(
        f"/v1/fine_tuning/jobs/{jid}/events?limit=3&after={p2['last_id']}", headers=h
    ).json()
    assert [e["message"] for e in p3["data"]] == [
        f"Created fine-tuning job {jid} (classification on minilm-l6)"
    ]
    assert p3["has_more"] is False
    bad = client.get(f"/v1/fine_tuning/jobs/{jid}/events?after=nope", headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


def test_concurrent_claims_exactly_one_wins(client, make_headers, sessions):
    from concurrent.futures import ThreadPoolExecutor

    h = make_headers("jobs-race")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]

    def _claim(i: int) -> bool:
        with sessions() as s:
            return jobstate.claim(s, jid, f"w{i}")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(_claim, range(6)))
    assert sum(results) == 1
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "running" and j["attempts"] == 1


def test_hub_ids_are_owner_name_only_never_paths(tmp_path):
    """With allow_hub, "~/x" or "models/internal" used to pass as hub ids (and the
    worker then tried them as local folders first)."""
    import pytest

    from api.errors import APIError
    from api.routes.jobs import _check_model
    from api.settings import Settings

    s = Settings(data_dir=tmp_path / "data", allow_hub=True)
    _check_model("HuggingFaceTB/SmolLM2-135M", "classification", s)  # accepted
    for bad in ("~/x", "~root/.ssh", "a/../b", "a/b/c", "/etc/x", "./models/x", "x"):
        with pytest.raises(APIError) as ei:
            _check_model(bad, "classification", s)
        assert ei.value.code == "model_not_found", bad


def test_release_of_a_cancel_requested_job_cancels_it(client, make_headers, sessions):
    h = make_headers("jobs-rel-cancel")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1")
        assert jobstate.request_cancel(s, jid) == "running"
        assert jobstate.release(s, jid, "w1", "shutting down") is False  # not requeued
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "cancelled" and j["finished_at"] is not None


def test_claim_of_a_cancel_requested_queued_job_cancels_it(client, make_headers, sessions):
    h = make_headers("jobs-claim-cancel")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:  # e.g. handed back by an older worker with the flag already up
        s.execute(Job.__table__.update().where(Job.id == jid).values(cancel_requested=True))
        s.commit()
        assert jobstate.claim(s, jid, "w1") is False
    j = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert j["status"] == "cancelled"


def test_list_jobs_filters_and_counts_by_status(client, make_headers):
    h = make_headers("jobs-status")
    fid = _file(client, h)
    ids = [
        client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
        for _ in range(3)
    ]
    assert client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=h).status_code == 200
    cancelled = client.get("/v1/fine_tuning/jobs?status=cancelled", headers=h).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    assert cancelled["count"] == 1  # the filter applies to the count too
    queued = client.get("/v1/fine_tuning/jobs?status=queued&limit=1", headers=h).json()
    assert [j["id"] for j in queued["data"]] == [ids[2]]
    assert (queued["count"], queued["has_more"]) == (2, True)
    assert client.get("/v1/fine_tuning/jobs", headers=h).json()["count"] == 3
    r = client.get("/v1/fine_tuning/jobs?status=paused", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"


def test_checkpoints_and_metrics_pagination(client, make_headers, sessions):
    h = make_headers("jobs-pages")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "w1")
        for step in (10, 20, 30):
            jobstate.add_checkpoint(s, jid, step, f"/runs/x/step-{step}", worker_id="w1")
        jobstate.record_progress(
            s, jid, "w1", metrics=[{"step": n, "loss": 1 / n} for n in (1, 2, 3)]
        )
    url = f"/v1/fine_tuning/jobs/{jid}"
    p1 = client.get(f"{url}/checkpoints?limit=2", headers=h).json()
    assert [c["step_number"] for c in p1["data"]] == [30, 20] and p1["has_more"] is True
    assert (p1["first_id"], p1["last_id"]) == (p1["data"][0]["id"], p1["data"][1]["id"])
    p2 = client.get(f"{url}/checkpoints?limit=2&after={p1['last_id']}", headers=h).json()
    assert [c["step_number"] for c in p2["data"]] == [10] and p2["has_more"] is False
    r = client.get(f"{url}/checkpoints?after=ftckpt-unknown", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"

    m1 = client.get(f"{url}/metrics?limit=2", headers=h).json()
    assert [m["step"] for m in m1["data"]] == [1, 2] and m1["has_more"] is True  # oldest first
    m2 = client.get(f"{url}/metrics?limit=2&after={m1['last_id']}", headers=h).json()
    assert [m["step"] for m in m2["data"]] == [3] and m2["has_more"] is False
    r = client.get(f"{url}/metrics?after=ftevent-1", headers=h)
    assert r.status_code == 400 and "ftmetric-123" in r.json()["error"]["message"]
