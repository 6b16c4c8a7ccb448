"""PostgreSQL and Redis servers that a fault test starts, kills and restarts itself.

Never the machine's shared ones (127.0.0.1:5432 / :6379): each server here runs on a
spare port from a temporary directory, and only the processes started here are
signalled. PostgreSQL refuses to run as root, so as root it runs as the ``postgres``
user (``runuser``). Missing binaries skip locally and FAIL under CI=true.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.e2e import free_port

IN_CI = os.environ.get("CI", "").lower() == "true"


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        msg = f"{binary} is not installed (fault tests start their own servers)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _wait_port(port: int, up: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not go {'up' if up else 'down'} in {timeout}s")


class RedisServer:
    """``redis-server`` without persistence: a restart loses every message."""

    def __init__(self, workdir: Path):
        self.bin = _need("redis-server")
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.bin, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait_port(self.port, up=True)

    def kill(self) -> None:
        """SIGKILL: every queued and unacknowledged message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        _wait_port(self.port, up=False)


class PostgresServer:
    """A throwaway PostgreSQL cluster (trust auth) on a spare port."""

    def __init__(self) -> None:
        self.initdb = _need("initdb")
        self.pg_ctl = _need("pg_ctl")
        self.port = free_port()
        # its own folder under /tmp: pytest's tmp folders are private to root, and the
        # server may run as another user
        self.root = Path(tempfile.mkdtemp(prefix="fg-faults-pg-"))
        self.data = self.root / "pgdata"
        self.user_prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root without a postgres user to run PostgreSQL")
            self.user_prefix = [_need("runuser"), "-u", "postgres", "--"]
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [*self.user_prefix, *args], check=True, timeout=timeout,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def init(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
            "-w", "start",
        )  # fmt: skip
        _wait_port(self.port, up=True)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean restart; ``immediate``: a crash (recovery on the next start)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
        _wait_port(self.port, up=False)
