"""The unmodified `openai` package drives the API over real HTTP (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from api import jobstate
from tests.support.api import cls_bytes, fake_artifact


@pytest.fixture
def base_url(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_sdk_walkthrough(base_url, make_headers, sessions, settings, tmp_path):
    key = make_headers("sdk-tenant")["Authorization"].split()[1]
    client = openai.OpenAI(
        base_url=base_url, api_key=key, http_client=httpx.Client(timeout=30), max_retries=0
    )

    f = client.files.create(file=("train.jsonl", cls_bytes(8)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.status == "processed" and f.bytes == len(cls_bytes(8))
    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert client.files.content(f.id).read() == cls_bytes(8)
    assert [x.id for x in client.files.list()] == [f.id]

    job = client.fine_tuning.jobs.create(
        model="minilm-l6",
        training_file=f.id,
        suffix="sdk",
        seed=3,
        metadata={"k": "v"},
        method={  # type: ignore[arg-type]
            "type": "finegates",
            "finegates": {"hyperparameters": {"target_sparsity": 0.35, "max_steps": 10}},
        },
    )
    assert job.status == "queued" and job.seed == 3 and job.metadata == {"k": "v"}
    assert job.hyperparameters.n_epochs == "auto"
    extra = job.model_extra or {}
    assert extra["sparsity"]["target"] == 0.35 and extra["queue_position"] == 0

    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.id == job.id and again.training_file == f.id
    page = client.fine_tuning.jobs.list(limit=5)
    assert [j.id for j in page.data] == [job.id] and page.has_more is False
    events = client.fine_tuning.jobs.list_events(job.id, limit=10)
    assert all(e.object == "fine_tuning.job.event" for e in events.data) and events.data

    # simulate the worker, then read progress, checkpoints and the model back
    with sessions() as s:
        assert jobstate.claim(s, job.id, "w")
        jobstate.record_progress(
            s, job.id, "w", step=10, total_steps=10, metrics=[{"step": 10, "loss": 0.5}]
        )
        jobstate.add_checkpoint(s, job.id, 10, "/tmp/x", {"train_loss": 0.5})
        fake_artifact(settings.data_path / "artifacts" / job.id)
        assert jobstate.finish_succeeded(
            s,
            job.id,
            "w",
            fine_tuned_model="ft:minilm-l6:sdk:xyz",
            artifact_dir=f"artifacts/{job.id}",
        )
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "ft:minilm-l6:sdk:xyz"
    assert done.finished_at is not None
    ck = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert ck.data[0].step_number == 10 and ck.data[0].fine_tuning_job_id == job.id
    models = {m.id for m in client.models.list()}
    assert {"minilm-l6", "smollm2-135m", "ft:minilm-l6:sdk:xyz"} <= models
    assert client.models.retrieve("ft:minilm-l6:sdk:xyz").owned_by.startswith("org-")
    metrics = client.get(f"/fine_tuning/jobs/{job.id}/metrics", cast_to=object)
    assert metrics["data"][0]["loss"] == 0.5

    # errors arrive as typed SDK exceptions with param/code
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(
            model="minilm-l6",
            training_file=f.id,
            method={"type": "finegates", "finegates": {"hyperparameters": {"lora_rank": 0}}},  # type: ignore[arg-type]
        )
    assert bad.value.param == "lora_rank" and bad.value.code == "invalid_hyperparameter"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="fg-wrong-key-000000", max_retries=0).models.list()

    # cancel a queued job
    j2 = client.fine_tuning.jobs.create(
        model="minilm-l6",
        training_file=f.id,
        method={"type": "finegates", "finegates": {"hyperparameters": {}}},  # type: ignore[arg-type]
    )
    assert client.fine_tuning.jobs.cancel(j2.id).status == "cancelled"
    assert client.files.delete(f.id).deleted is True
