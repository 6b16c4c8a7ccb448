"""Key management and tenant limits from the command line (issue 12): keys list, revoke,
rotate; tenants update. A revoked key is refused by the API."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from worker.cli import main


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k in list(os.environ):
        if k.startswith("FINEGATES_"):
            monkeypatch.delenv(k)
    yield tmp_path / "data"
    from api.settings import get_settings

    get_settings.cache_clear()


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


def _app(data_dir: Path, cache_s: float = 0.0):
    from api.app import create_app
    from api.settings import Settings

    return create_app(
        Settings(data_dir=data_dir, auth_cache_seconds=cache_s), enqueue=lambda *_: None
    )


def test_keys_list_revoke_rotate(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    d = ["--data-dir", str(data_dir)]
    assert _run(capsys, "keys", "create", "--tenant", "acme", "--name", "ci", *d)[0] == 0
    code, out = _run(capsys, "keys", "create", "--tenant", "acme", *d)
    key2 = out[-1]
    code, lines = _run(capsys, "keys", "list", "--tenant", "acme", *d)
    assert code == 0 and len(lines) == 2
    ids = [ln.split()[0] for ln in lines]
    assert all(i.startswith("key-") for i in ids)
    assert all("active" in ln for ln in lines) and lines[0].endswith("ci")
    assert key2 not in "\n".join(lines) and key2[:12] in lines[1]  # prefix only, never the key

    with TestClient(_app(data_dir)) as c:
        h2 = {"Authorization": f"Bearer {key2}"}
        assert c.get("/v1/files", headers=h2).status_code == 200
        code, out = _run(capsys, "keys", "revoke", ids[1], *d)
        assert code == 0 and "within 5 s" in out[-1]  # the default auth cache time
        r = c.get("/v1/files", headers=h2)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

        code, out = _run(capsys, "keys", "rotate", ids[0], *d)
        new_key = out[-1]
        assert code == 0 and new_key.startswith("fg-")
        assert c.get("/v1/files", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    code, lines = _run(capsys, "keys", "list", "--tenant", "acme", *d)
    states = [("revoked" in ln, ln.split()[0]) for ln in lines]
    assert [s for s, _ in states] == [True, True, False]
    assert _run(capsys, "keys", "revoke", "key-nope", *d)[0] == 2
    assert _run(capsys, "keys", "list", "--tenant", "nobody", *d)[0] == 2


def test_revocation_takes_effect_within_the_auth_cache_time(
    data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    d = ["--data-dir", str(data_dir)]
    key = _run(capsys, "keys", "create", "--tenant", "cached", *d)[1][-1]
    key_id = _run(capsys, "keys", "list", "--tenant", "cached", *d)[1][0].split()[0]
    with TestClient(_app(data_dir, cache_s=0.5)) as c:
        h = {"Authorization": f"Bearer {key}"}
        assert c.get("/v1/files", headers=h).status_code == 200
        _run(capsys, "keys", "revoke", key_id, *d)
        time.sleep(0.6)
        assert c.get("/v1/files", headers=h).status_code == 401


def test_tenants_update_sets_and_clears_limits(
    data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    d = ["--data-dir", str(data_dir)]
    key = _run(capsys, "keys", "create", "--tenant", "small", *d)[1][-1]
    code, out = _run(
        capsys, "tenants", "update", "small", "--requests-per-minute", "2",
        "--max-active-jobs", "7", "--max-storage-bytes", "1000", "--max-concurrent-inference",
        "1", *d,
    )  # fmt: skip
    assert code == 0
    shown = dict(ln.split(": ", 1) for ln in out)
    assert shown["requests-per-minute"] == "2" and shown["max-active-jobs"] == "7"
    assert shown["max-files"].endswith("(default)")
    with TestClient(_app(data_dir)) as c:
        h = {"Authorization": f"Bearer {key}"}
        codes = [c.get("/v1/files", headers=h).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    code, out = _run(capsys, "tenants", "update", "small", "--max-active-jobs", "default", *d)
    shown = dict(ln.split(": ", 1) for ln in out)
    assert shown["max-active-jobs"] == "100 (default)" and shown["requests-per-minute"] == "2"
    assert _run(capsys, "tenants", "update", "ghost", "--max-files", "1", *d)[0] == 2
