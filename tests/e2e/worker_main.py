"""Start a real FineGates worker process for the end-to-end tests.

The worker is the production one (``finegates worker``); the only test addition is an
optional pause per training step (FINEGATES_E2E_STEP_DELAY seconds), so that a test can
cancel or SIGKILL a job while it is visibly in progress even on a tiny model whose steps
take milliseconds.
"""

from __future__ import annotations

import os
import sys
import time


def _pace_steps(delay: float) -> None:
    from worker import callback

    original = callback.JobCallback.on_step

    def on_step(self, record):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        return original(self, record)

    callback.JobCallback.on_step = on_step  # type: ignore[method-assign]


if __name__ == "__main__":
    delay = float(os.environ.get("FINEGATES_E2E_STEP_DELAY", "0") or 0)
    if delay > 0:
        _pace_steps(delay)
    from worker.cli import main

    sys.exit(main(["worker", "--queues", "gpu,cpu", "--loglevel", "INFO", *sys.argv[1:]]))
