"""What a user reads after a job: target reached or missed (said on the job, its events,
its model, the manifest and the report), the delivered model's evaluation, the loss
split into task loss and sparsity penalty, packaging phases, checkpoints that work as
models, and a default download without the ONNX copy.

Each job runs once (a tiny BERT, a few steps) through ``execute_job`` and is then read
through the HTTP API of an app on the same database."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from api.auth import create_api_key
from api.db import session_scope
from api.db.models import JobEvent
from tests.support.worker import make_job

TINY = "tiny-results"
MISS = {
    "max_steps": 6, "batch_size": 4, "eval_interval": 2, "n_checkpoints": 2,
    "target_sparsity": 0.9, "sparsity_tolerance": 0.01,
}  # fmt: skip
REACH = {"max_steps": 2, "batch_size": 4, "target_sparsity": 0.3, "sparsity_tolerance": 1.0}


@pytest.fixture
def api(settings, migrated_engine) -> Any:
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings, engine=migrated_engine, enqueue=lambda *a: None)
    app.state.owns_engine = False
    with TestClient(app) as c:
        yield c


def _run(sessions, settings, tiny_bert_dir: Path, hp: dict) -> tuple[str, dict[str, str]]:
    from core.catalog import register_model
    from worker.tasks import execute_job

    register_model(TINY, tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model=TINY, hp=hp, rows=24)
    out = execute_job(job_id, settings=settings, session_factory=sessions, worker_id="w")
    assert out.status == "succeeded", out
    with sessions() as s:
        key = create_api_key(s, "t")  # make_job's tenant
    return job_id, {"Authorization": f"Bearer {key}"}


def _events(sessions, job_id: str) -> list[JobEvent]:
    with session_scope(sessions) as s:
        rows = s.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.pk))
        out = list(rows.scalars())
        s.expunge_all()
        return out


def _tar_names(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def test_a_missed_target_is_said_everywhere_and_checkpoints_are_models(
    sessions, settings, tiny_bert_dir: Path, api, tmp_path: Path
) -> None:
    job_id, h = _run(sessions, settings, tiny_bert_dir, MISS)
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h).json()

    # --- the job says it, in fields and in words
    assert job["target_reached"] is False
    assert any(w.startswith("Target missed: asked for 90%") for w in job["warnings"])
    small = [w for w in job["warnings"] if w.startswith("The validation set is small")]
    assert small and "carved from the training file" in small[0]
    ev = job["eval_metrics"]
    assert ev["state"] == "last" and ev["best"] is None and ev["step"] == 6
    assert 0.0 <= ev["accuracy"] <= 1.0 and "eval_loss" in ev
    # 24 rows, 10% carved out: the validation set is stated, and called small
    assert ev["validation_rows"] == 2 and ev["validation_source"] == "carved from the training file"
    assert job["progress"]["phase"] is None  # not running any more
    events = _events(sessions, job_id)
    assert ("warning", job["warnings"][0]) in [(e.level, e.message) for e in events]
    last = events[-1].message
    assert last.startswith("Job succeeded; model ") and "of the gated weights" in last
    assert "Target sparsity NOT reached" in last

    # --- packaging phases were announced in order, the report's with an ETA
    phases = [e.data["phase"] for e in events if e.data and "phase" in e.data]
    assert phases == ["pruning", "exporting", "measuring"]

    # --- train_loss is the task loss; the sparsity penalty and the total are apart
    train = api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics?kind=train", headers=h).json()
    for p in train["data"]:
        m = p["metrics"]
        assert p["loss"] == m["train_loss"] == m["task_loss"]
        assert m["total_loss"] == pytest.approx(m["train_loss"] + m["sparsity_penalty"])
    assert max(p["metrics"]["sparsity_penalty"] for p in train["data"]) > 0

    # --- the model, the manifest and the report carry the same results
    model_id = job["fine_tuned_model"]
    model = api.get(f"/v1/models/{model_id}", headers=h).json()
    assert model["target_reached"] is False and model["eval_metrics"] == ev
    assert (
        model["summary"].startswith("Removed ")
        and " faster" in model["summary"]
        or (" slower" in model["summary"])
    )
    assert set(model["downloads"]) == {"tar", "safetensors", "onnx", "onnx-int8"}
    report = api.get(f"/v1/models/{model_id}/report", headers=h).json()
    assert report["summary"]["sentence"] == model["summary"]
    assert report["machine"]["logical_cpus"] >= 1 and report["machine"]["torch_threads"] >= 1
    assert all("dense_p90_ms" in r and "pruned_p10_ms" in r for r in report["latency"])

    # --- the default tar: weights, manifest, tokenizer, report; no ONNX; it loads
    from core.artifacts import load_artifact

    tar = api.get(f"/v1/models/{model_id}/artifact", headers=h)
    names = _tar_names(tar.content)
    assert "model.safetensors" in names and "report.json" in names
    assert "model.onnx" not in names and not any(n.startswith("hf/") for n in names)
    assert "model.int8.onnx" not in names
    assert int(tar.headers["content-length"]) == len(tar.content)
    out = tmp_path / "download"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as tf:
        tf.extractall(out, filter="data")
    loaded = load_artifact(out)  # the manifest sent lists what was sent
    assert loaded.manifest.results["target_reached"] is False
    assert loaded.manifest.metrics["step"] == 6 and "accuracy" in loaded.manifest.metrics
    assert "model.onnx" in json.loads(names["manifest.json"])["download_omitted"]
    full = _tar_names(api.get(f"/v1/models/{model_id}/artifact?include=onnx", headers=h).content)
    assert "model.onnx" in full and "model.int8.onnx" in full
    onnx = api.get(f"/v1/models/{model_id}/artifact?format=onnx", headers=h)
    assert onnx.status_code == 200 and onnx.content == full["model.onnx"]

    # --- checkpoints: what is listed exists, carries its metrics, and is a model id
    cks = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    assert 1 <= len(cks) <= MISS["n_checkpoints"] + 1
    other = {"Authorization": f"Bearer {_key(sessions, 'someone-else')}"}
    for c in cks:
        cid = c["fine_tuned_model_checkpoint"]
        assert cid == f"{model_id}:ckpt-step-{c['step_number']}"
        m = c["metrics"]
        assert m["step"] == c["step_number"]
        assert {"train_loss", "valid_loss", "accuracy", "measured_sparsity"} <= set(m)
        got = api.get(f"/v1/models/{cid}", headers=h)
        assert got.status_code == 200, got.text
        assert got.json()["kind"] == "checkpoint"
        assert got.json()["checkpoint_step"] == c["step_number"]
        art = api.get(f"/v1/models/{cid}/artifact", headers=h)
        assert art.status_code == 200 and "model.safetensors" in _tar_names(art.content)
        r = api.post("/v1/classify", headers=h, json={"model": cid, "input": "a fine film"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["label"] in ("pos", "neg")
        # another tenant cannot see it, exactly as if it did not exist
        assert api.get(f"/v1/models/{cid}", headers=other).status_code == 404
        r = api.post("/v1/classify", headers=other, json={"model": cid, "input": "x"})
        assert r.status_code == 404
    # checkpoints are not in the model list; deleting the model takes them along
    listed = [m["id"] for m in api.get("/v1/models", headers=h).json()["data"]]
    assert model_id in listed and not any(":ckpt-step-" in i for i in listed)
    assert api.delete(f"/v1/models/{model_id}", headers=h).json()["deleted"] is True
    for c in cks:
        gone = api.get(f"/v1/models/{c['fine_tuned_model_checkpoint']}", headers=h)
        assert gone.status_code == 404
        assert "a checkpoint becomes a model when its job has succeeded" in gone.text

    assert not any((settings.data_path / "artifacts").iterdir())


def _key(sessions, tenant: str) -> str:
    with sessions() as s:
        return create_api_key(s, tenant)


def test_a_reached_target_says_so_without_a_target_warning(
    sessions, settings, tiny_bert_dir: Path, api
) -> None:
    job_id, h = _run(sessions, settings, tiny_bert_dir, REACH)
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h).json()
    assert job["target_reached"] is True
    assert not any(w.startswith("Target missed") for w in job["warnings"])
    assert job["eval_metrics"]["state"] == "best"
    assert job["eval_metrics"]["best"]["step"] == job["eval_metrics"]["step"]
    assert "NOT reached" not in _events(sessions, job_id)[-1].message
