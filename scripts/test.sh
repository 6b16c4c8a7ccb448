#!/usr/bin/env bash
# The test command (README and .ci/run): set up ./.venv, then run the whole suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh -m e2e -x`.
#
# Tests that need PostgreSQL (127.0.0.1:5432) or Redis (127.0.0.1:6379) skip when those
# are not running, except under CI=true, where they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
