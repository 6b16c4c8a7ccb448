"""/v1/models: catalog + finetuned models, artifact downloads (tar/safetensors/onnx), report."""

from __future__ import annotations

import io
import tarfile

from tests.support.api import cls_bytes, fake_artifact, job_body, succeed_job, upload


def _finetuned(client, h, sessions, settings, with_onnx=False, name="ft:minilm-l6:demo:abc"):
    fid = upload(client, h, cls_bytes()).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    files = fake_artifact(settings.data_path / "artifacts" / jid, with_onnx=with_onnx)
    succeed_job(sessions, jid, name, f"artifacts/{jid}")
    return jid, files


def test_list_get_and_job_link(client, make_headers, sessions, settings):
    h = make_headers("models-a")
    ids = [m["id"] for m in client.get("/v1/models", headers=h).json()["data"]]
    assert {"minilm-l6", "smollm2-135m"} <= set(ids)
    jid, _ = _finetuned(client, h, sessions, settings)
    job = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h).json()
    assert job["status"] == "succeeded"
    assert job["fine_tuned_model"] == "ft:minilm-l6:demo:abc"
    assert job["progress"]["percent"] == 100.0
    assert job["sparsity"]["measured"] == 0.41
    assert job["compression"] == {"params_before": 100, "params_after": 60}
    data = client.get("/v1/models", headers=h).json()["data"]
    ft = [m for m in data if m["id"] == "ft:minilm-l6:demo:abc"]
    assert len(ft) == 1 and ft[0]["kind"] == "fine-tuned" and ft[0]["job_id"] == jid
    one = client.get("/v1/models/ft:minilm-l6:demo:abc", headers=h).json()
    assert one["base_model"] == "minilm-l6" and one["object"] == "model"
    base = client.get("/v1/models/minilm-l6", headers=h).json()
    assert base["kind"] == "base" and base["owned_by"] == "finegates"
    assert client.get("/v1/models/nope", headers=h).status_code == 404


def test_artifact_tar_has_files_at_root(client, make_headers, sessions, settings):
    h = make_headers("models-tar")
    _, files = _finetuned(client, h, sessions, settings)
    r = client.get("/v1/models/ft:minilm-l6:demo:abc/artifact", headers=h)
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:*") as tar:
        names = sorted(tar.getnames())
        assert names == sorted(files)  # all at the root, no folder prefix
        for name, data in files.items():
            assert tar.extractfile(name).read() == data


def test_artifact_single_formats(client, make_headers, sessions, settings):
    h = make_headers("models-fmt")
    _, files = _finetuned(client, h, sessions, settings)
    r = client.get("/v1/models/ft:minilm-l6:demo:abc/artifact?format=safetensors", headers=h)
    assert r.status_code == 200 and r.content == files["model.safetensors"]
    r = client.get("/v1/models/ft:minilm-l6:demo:abc/artifact?format=onnx", headers=h)
    assert r.status_code == 404
    assert "ONNX" in r.json()["error"]["message"] and r.json()["error"]["param"] == "format"
    r = client.get("/v1/models/ft:minilm-l6:demo:abc/artifact?format=zip", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    r = client.get("/v1/models/minilm-l6/artifact", headers=h)
    assert r.status_code == 404 and "base model" in r.json()["error"]["message"]


def test_onnx_download(client, make_headers, sessions, settings):
    h = make_headers("models-onnx")
    _, files = _finetuned(client, h, sessions, settings, with_onnx=True, name="ft:x:onnx:1")
    r = client.get("/v1/models/ft:x:onnx:1/artifact?format=onnx", headers=h)
    assert r.status_code == 200 and r.content == b"onnx-bytes"


def test_report_and_delete(client, make_headers, sessions, settings):
    h = make_headers("models-del")
    jid, _ = _finetuned(client, h, sessions, settings)
    r = client.get("/v1/models/ft:minilm-l6:demo:abc/report", headers=h)
    assert r.json() == {"params": {"dense": 100, "pruned": 60}}
    assert client.get("/v1/models/minilm-l6/report", headers=h).status_code == 404
    assert client.delete("/v1/models/minilm-l6", headers=h).status_code == 403
    r = client.delete("/v1/models/ft:minilm-l6:demo:abc", headers=h)
    assert r.json() == {"id": "ft:minilm-l6:demo:abc", "object": "model", "deleted": True}
    assert not (settings.data_path / "artifacts" / jid).exists()
    assert client.get("/v1/models/ft:minilm-l6:demo:abc", headers=h).status_code == 404


def test_openapi_document_lists_the_routes(client):
    doc = client.get("/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "/v1/fine_tuning/jobs/{job_id}/metrics",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/models/{model_id}/artifact",
        "/v1/models/{model_id}/report",
    } <= paths
    upload = doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload


def test_registered_local_model_is_listed_and_trainable(
    client, make_headers, settings, tiny_bert_dir, enqueued
):
    from core.catalog import register_model

    register_model("tiny-bert", tiny_bert_dir, settings.data_path)
    h = make_headers("models-reg")
    listed = {m["id"]: m for m in client.get("/v1/models", headers=h).json()["data"]}
    assert listed["tiny-bert"]["family"] == "bert" and listed["tiny-bert"]["kind"] == "base"
    fid = upload(client, h, cls_bytes()).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "model": "tiny-bert"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-bert" and enqueued.calls[-1][0] == r.json()["id"]
    # a server path is never accepted as a model id through the API
    r = client.post(
        "/v1/fine_tuning/jobs", headers=h, json={**job_body(fid), "model": str(tiny_bert_dir)}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
