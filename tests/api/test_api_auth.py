"""Auth and tenant isolation: another tenant's id answers 404 on EVERY object route."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from api.auth import authenticate, create_api_key, hash_key
from api.db.models import ApiKey, utcnow
from tests.support.api import cls_bytes, fake_artifact, job_body, succeed_job, upload


@pytest.fixture
def two_tenants(client, make_headers, sessions, settings):
    ha, hb = make_headers("iso-a"), make_headers("iso-b")
    fid = upload(client, ha, cls_bytes()).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=ha, json=job_body(fid)).json()["id"]
    jid2 = client.post("/v1/fine_tuning/jobs", headers=ha, json=job_body(fid)).json()["id"]
    fake_artifact(settings.data_path / "artifacts" / jid2)
    succeed_job(sessions, jid2, "ft:minilm-l6:iso:a", f"artifacts/{jid2}")
    return ha, hb, fid, jid, "ft:minilm-l6:iso:a"


def test_every_object_route_is_tenant_scoped(client, two_tenants):
    ha, hb, fid, jid, mid = two_tenants
    routes = [
        ("GET", f"/v1/files/{fid}"),
        ("GET", f"/v1/files/{fid}/content"),
        ("DELETE", f"/v1/files/{fid}"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}"),
        ("POST", f"/v1/fine_tuning/jobs/{jid}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}/checkpoints"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}/metrics"),
        ("GET", f"/v1/models/{mid}"),
        ("GET", f"/v1/models/{mid}/artifact"),
        ("GET", f"/v1/models/{mid}/artifact?format=safetensors"),
        ("GET", f"/v1/models/{mid}/report"),
        ("DELETE", f"/v1/models/{mid}"),
    ]
    for method, url in routes:
        r = client.request(method, url, headers=hb)
        assert r.status_code == 404, (method, url, r.status_code, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    # B's job create cannot reference A's file either
    r = client.post("/v1/fine_tuning/jobs", headers=hb, json=job_body(fid))
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    # lists show nothing of A's
    assert client.get("/v1/files", headers=hb).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=hb).json()["data"] == []
    ids = [m["id"] for m in client.get("/v1/models", headers=hb).json()["data"]]
    assert mid not in ids
    # paging with A's id as cursor is refused, not leaked
    assert client.get(f"/v1/files?after={fid}", headers=hb).status_code == 400
    # A still has everything (B's attempts changed nothing)
    for method, url in routes:
        if method == "GET":
            assert client.get(url, headers=ha).status_code == 200, url
    assert client.get(f"/v1/fine_tuning/jobs/{jid}", headers=ha).json()["status"] == "queued"


def test_keys_are_hashed_and_revocable(sessions):
    with sessions() as s:
        key = create_api_key(s, "auth-k")
        row = s.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).scalar_one()
        assert key not in (row.key_hash, row.prefix) and key.startswith(row.prefix)
        assert authenticate(s, key).tenant_id == row.tenant_id
        assert authenticate(s, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        s.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=utcnow()))
        s.commit()
        assert authenticate(s, key) is None
        # same tenant name -> same tenant
        key2 = create_api_key(s, "auth-k")
        assert authenticate(s, key2).tenant_id == row.tenant_id
