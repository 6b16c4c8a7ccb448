"""The ``finegates`` command: one root parser for every command, its help, the console
script, the engine commands' independence from the service stack, and the commands that
docker-compose.yml and the Dockerfile run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from api.auth import create_api_key
from api.db import make_sessionmaker, session_scope
from api.settings import Settings
from worker.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "train",
    "prune",
    "export",
    "bench",
    "serve",
    "api",
    "worker",
    "cleanup",
    "keys",
    "tenants",
    "db",
    "models",
    "serve-inference",
    "files",  # the REST client (api/client_cli.py)
    "jobs",
}
SUBCOMMANDS = [
    ("keys", "create"),
    ("keys", "list"),
    ("keys", "revoke"),
    ("keys", "rotate"),
    ("tenants", "update"),
    ("db", "upgrade"),
    ("models", "register"),
]
SUBCOMMANDS += [("files", "upload"), ("models", "download")]
SUBCOMMANDS += [("jobs", c) for c in ("create", "list", "get", "cancel", "watch")]


def _finegates(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_keys_create_prints_the_key_alone_on_its_last_line(tmp_path: Path, sessions) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
    data = tmp_path / "cli-data"
    r = _finegates("keys", "create", "--tenant", "acme", "--data-dir", str(data), env=env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert key == key.strip() and " " not in key and len(key) >= 32
    from api.auth import authenticate

    s2 = Settings(data_dir=data)
    with session_scope(make_sessionmaker(s2)) as s:
        assert authenticate(s, key) is not None
        assert authenticate(s, key + "x") is None
    with session_scope(sessions) as s:  # a different data dir knows nothing of it
        assert authenticate(s, key) is None
        create_api_key(s, "other")


def test_engine_commands_do_not_import_the_service_stack() -> None:
    code = (
        "import sys\n"
        "from worker.cli import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'starlette', 'alembic')"
        " if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout[-500:]
    assert "--training-file" in r.stdout


def test_compose_and_dockerfile_commands_parse() -> None:
    """Every finegates command in docker-compose.yml and the Dockerfile is a valid one."""
    import yaml

    parser = build_parser()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    commands = {
        n: s["command"] for n, s in services.items() if s.get("image", "").startswith("finegates")
    }
    assert set(commands) >= {"migrate", "api", "worker", "worker-gpu"}
    for cmd in commands.values():
        parser.parse_args(cmd)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    docker = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["finegates"]' in docker
    cmd_line = next(line for line in docker.splitlines() if line.startswith("CMD "))
    parser.parse_args(json.loads(cmd_line[4:]))
    assert "torch==2.13.0" in docker and "TORCH_VARIANT" in docker
    torch_installs = [
        ln
        for ln in docker.splitlines()
        if ln.startswith("RUN") and "pip install" in ln and "torch" in ln
    ]
    assert torch_installs and all('"torch==2.13.0"' in ln for ln in torch_installs)


def test_root_help_lists_every_command() -> None:
    r = _finegates("--help")
    assert r.returncode == 0, r.stderr
    # argparse lists each subcommand indented under COMMAND, with its help after it
    listed = set(re.findall(r"^    (\S+)", r.stdout, flags=re.MULTILINE))
    assert listed == COMMANDS, r.stdout


@pytest.mark.parametrize(
    "argv", [[c] for c in sorted(COMMANDS)] + [list(s) for s in SUBCOMMANDS], ids=" ".join
)
def test_every_command_has_its_own_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: finegates {' '.join(argv)} "), out[:200]


def test_console_script_is_the_composed_root() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"finegates": "worker.cli:main"}
    (installed,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "finegates"]
    assert installed.load() is main  # the installed script is the same (re-run setup.sh)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err
