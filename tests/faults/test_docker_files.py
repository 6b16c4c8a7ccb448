"""What can be checked of the image and the compose file without a Docker daemon: the
compose file parses, every command a FineGates service runs is a real `finegates`
command line (parsed by the image's entry point), healthchecks name commands their image
has, and the Dockerfile's inputs exist. With `docker compose` available, `config` runs too.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.support.e2e import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV = {"POSTGRES_PASSWORD": "x" * 24, "FINEGATES_SECRET_KEY": "y" * 48}
# what each image ships: the healthcheck's executable must be one of these
IMAGE_COMMANDS = {
    "postgres": {"pg_isready"},
    "redis": {"redis-cli"},
    "finegates": {"python", "finegates"},
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _expand(arg: str) -> str:
    # ${VAR:-default} -> default (what compose does when VAR is unset)
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg)


def _image_kind(service: dict) -> str:
    image = str(service.get("image", ""))
    for kind in IMAGE_COMMANDS:
        if image.startswith(kind):
            return kind
    raise AssertionError(f"unknown image {image!r}")


def test_compose_parses_and_every_finegates_command_is_real() -> None:
    from worker.cli import build_parser

    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    ours = {n: s for n, s in services.items() if _image_kind(s) == "finegates"}
    assert set(ours) >= {"migrate", "api", "worker", "worker-gpu", "inference"}
    for name, svc in ours.items():
        argv = [_expand(a) for a in svc["command"]]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse refused the command line
            raise AssertionError(
                f"service {name}: `finegates {' '.join(argv)}` is invalid"
            ) from exc
        assert callable(args.func), name
        env = svc["environment"]
        assert env["FINEGATES_MODE"] == "production" and env["FINEGATES_DATA_DIR"] == "/data"
        if name != "migrate":
            assert svc.get("restart") == "unless-stopped", name  # a hung worker exits (75)
    assert build_parser().parse_args([_expand(a) for a in ours["api"]["command"]]).workers >= 2


def test_healthchecks_name_commands_their_image_has() -> None:
    services = _compose()["services"]
    checked = 0
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if hc is None:
            continue
        test = hc["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        exe = test[1].split()[0] if test[0] == "CMD-SHELL" else test[1]
        assert exe in IMAGE_COMMANDS[_image_kind(svc)], (name, exe)
        checked += 1
    assert checked >= 3  # postgres, redis, api
    # what the api's healthcheck requests exists
    api_test = " ".join(services["api"]["healthcheck"]["test"])
    assert "/health" in api_test
    from api.app import create_app  # noqa: F401  (the route is defined there)

    assert '"/health"' in (ROOT / "api" / "app.py").read_text()


def test_dockerfile_inputs_and_entry_point_exist() -> None:
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"
    assert 'ENTRYPOINT ["finegates"]' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'finegates = "worker.cli:main"' in pyproject  # the entry point pip installs
    pin = re.search(r'"torch==([0-9.]+)"', pyproject)
    assert pin and f'"torch=={pin.group(1)}"' in text  # the image installs the same torch
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M)  # not root
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    assert cmd
    from worker.cli import build_parser

    build_parser().parse_args(yaml.safe_load(cmd.group(1)))


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("docker compose is not installed here (the checks above ran without it)")
    r = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True, text=True, env={**ENV, "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
