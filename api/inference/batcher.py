"""Dynamic micro-batching for classification requests.

Why: one encoder forward on 32 inputs costs far less than 32 forwards on one input, but
HTTP callers arrive one at a time. A worker thread per model collects whatever arrives
within ``max_wait_ms`` (up to ``max_batch_size`` items), runs ONE model call, and hands
each caller its own row. The model runs in that thread, so the event loop stays free to
accept more requests while a batch computes (which is what lets the next batch fill up).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class BatcherClosed(RuntimeError):
    """The batcher was closed (its model was evicted): get the model again and retry."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]


class MicroBatcher(Generic[T, R]):
    """Groups single items submitted from any thread or event loop into batch calls.

    ``fn(items) -> results`` must return one result per item, in order. An exception in
    ``fn`` fails every caller of that batch (and only that batch).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self.batch_sizes: deque[int] = deque(maxlen=100_000)  # observed sizes, newest last
        self._closed = False
        # submit's closed-check + put and close's flag + _STOP are atomic under this lock,
        # so every item is queued before _STOP (and served) or refused: none is stranded.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"finegates-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._queue.put(_Pending(item, future))
        return future

    async def run(self, items: Sequence[T]) -> list[R]:
        """Submit every item separately (so they can share batches with other callers)."""
        futures = [asyncio.wrap_future(self.submit(item)) for item in items]
        return list(await asyncio.gather(*futures))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)

    def _collect(self, first: _Pending[T, R]) -> tuple[list[_Pending[T, R]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        stop = False
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                nxt = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._drain()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                self.batch_sizes.append(len(live))
                try:
                    results = list(self._fn([p.item for p in live]))
                    if len(results) != len(live):
                        raise RuntimeError(
                            f"batch function returned {len(results)} results for {len(live)} items"
                        )
                except BaseException as exc:  # noqa: BLE001 - forwarded to each caller
                    for p in live:
                        p.future.set_exception(exc)
                else:
                    for p, r in zip(live, results, strict=True):
                        p.future.set_result(r)
            if stop:
                break

    def _drain(self) -> None:
        """Fail whatever is still queued so no caller waits forever (closed first, under
        the lock, so nothing can be queued after the drain)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if left is not _STOP and left.future.set_running_or_notify_cancel():
                    left.future.set_exception(
                        BatcherClosed("model was unloaded; retry the request")
                    )


class DirectRunner(Generic[T, R]):
    """Batching off: each request's items run as their own model call in a thread pool.

    Same interface as MicroBatcher so the route code and the benchmark can switch by a
    setting; ``batch_sizes`` records per-call sizes for the same statistics.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_workers: int = 8) -> None:
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="finegates-cls")
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        self._closed = False

    def _call(self, items: list[T]) -> list[R]:
        self.batch_sizes.append(len(items))
        return list(self._fn(items))

    async def run(self, items: Sequence[T]) -> list[R]:
        loop = asyncio.get_running_loop()
        try:
            futures = [loop.run_in_executor(self._pool, self._call, [item]) for item in items]
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            if self._closed:
                raise BatcherClosed("runner is closed") from exc
            raise
        return [r[0] for r in await asyncio.gather(*futures)]

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
