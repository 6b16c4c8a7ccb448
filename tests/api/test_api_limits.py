"""Limits and abuse (issue 12): size caps, atomic quotas, nothing internal shown to tenants.

Each test here failed before the change it covers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db.models import File, Job, Tenant
from tests.support.api import cls_bytes, job_body, upload


def _file(client, h) -> str:
    r = upload(client, h, cls_bytes(6))
    assert r.status_code == 200, r.text
    return r.json()["id"]


# ---------------------------------------------------------------- size caps


def test_a_json_body_over_the_cap_is_413_before_it_is_parsed(client, make_headers, app):
    h = make_headers("caps-a")
    cap = app.state.settings.max_request_bytes
    assert cap == 4 * 1024 * 1024  # the documented default
    big = b'{"model": "' + b"x" * (cap + 10) + b'"}'
    r = client.post(
        "/v1/fine_tuning/jobs", headers={**h, "Content-Type": "application/json"}, content=big
    )
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "FINEGATES_MAX_REQUEST_BYTES" in err["message"]
    # a body without a length (chunked) is cut at the cap too
    chunks = iter([b'{"model": "', b"x" * cap, b'x"}'])
    r = client.post(
        "/v1/fine_tuning/jobs", headers={**h, "Content-Type": "application/json"}, content=chunks
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_uploads_keep_their_own_cap(client, make_headers, app):
    h = make_headers("caps-up")
    limit = app.state.settings.max_upload_bytes  # 64 KiB in these tests
    r = upload(client, h, b'{"text": "x", "label": "a"}\n' * (limit // 28 + 100))
    assert r.status_code == 413 and r.json()["error"]["param"] == "file"


def test_oversized_headers_are_431(client, make_headers):
    h = make_headers("caps-h")
    r = client.get("/v1/files", headers={**h, "X-Junk": "y" * (64 * 1024)})
    assert r.status_code == 431
    assert r.json()["error"]["code"] == "request_header_fields_too_large"


# ---------------------------------------------------------------- atomic active-job limit


def test_concurrent_creates_cannot_pass_the_active_job_limit(
    client, make_headers, app, sessions, monkeypatch
):
    import api.routes.jobs as jobs_routes

    app.state.settings.max_active_jobs_per_tenant = 3
    h = make_headers("race")
    fid = _file(client, h)
    real = jobs_routes.check_active_jobs

    def slow_check(*a: Any, **k: Any) -> None:
        real(*a, **k)
        time.sleep(0.05)  # widen the count-then-insert window a race would need

    monkeypatch.setattr(jobs_routes, "check_active_jobs", slow_check)
    barrier = threading.Barrier(8)

    def create(_i: int) -> int:
        barrier.wait()
        body = job_body(fid, max_steps=5)
        return client.post("/v1/fine_tuning/jobs", headers=h, json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(create, range(8)))
    assert sorted(codes) == [200] * 3 + [429] * 5, codes
    with sessions() as s:
        tid = s.execute(select(Tenant.id).where(Tenant.name == "race")).scalar_one()
        n = s.execute(select(func.count()).select_from(Job).where(Job.tenant_id == tid))
        assert n.scalar_one() == 3


def test_the_limit_is_per_tenant_and_overridable(client, make_headers, app, sessions):
    app.state.settings.max_active_jobs_per_tenant = 1
    ha, hb = make_headers("lim-a"), make_headers("lim-b")
    fa, fb = _file(client, ha), _file(client, hb)
    assert client.post("/v1/fine_tuning/jobs", headers=ha, json=job_body(fa)).status_code == 200
    r = client.post("/v1/fine_tuning/jobs", headers=ha, json=job_body(fa))
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"
    # another tenant is not limited by the first one's jobs
    assert client.post("/v1/fine_tuning/jobs", headers=hb, json=job_body(fb)).status_code == 200
    # a per-tenant override (finegates tenants update) lifts tenant A's limit
    with sessions() as s:
        t = s.execute(select(Tenant).where(Tenant.name == "lim-a")).scalar_one()
        t.max_active_jobs = 2
        s.commit()
    assert client.post("/v1/fine_tuning/jobs", headers=ha, json=job_body(fa)).status_code == 200


def test_batch_size_is_capped_to_what_a_worker_can_hold(client, make_headers):
    h = make_headers("bs")
    fid = _file(client, h)
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid, batch_size=4096))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "batch_size_too_large" and err["param"] == "hyperparameters.batch_size"
    r = client.post(
        "/v1/fine_tuning/jobs", headers=h, json=job_body(fid, batch_size=200, max_length=512)
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "batch_too_large"
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid, batch_size=16))
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- storage quotas


def test_file_count_and_storage_quotas(client, make_headers, app, sessions):
    app.state.settings.max_files_per_tenant = 2
    h = make_headers("quota")
    assert upload(client, h, cls_bytes(6)).status_code == 200
    assert upload(client, h, cls_bytes(6)).status_code == 200
    r = upload(client, h, cls_bytes(6))
    assert r.status_code == 429 and r.json()["error"]["code"] == "file_quota_exceeded"
    app.state.settings.max_files_per_tenant = 100
    app.state.settings.max_storage_bytes_per_tenant = len(cls_bytes(6)) * 2 + 10
    r = upload(client, h, cls_bytes(6))
    assert r.status_code == 429 and r.json()["error"]["code"] == "storage_quota_exceeded"
    with sessions() as s:
        tid = s.execute(select(Tenant.id).where(Tenant.name == "quota")).scalar_one()
        rows = s.execute(select(File.storage_key).where(File.tenant_id == tid)).all()
    assert len(rows) == 2  # the refused uploads left no row ...
    stored = list((app.state.settings.storage_dir / "files" / tid).iterdir())
    assert len(stored) == 2  # ... and no bytes


def test_concurrent_uploads_cannot_pass_the_file_quota(client, make_headers, app, sessions):
    app.state.settings.max_files_per_tenant = 2
    h = make_headers("quota-race")
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: upload(client, h, cls_bytes(6)).status_code, range(6)))
    assert sorted(codes) == [200, 200, 429, 429, 429, 429], codes


# ---------------------------------------------------------------- names and metadata


@pytest.mark.parametrize("name", ["bad\x00name.jsonl", "line\nbreak.jsonl", "esc\x1b[31m.jsonl"])
def test_control_characters_in_upload_names_are_refused(client, make_headers, name):
    h = make_headers("names")
    # by hand: httpx would percent-encode the name; raw clients (curl, scripts) do not
    boundary = "xXxBoundaryxXx"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        + cls_bytes(6)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ctype = f"multipart/form-data; boundary={boundary}"
    r = client.post("/v1/files", headers={**h, "Content-Type": ctype}, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_filename"


def test_control_characters_in_metadata_and_ids_are_refused(client, make_headers):
    h = make_headers("meta")
    fid = _file(client, h)
    for patch in (
        {"metadata": {"team": "a\x00b"}},
        {"metadata": {"k\x07": "v"}},
        {"model": "minilm\x00-l6"},
    ):
        body = {**job_body(fid), **patch}
        r = client.post("/v1/fine_tuning/jobs", headers=h, json=body)
        assert r.status_code == 400, (patch, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    # free text keeps its newlines
    body = {**job_body(fid), "metadata": {"note": "line one\nline two"}}
    assert client.post("/v1/fine_tuning/jobs", headers=h, json=body).status_code == 200


# ---------------------------------------------------------------- nothing internal


def test_registered_models_are_listed_without_their_server_path(
    client, make_headers, app, tiny_bert_dir
):
    from core.catalog import register_model

    register_model("my-bert", tiny_bert_dir, app.state.settings.data_path)
    h = make_headers("paths")
    models = client.get("/v1/models", headers=h).json()["data"]
    mine = [m for m in models if m["id"] == "my-bert"]
    assert mine and str(tiny_bert_dir) not in str(mine)
    assert "/" not in (mine[0]["description"] or "")
    one = client.get("/v1/models/my-bert", headers=h).json()
    assert str(tiny_bert_dir) not in str(one)


def test_engine_errors_reach_tenants_without_server_paths():
    from api.errors import from_engine_error
    from core.errors import ArtifactError, DataError, TrainingError

    err = from_engine_error(
        ArtifactError("/srv/finegates/.data/artifacts/ftjob-x/model.safetensors: hash mismatch")
    )
    assert err.status == 400 and "/srv" not in err.message
    assert "model.safetensors: hash mismatch" in err.message
    err = from_engine_error(DataError("bad label", file="/srv/d/storage/f/a.jsonl", line=3))
    assert "/srv" not in err.message and "a.jsonl, line 3" in err.message
    err = from_engine_error(TrainingError("CUDA blew up in /opt/venv/lib/torch/x.py"))
    assert err.status == 500 and "/opt" not in err.message and "reference err_" in err.message


def test_scrub_leaves_urls_and_hub_ids_alone(monkeypatch):
    import socket

    from api.redact import scrub

    monkeypatch.setattr(socket, "gethostname", lambda: "build-host-7")

    assert scrub("see https://example.com/a/b and owner/name") == (
        "see https://example.com/a/b and owner/name"
    )
    assert scrub("open('/home/u/.data/x.csv') failed") == "open('x.csv') failed"
    assert scrub(f"on {socket.gethostname()}:123") == "on <host>:123"


def test_an_unhandled_error_is_a_500_with_a_reference_not_the_exception(
    app, make_headers, monkeypatch, caplog
):
    from fastapi.testclient import TestClient

    import api.routes.files as files_routes

    client = TestClient(app, raise_server_exceptions=False)

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internals at /srv/x/y")

    monkeypatch.setattr(files_routes, "file_object", boom)
    h = make_headers("boom")
    r = client.get("/v1/files/file-nope", headers=h)  # 404 path unaffected
    assert r.status_code == 404
    fid_resp = upload(client, h, cls_bytes(6))
    assert fid_resp.status_code == 500
    err = fid_resp.json()["error"]
    assert "secret internals" not in err["message"] and "/srv" not in err["message"]
    assert err["code"] == "server_error"
    ref = err["message"].split("reference ")[1].split(")")[0]
    assert any(ref in rec.getMessage() for rec in caplog.records)


def test_every_4xx_has_a_code():
    from api.errors import error_body

    for status in (400, 401, 403, 404, 405, 409, 413, 415, 418, 422, 429, 431):
        assert error_body(status, "x")["error"]["code"], status


def test_the_job_started_event_does_not_name_the_worker_host(client, make_headers, sessions):
    from api import jobstate

    h = make_headers("host")
    fid = _file(client, h)
    jid = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid)).json()["id"]
    with sessions() as s:
        assert jobstate.claim(s, jid, "some-host.internal:4242:abc")
    events = client.get(f"/v1/fine_tuning/jobs/{jid}/events", headers=h).json()["data"]
    assert "some-host" not in str(events) and "4242" not in str(events)


def test_the_inference_only_app_has_no_mutating_routes(settings, migrated_engine):
    from api.inference.app import create_inference_app

    app = create_inference_app(settings)
    paths = app.openapi()["paths"]
    methods = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    mutating = {(m, p) for m, p in methods if m in ("DELETE", "PUT", "PATCH")}
    assert mutating == set()
    posts = {p for m, p in methods if m == "POST"}
    assert posts == {"/v1/classify", "/v1/completions", "/v1/chat/completions"}


# ---------------------------------------------------------------- requests per minute


def test_rate_limit_headers_on_every_response_and_429(client, make_headers, app):
    app.state.settings.rate_limit_per_minute = 5
    ha, hb = make_headers("rl-a"), make_headers("rl-b")
    remaining = []
    for i in range(5):
        # errors count and carry the headers too (a 404 here)
        path = "/v1/files" if i % 2 == 0 else "/v1/files/file-missing"
        r = client.get(path, headers=ha)
        assert r.status_code in (200, 404)
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [4, 3, 2, 1, 0]
    r = client.get("/v1/files", headers=ha)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # another tenant is not limited by the first one's traffic
    r = client.get("/v1/files", headers=hb)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "4"


def test_a_per_tenant_rate_override(client, make_headers, app, sessions):
    app.state.settings.rate_limit_per_minute = 2
    h = make_headers("rl-override")
    with sessions() as s:
        t = s.execute(select(Tenant).where(Tenant.name == "rl-override")).scalar_one()
        t.requests_per_minute = 4
        s.commit()
    codes = [client.get("/v1/files", headers=h).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]


def test_unauthenticated_routes_are_not_counted(client, app):
    app.state.settings.rate_limit_per_minute = 1
    for _ in range(3):
        assert client.get("/health").status_code == 200


def test_the_rate_limit_is_shared_through_redis(settings, migrated_engine, make_headers):
    """Two API processes (two apps here) on one Redis see one count per tenant."""
    import os
    import uuid

    from fastapi.testclient import TestClient

    from api.app import create_app

    url = "redis://127.0.0.1:6379/14"
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required under CI=true but unreachable: {exc}")
        pytest.skip(f"Redis unreachable ({exc}); skipped locally, fails under CI=true")
    s = settings.model_copy(update={"rate_limit_storage_url": url, "rate_limit_per_minute": 3})
    h = make_headers(f"rl-redis-{uuid.uuid4().hex[:8]}")
    apps = [create_app(s, engine=migrated_engine, enqueue=lambda *_: None) for _ in range(2)]
    codes = []
    for a in apps:
        a.state.owns_engine = False
    with TestClient(apps[0]) as c0, TestClient(apps[1]) as c1:
        for c in (c0, c1, c0, c1):
            codes.append(c.get("/v1/files", headers=h).status_code)
    assert codes == [200, 200, 200, 429]
