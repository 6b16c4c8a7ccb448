"""The production worker (``finegates worker``) with the faults a test asks for.

- FINEGATES_E2E_STEP_DELAY: seconds per training step (tests/e2e/worker_main.py)
- FINEGATES_FAULT_HANG_AT_STEP: the training thread hangs forever at this step
- FINEGATES_FAULT_PACKAGE_DELAY: packaging pauses this long after pruning (so a test
  can SIGKILL the worker in the middle of packaging)
"""

from __future__ import annotations

import os
import sys
import time


def _hang_at(step: int) -> None:
    from worker import callback

    original = callback.JobCallback.on_step

    def on_step(self, record):  # type: ignore[no-untyped-def]
        if record.step == step:
            while True:  # a wedged thread: no callback, no exception, ever
                time.sleep(3600)
        return original(self, record)

    callback.JobCallback.on_step = on_step  # type: ignore[method-assign]


def _slow_packaging(delay: float) -> None:
    import core.package

    original = core.package.build_artifact

    def build_artifact(*args, on_event=None, **kwargs):  # type: ignore[no-untyped-def]
        def event(e):  # type: ignore[no-untyped-def]
            if on_event is not None:
                on_event(e)
            if e.phase == "prune" and e.level == "info":
                time.sleep(delay)

        return original(*args, on_event=event, **kwargs)

    core.package.build_artifact = build_artifact  # type: ignore[assignment]


if __name__ == "__main__":
    from tests.e2e.worker_main import _pace_steps

    delay = float(os.environ.get("FINEGATES_E2E_STEP_DELAY", "0") or 0)
    if delay > 0:
        _pace_steps(delay)
    hang = int(os.environ.get("FINEGATES_FAULT_HANG_AT_STEP", "0") or 0)
    if hang > 0:
        _hang_at(hang)
    pkg = float(os.environ.get("FINEGATES_FAULT_PACKAGE_DELAY", "0") or 0)
    if pkg > 0:
        _slow_packaging(pkg)
    from worker.cli import main

    sys.exit(main(["worker", "--queues", "gpu,cpu", "--loglevel", "INFO", *sys.argv[1:]]))
