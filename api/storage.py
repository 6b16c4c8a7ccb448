"""Blob storage for uploads: a directory addressed by keys (``files/<tenant>/<id>.jsonl``).

Why keys rather than paths in the database: a deployment mounts the same shared storage
at any path on the API and on every worker (docker-compose.yml's data volume); a key
resolves under whichever root the process was given, and cannot escape it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class TooLargeError(Exception):
    """The stream went past the size cap; nothing was kept."""

    def __init__(self, limit: int):
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass
class StoredBlob:
    key: str
    size: int
    sha256: str


class _Writer:
    """Temp file + running sha256 + cap; ``commit`` renames into place atomically."""

    def __init__(self, target: Path, max_bytes: int | None):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
        self.fh = os.fdopen(fd, "wb")
        self.tmp = Path(tmp)
        self.target = target
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLargeError(self.max_bytes)
        self.digest.update(chunk)
        self.fh.write(chunk)

    def commit(self, key: str) -> StoredBlob:
        self.fh.close()
        os.replace(self.tmp, self.target)
        return StoredBlob(key=key, size=self.size, sha256=self.digest.hexdigest())

    def abort(self) -> None:
        try:
            self.fh.close()  # may raise again when the disk is full (buffered bytes)
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class LocalStorage:
    """Keys are relative POSIX paths under ``root``; '..' and absolute keys are refused."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\\" in key:
            raise ValueError(f"invalid storage key {key!r}")
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"storage key {key!r} escapes the storage root")
        return p

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None) -> StoredBlob:
        w = _Writer(self.path(key), max_bytes)
        try:
            for chunk in chunks:
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit(key)

    def writer(self, key: str, max_bytes: int | None) -> _Writer:
        """A push-style writer (used by the streaming multipart parser)."""
        return _Writer(self.path(key), max_bytes)

    def delete(self, key: str) -> None:
        p = self.path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
