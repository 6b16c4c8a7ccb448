"""GET /v1/models/{id}/artifact?format=onnx-int8 serves the artifact's model.int8.onnx."""

from __future__ import annotations

from tests.support.api import cls_bytes, fake_artifact, job_body, succeed_job, upload


def _finetuned(client, h, sessions, settings, name):
    fid = upload(client, h, cls_bytes()).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    root = settings.data_path / "artifacts" / jid
    fake_artifact(root, with_onnx=True)
    succeed_job(sessions, jid, name, f"artifacts/{jid}")
    return root


def test_onnx_int8_download_and_missing_file(client, make_headers, sessions, settings):
    h = make_headers("models-int8")
    root = _finetuned(client, h, sessions, settings, "ft:x:int8:1")
    url = "/v1/models/ft:x:int8:1/artifact?format=onnx-int8"
    r = client.get(url, headers=h)
    assert r.status_code == 404 and r.json()["error"]["param"] == "format"
    assert "model.int8.onnx" in r.json()["error"]["message"]
    (root / "model.int8.onnx").write_bytes(b"int8-bytes")
    r = client.get(url, headers=h)
    assert r.status_code == 200 and r.content == b"int8-bytes"
    assert 'filename="ft_x_int8_1.int8.onnx"' in r.headers["content-disposition"]
