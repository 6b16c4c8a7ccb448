"""A real ENOSPC (a small tmpfs mounted by the test; CI runs as root) during an upload, a
checkpoint and an artifact write: a clear failure, nothing half-written visible."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.db import session_scope
from tests.faults.services import IN_CI
from tests.support.worker import Recorder, job_row, make_job


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` until ENOSPC, then free ``leave`` bytes."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _visible_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file()
        and p.name != "filler"
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _job_settings(settings, disk: Path):
    settings.data_dir = disk / "data"
    return settings


def test_checkpoint_on_a_full_disk_fails_the_job_clearly(
    sessions, settings, small_disk, tiny_bert_dir
):
    from core.catalog import register_model
    from worker.tasks import execute_job

    settings = _job_settings(settings, small_disk)
    register_model("tiny-unit", tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model="tiny-unit", hp={"max_steps": 6, "batch_size": 4})
    fill(small_disk, leave=64 * 1024)  # config.json and the tokenizer fit, a checkpoint does not
    out = execute_job(
        job_id, settings=settings, session_factory=sessions, worker_id="w", enqueue=Recorder()
    )
    assert (out.status, out.detail) == ("failed", "disk_full")
    row = job_row(sessions, job_id)
    assert row.status == "failed" and row.error_code == "disk_full"
    assert "ran out of disk space (No space left on device) while training" in row.error_message
    assert str(small_disk) not in row.error_message  # no server paths
    run = Path(row.run_dir)
    ckpts = run / "checkpoints"
    # no half-written checkpoint under a real name (the temporary ones were removed)
    assert not ckpts.exists() or [p.name for p in ckpts.iterdir()] == []


def test_artifact_on_a_full_disk_fails_the_job_and_leaves_no_artifact(
    sessions, settings, small_disk, tiny_bert_dir, monkeypatch
):
    from core.catalog import register_model
    from worker import tasks
    from worker.tasks import execute_job

    settings = _job_settings(settings, small_disk)
    register_model("tiny-unit", tiny_bert_dir, settings.data_path)
    job_id = make_job(sessions, settings, model="tiny-unit", hp={"max_steps": 4, "batch_size": 4})
    original = tasks._remove_stale_staging

    def fill_then(artifact_dir: Path) -> None:  # called right before packaging starts
        original(artifact_dir)
        fill(small_disk, leave=16 * 1024)

    monkeypatch.setattr(tasks, "_remove_stale_staging", fill_then)
    out = execute_job(
        job_id, settings=settings, session_factory=sessions, worker_id="w", enqueue=Recorder()
    )
    assert (out.status, out.detail) == ("failed", "disk_full"), out
    row = job_row(sessions, job_id)
    assert "while writing the model artifact" in row.error_message
    arts = settings.data_path / "artifacts"
    assert not arts.exists() or list(arts.iterdir()) == []  # no artifact, no staging folder
    with session_scope(sessions) as s:
        from api.db.models import FineTunedModel

        assert s.query(FineTunedModel).filter_by(job_id=job_id).count() == 0


def test_upload_on_a_full_disk_is_a_507_and_stores_nothing(
    tmp_path, db_url, migrated_engine, small_disk
):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.auth import create_api_key
    from api.db import make_sessionmaker
    from api.settings import Settings
    from tests.support.api import cls_bytes, upload

    settings = Settings(data_dir=small_disk / "data", database_url=db_url, auth_cache_seconds=0)
    app = create_app(settings, engine=migrated_engine, enqueue=Recorder())
    app.state.owns_engine = False
    with make_sessionmaker(migrated_engine)() as s:
        key = create_api_key(s, "disk")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        (settings.data_path / "storage").mkdir(parents=True, exist_ok=True)
        filler = fill(small_disk)
        r = upload(c, headers, cls_bytes(2000))
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_storage" and err["param"] == "file"
        assert str(small_disk) not in r.text
        assert _visible_files(small_disk) == []  # nothing half-written, not even hidden
        assert [p for p in (settings.data_path / "storage").rglob("*") if p.is_file()] == []
        filler.unlink()  # space is back: the same upload succeeds
        assert upload(c, headers, cls_bytes(2000)).status_code in (200, 201)
