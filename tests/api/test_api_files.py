"""Uploads: streamed, capped, hashed, validated; bad files answer 4xx naming the line."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.api import cls_bytes, upload


def test_upload_and_read_back(client, make_headers):
    h = make_headers("files-a")
    content = cls_bytes(6)
    r = upload(client, h, content)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["id"].startswith("file-")
    assert f["object"] == "file"
    assert f["bytes"] == len(content)
    assert f["sha256"] == hashlib.sha256(content).hexdigest()
    assert f["status"] == "processed"
    assert f["purpose"] == "fine-tune"
    assert f["filename"] == "train.jsonl"
    assert (f["format"], f["task"], f["n_rows"]) == ("jsonl", "classification", 6)

    got = client.get(f"/v1/files/{f['id']}", headers=h).json()
    assert got["sha256"] == f["sha256"]
    body = client.get(f"/v1/files/{f['id']}/content", headers=h)
    assert body.status_code == 200
    assert body.content == content


def test_list_pagination_and_delete(client, make_headers):
    h = make_headers("files-b")
    ids = [upload(client, h, cls_bytes(4), name=f"t{i}.jsonl").json()["id"] for i in range(3)]
    page1 = client.get("/v1/files?limit=2", headers=h).json()
    assert page1["object"] == "list"
    assert page1["count"] == 3
    assert [d["id"] for d in page1["data"]] == [ids[2], ids[1]]
    assert page1["has_more"] is True
    page2 = client.get(f"/v1/files?limit=2&after={ids[1]}", headers=h).json()
    assert [d["id"] for d in page2["data"]] == [ids[0]]
    assert page2["has_more"] is False

    r = client.delete(f"/v1/files/{ids[0]}", headers=h)
    assert r.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{ids[0]}", headers=h).status_code == 404
    assert client.get("/v1/files", headers=h).json()["count"] == 2


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        (b'{"text": "ok", "label": "pos"}\n{"text": "broken", "label": \n', 2, "JSON"),
        (b'{"text": "ok", "label": "pos"}\n{"txt": "wrong column", "label": "neg"}\n', 2, None),
        (b'{"text": "ok", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n', 2, "UTF-8"),
        (b"", 1, "empty"),
    ],
    ids=["malformed-json", "wrong-columns", "non-utf8", "empty"],
)
def test_bad_uploads_name_the_line(client, make_headers, settings, content, line, needle):
    h = make_headers("files-bad")
    r = upload(client, h, content, name="bad.jsonl")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "file"
    assert err["line"] == line
    assert f"line {line}" in err["message"]
    assert "bad.jsonl" in err["message"]
    assert str(settings.data_path) not in err["message"]  # no server paths leak
    if needle:
        assert needle.lower() in err["message"].lower()
    # rejected files are not kept
    assert client.get("/v1/files", headers=h).json()["count"] == 0
    leftovers = (
        list((settings.storage_dir / "files").rglob("*")) if settings.storage_dir.exists() else []
    )
    assert [p for p in leftovers if p.is_file()] == []


def test_oversize_upload_is_413_and_leaves_nothing(client, make_headers, settings):
    h = make_headers("files-big")
    line = b'{"text": "' + b"x" * 1000 + b'", "label": "pos"}\n'
    content = line * (settings.max_upload_bytes // len(line) + 5)
    r = upload(client, h, content)
    assert r.status_code == 413
    err = r.json()["error"]
    assert str(settings.max_upload_bytes) in err["message"]
    assert err["param"] == "file"
    files = (
        [p for p in settings.storage_dir.rglob("*") if p.is_file()]
        if settings.storage_dir.exists()
        else []
    )
    assert files == []


def test_wrong_purpose_and_missing_file(client, make_headers):
    h = make_headers("files-p")
    r = client.post(
        "/v1/files",
        headers=h,
        files={"file": ("t.jsonl", cls_bytes(), "application/jsonl")},
        data={"purpose": "assistants"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "purpose"
    r = client.post("/v1/files", headers=h, data={"purpose": "fine-tune"}, files={"x": ("a", b"1")})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file"


def test_auth_required(client):
    r = client.get("/v1/files")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    r = client.get("/v1/files", headers={"Authorization": "Bearer fg-not-a-real-key-000000000"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_unicode_filename_round_trip(client, make_headers):
    h = make_headers("files-u")
    f = upload(client, h, cls_bytes(4), name="données été.jsonl").json()
    assert f["filename"] == "données été.jsonl"
    r = client.get(f"/v1/files/{f['id']}/content", headers=h)
    assert r.status_code == 200 and r.content == cls_bytes(4)
    assert "filename*=UTF-8''" in r.headers["content-disposition"]
