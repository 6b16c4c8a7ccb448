"""The README's walk-throughs, as a user pastes them, against a fresh `finegates serve`.

The shell blocks are taken from README.md itself and run with bash in a scratch folder
that has the checkout's `.venv`, so a change that breaks the README breaks this test. The
only edits are the "small setting": the port and key file of this server, a tiny BERT
registered in place of MiniLM, a few steps instead of 150 and short polling sleeps. Each
edit must match the README's text, so a README that drifts from them fails here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_serve import Serve
from tests.support.e2e import ROOT, TINY_MODEL_ID, free_port

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt != -1 else None]


def _bash_blocks(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def _small(block: str, port: int, key_file: Path) -> str:
    edits = [
        ("http://127.0.0.1:8000", f"http://127.0.0.1:{port}"),
        (".data/local-api-key.txt", str(key_file)),
        ('"model": "minilm-l6"', f'"model": "{TINY_MODEL_ID}"'),
        ('model="minilm-l6"', f'model="{TINY_MODEL_ID}"'),
        ('startswith("ft:minilm-l6")', f'startswith("ft:{TINY_MODEL_ID}")'),
        ('"max_steps": 150', '"max_steps": 4'),
        ("sleep 15", "sleep 1"),
        ("time.sleep(15)", "time.sleep(1)"),
    ]
    out = block
    for old, new in edits:
        out = out.replace(old, new)
    return out


def _run(script: str, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"exit {p.returncode}\n--- script\n{script}\n--- output\n{out}"
    return out


def test_the_readme_walk_throughs_work_as_written(tmp_path: Path) -> None:
    from core.catalog import register_model
    from tests.support.tiny_models import save_tiny_bert

    text = README.read_text(encoding="utf-8")
    curl = _bash_blocks(_section(text, "Walk-through with curl"))
    sdk = _bash_blocks(_section(text, "Walk-through with the `openai` SDK"))
    calling = _bash_blocks(_section(text, "Calling the model"))
    assert len(curl) == 3 and len(sdk) == 1 and len(calling) == 2, "README layout changed"
    for needle in ('"model": "minilm-l6"', '"max_steps": 150', "sleep 15"):
        assert needle in curl[0], f"the curl walk-through no longer has {needle}"
    assert 'model="minilm-l6"' in sdk[0] and "time.sleep(15)" in sdk[0]

    data = tmp_path / "data"
    data.mkdir()
    register_model(TINY_MODEL_ID, save_tiny_bert(tmp_path / "tiny"), data)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    port = free_port()
    key = data / "local-api-key.txt"
    srv = Serve(data, port)
    try:
        srv.wait_ready()
        # the main block, then the artifact load (it reads step 6's download)
        out = _run(_small(curl[0], port, key), work)
        assert re.search(r"^succeeded ft:", out, re.M), out
        assert "target reached:" in out and "evaluation:" in out
        assert re.search(r"^Removed \d+\.\d% of the gated weights", out, re.M), out
        assert (work / "artifact" / "model.safetensors").is_file()
        assert not (work / "artifact" / "model.onnx").exists()  # not in the default tar
        loaded = _run(_small(curl[2], port, key), work)
        assert re.search(r"\['(positive|negative)', '(positive|negative)'\]", loaded), loaded

        # the SDK walk-through: same settings, its own job
        out = _run(_small(sdk[0], port, key), work)
        assert re.search(r"^succeeded ft:", out, re.M) and "target reached:" in out, out
        assert ":ckpt-step-" in out, out

        # calling the model: classify with the fine-tuned model (curl; $MODEL and fg()
        # come from the walk-through's first block, as in the user's shell)
        setup = _small(curl[0].split("# 1.")[0], port, key)
        model = re.findall(r"^succeeded (ft:\S+)", out, re.M)[-1]
        classify = calling[0].split("fg $FG/chat")[0]  # chat needs smollm2: a slow test's job
        out = _run(setup + f"MODEL={model}\n" + classify, work)
        assert '"object":"classification"' in out.replace(" ", ""), out
    finally:
        if srv.proc.poll() is None:
            srv.interrupt()
