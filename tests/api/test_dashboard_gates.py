"""GET /v1/fine_tuning/jobs/{id}/gates (eval snapshot, then the prune plan), tenant
isolation, the metrics route keeping the snapshot out, and the dashboard's static page."""

from __future__ import annotations

import json
import re

import torch

from api import jobstate
from core import gatemap
from core.artifacts import seal
from core.callbacks import EvalRecord
from core.gates import gated_modules, inject_gates
from core.manifest import Manifest
from core.structure import build_plan, describe
from tests.support.api import cls_bytes, job_body, upload
from tests.support.tiny_models import build_tiny_bert_cls
from worker.callback import JobCallback


def _gated_bert_with_closed_head():
    model = build_tiny_bert_cls()
    inject_gates(model)
    S = describe(model)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            gm.row_logits.fill_(3.0)
            gm.col_logits.fill_(3.0)
        model.get_submodule(S.layers[0].v).row_logits[8:16] = -3.0  # head 1 of layer 0
        model.get_submodule(S.layers[1].ffn_in[0]).row_logits[:32] = -3.0  # half the FFN
    return model


def _running_job(client, headers, sessions) -> str:
    fid = upload(client, headers, cls_bytes()).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=headers, json=job_body(fid, max_steps=4))
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, job_id, "w-test")
    return job_id


def test_gates_from_eval_then_from_plan_and_tenant_isolation(
    client, make_headers, sessions, settings
):
    headers, other = make_headers("tenant-a"), make_headers("tenant-b")
    job_id = _running_job(client, headers, sessions)
    url = f"/v1/fine_tuning/jobs/{job_id}/gates"

    r = client.get(url, headers=headers)
    assert r.status_code == 200
    assert r.json()["source"] is None and r.json()["layers"] == []

    model = _gated_bert_with_closed_head()
    cb = JobCallback(sessions, job_id, "w-test")  # the worker's own storage path
    cb.on_eval(EvalRecord(step=3, total_steps=4, metrics={"accuracy": 0.5}, measured_sparsity=0.3,
                          gates=gatemap.from_model(model, step=3)))  # fmt: skip
    body = client.get(url, headers=headers).json()
    assert body["object"] == "fine_tuning.job.gates" and body["job_id"] == job_id
    assert (body["source"], body["step"]) == ("eval", 3)
    l0, l1 = body["layers"]
    assert l0["heads_kept"] == [0, 2, 3] and l0["heads"] == {"kept": 3, "total": 4}
    assert l1["ffn"] == {"kept": 32, "total": 64}

    # the snapshot is not part of the metrics series
    points = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers=headers).json()["data"]
    (ev,) = [p for p in points if p["kind"] == "eval"]
    assert ev["metrics"] == {"accuracy": 0.5}

    # another tenant: 404 exactly like a job that does not exist
    for h in (other,):
        r = client.get(url, headers=h)
        assert r.status_code == 404 and job_id in r.json()["error"]["message"]
    missing = client.get("/v1/fine_tuning/jobs/ftjob-nope/gates", headers=headers)
    assert missing.status_code == 404
    assert client.get(url).status_code == 401

    # after pruning: the plan in the artifact's manifest, with a different pattern
    with torch.no_grad():
        S = describe(model)
        model.get_submodule(S.layers[1].v).row_logits[:8] = -3.0  # head 0 of layer 1 too
    plan = json.loads(build_plan(model).to_json())
    art = settings.data_path / "artifacts" / "m1"
    art.mkdir(parents=True)
    (art / "model.safetensors").write_bytes(b"weights")
    seal(art, Manifest(family="bert", model_config={}, files={}, task="classification", plan=plan))
    with sessions() as s:
        assert jobstate.finish_succeeded(
            s, job_id, "w-test", fine_tuned_model="ft:tiny:gates:1", artifact_dir=str(art)
        )
    body = client.get(url, headers=headers).json()
    assert body["source"] == "plan" and body["fine_tuned_model"] == "ft:tiny:gates:1"
    assert [layer["heads_kept"] for layer in body["layers"]] == [[0, 2, 3], [1, 2, 3]]
    assert body["totals"]["removed_fraction"] == round(
        1 - plan["gated_params_after"] / plan["gated_params_before"], 6
    )
    assert client.get(url, headers=other).status_code == 404


def test_dashboard_page_is_served_offline(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert re.search(r'<input[^>]+name="api_key"', html)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    # every script and stylesheet is local
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith(("/", "#")) for ref in refs), refs
    for ref in refs:
        if ref.startswith("/dashboard/"):
            a = client.get(ref)
            assert a.status_code == 200, ref
            assert "https://" not in a.text[:2000] or ref.endswith("plotly.min.js")
    js = client.get("/dashboard/plotly.min.js")
    assert js.status_code == 200 and "plotly" in js.text[:5000].lower() and len(js.content) > 1e6
    app = client.get("/dashboard/app.js").text
    assert "sessionStorage" in app and "localStorage" not in app
    assert "console.log" not in app  # the key is never logged
    assert client.get("/dashboard/nope.js").status_code == 404
