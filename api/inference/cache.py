"""A memory-bounded LRU cache of loaded models with single-flight loading.

Why single flight: loading a model reads hundreds of MB and builds modules; two requests
for a cold model arriving together must share one load instead of doubling memory and
time. Why a byte bound (not a count): a pruned MiniLM and a dense SmolLM2 differ by 20x.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ModelCache(Generic[K, V]):
    """Thread-safe LRU keyed by model key; ``get`` loads on a miss.

    The most recently loaded entry is never evicted by its own insertion, so a single model
    larger than ``max_bytes`` still serves (with a warning) instead of failing every call.
    Evicted values are handed to ``on_evict`` (used to stop their batcher threads); callers
    still holding a reference keep working until they drop it.
    """

    def __init__(
        self,
        loader: Callable[[K], V],
        max_bytes: int,
        size_of: Callable[[V], int],
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        self._loader = loader
        self._size_of = size_of
        self._on_evict = on_evict
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._loading: dict[K, Future[V]] = {}
        self.load_counts: Counter[K] = Counter()  # loads started per key (tests, metrics)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: K) -> V:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._loading[key] = future
                self.load_counts[key] += 1
        assert future is not None
        if not owner:
            return future.result()  # another thread is loading it: wait for that load
        try:
            value = self._loader(key)
            size = int(self._size_of(value))
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            future.set_exception(exc)
            raise
        evicted: list[tuple[K, V]] = []
        with self._lock:
            self._entries[key] = (value, size)
            self._loading.pop(key, None)
            total = sum(s for _, s in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                old_key, (old_value, old_size) = self._entries.popitem(last=False)
                total -= old_size
                evicted.append((old_key, old_value))
            if size > self.max_bytes:
                log.warning(
                    "model %s needs %d bytes, above the cache bound of %d bytes; serving it alone",
                    key,
                    size,
                    self.max_bytes,
                )
        future.set_result(value)
        for old_key, old_value in evicted:
            log.info("evicting model %s from the inference cache", old_key)
            if self._on_evict is not None:
                self._on_evict(old_key, old_value)
        return value

    def clear(self) -> None:
        with self._lock:
            items = list(self._entries.items())
            self._entries.clear()
        if self._on_evict is not None:
            for key, (value, _) in items:
                self._on_evict(key, value)
