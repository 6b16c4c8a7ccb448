"""Batched decoding: concurrent generation streams of one model share each forward.

Why: one decode step of a small causal LM on CPU is dominated by reading the weights,
so 8 streams decoding one token each in ONE forward cost little more than one stream;
decoded alone, 8 streams cost 8 forwards per token.

How (FineGates decoders, core.pruned.llama): a worker thread per model holds the
active streams. A new stream is prefilled ALONE (batch 1, no padding: the same numbers
as decoding it alone), then its KV cache joins the shared batch cache, right-aligned
(left padding, masked out); positions come from each row's own mask, so RoPE sees the
same positions as alone. Every step runs one forward for all active rows with their
own next token; each row is sampled by its own ``StreamDecoder`` (its sampling
settings, seed, stop strings, EOS and max_tokens). A row that finishes or whose client
went away (cancel flag) is dropped from the batch before the next step; the others
carry on untouched. Left columns no remaining row uses are trimmed when rows leave.

Dense Hugging Face models keep one decoding thread per stream (their cache classes
differ per transformers version); the dense reference in the benchmark is the same
engine at full shapes, as in the compression report.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.pruned.llama import KVCache

from .generation import GenerationChunk, SamplingParams, StreamDecoder

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Stream:
    prompt: list[int]
    decoder: StreamDecoder
    emit: Callable[[GenerationChunk | BaseException | None], None]
    cancelled: Callable[[], bool]
    length: int = 0  # tokens in this row's cache (prompt + generated so far)
    cache_k: list[torch.Tensor] = field(default_factory=list)  # solo prefill cache
    cache_v: list[torch.Tensor] = field(default_factory=list)


class _BatchCache(KVCache):
    """KV buffers of the batch: per layer (B, n_kv, capacity, d), rows right-aligned at a
    shared ``length``; the model's own KVCache (its ``update``) over buffers built here."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int) -> None:
        self.k, self.v, self.length = k, v, length
        self.max_len = k[0].shape[2] if k else 0


class DecodeBatcher:
    """One thread decoding every active stream of one model in shared forwards."""

    def __init__(self, model: Any, max_streams: int = 32, name: str = "decode") -> None:
        self.model = model
        self.max_streams = int(max_streams)
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._active: list[_Stream] = []
        self._cache: _BatchCache | None = None
        self._mask: torch.Tensor | None = None  # (B, length) 1 = real token
        self.step_sizes: list[int] = []  # rows per batched step (tests, metrics)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"finegates-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        decode: Callable[[list[int]], str],
        eos_token_ids: list[int],
        emit: Callable[[GenerationChunk | BaseException | None], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """Queue a stream; ``emit`` gets its chunks, then None (or an exception)."""
        s = _Stream(list(prompt_ids), StreamDecoder(decode, params, eos_token_ids), emit, cancelled)
        with self._lock:
            if self._closed:
                raise RuntimeError("decoder is closed")
            self._inbox.put(s)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_STOP)

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - every waiting stream hears of it
            log.exception("batched decoding failed")
            for s in self._active:
                self._end(s, exc)
            self._active = []
        finally:
            self._drain()

    def _loop(self) -> None:
        while True:
            block = not self._active
            while len(self._active) < self.max_streams:
                try:
                    item = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is _STOP:
                    for s in self._active:
                        self._end(s, RuntimeError("model was unloaded"))
                    self._active = []
                    return
                self._admit(item)
            if self._active:
                self._step()

    def _end(self, s: _Stream, exc: BaseException | None = None) -> None:
        try:
            if exc is not None:
                s.emit(exc)
            s.emit(None)
        except Exception:  # noqa: BLE001 - a listener that went away
            pass

    def _emit(self, s: _Stream, chunks: list[GenerationChunk]) -> None:
        for c in chunks:
            s.emit(c)

    def _admit(self, s: _Stream) -> None:
        """Prefill alone, sample the first token, and join the batch if not finished."""
        if s.decoder.params.max_tokens <= 0:
            self._emit(s, s.decoder.empty())
            self._end(s)
            return
        try:
            cache = KVCache(self.model, 1, len(s.prompt))
            logits = self.model(torch.tensor([s.prompt]), cache=cache, last_only=True)[0, -1]
        except Exception as exc:  # noqa: BLE001 - this stream fails, the batch goes on
            self._end(s, exc)
            return
        if s.cancelled():
            self._emit(s, s.decoder.cancel())
            self._end(s)
            return
        self._emit(s, s.decoder.feed(logits))
        if s.decoder.done:
            self._end(s)
            return
        s.length = len(s.prompt)
        s.cache_k, s.cache_v = cache.k, cache.v
        self._rebuild(joining=(s,))

    def _rebuild(self, joining: tuple[_Stream, ...] = ()) -> None:
        """A new batch cache for the active rows (+ ``joining``), right-aligned, with room
        for every row's remaining tokens; trims columns no row uses."""
        old = self._active
        rows = old + list(joining)
        if not rows:
            self._cache, self._mask, self._active = None, None, []
            return
        L = max(s.length for s in rows)
        room = max(s.decoder.params.max_tokens - len(s.decoder.generated) for s in rows) + 1
        cap = L + room
        B = len(rows)
        cur = self._cache
        ks, vs = [], []
        for i in range(len(cur.k) if cur is not None else len(rows[0].cache_k)):
            proto_k = cur.k[i] if cur is not None else rows[0].cache_k[i]
            proto_v = cur.v[i] if cur is not None else rows[0].cache_v[i]
            k = proto_k.new_zeros(B, proto_k.shape[1], cap, proto_k.shape[3])
            v = proto_v.new_zeros(B, proto_v.shape[1], cap, proto_v.shape[3])
            for r, s in enumerate(rows):
                if r < len(old):
                    assert cur is not None
                    src_k = cur.k[i][r, :, cur.length - s.length : cur.length]
                    src_v = cur.v[i][r, :, cur.length - s.length : cur.length]
                else:
                    src_k = s.cache_k[i][0, :, : s.length]
                    src_v = s.cache_v[i][0, :, : s.length]
                k[r, :, L - s.length : L] = src_k
                v[r, :, L - s.length : L] = src_v
            ks.append(k)
            vs.append(v)
        for s in joining:
            s.cache_k, s.cache_v = [], []  # now held by the batch cache
        mask = torch.zeros(B, L, dtype=torch.long)
        for r, s in enumerate(rows):
            mask[r, L - s.length :] = 1
        self._cache = _BatchCache(ks, vs, L)
        self._mask = mask
        self._active = rows

    def _step(self) -> None:
        """One forward for every active row; sample each; drop finished/cancelled rows."""
        assert self._cache is not None and self._mask is not None
        rows = self._active
        tokens = torch.tensor([[s.decoder.next_token] for s in rows])  # (B, 1)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        if self._cache.length + 1 > self._cache.max_len:
            self._rebuild()
            assert self._cache is not None and self._mask is not None
            mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        self.step_sizes.append(len(rows))
        logits = self.model(tokens, mask, self._cache)[:, -1]  # (B, vocab)
        self._mask = mask
        keep: list[int] = []
        for r, s in enumerate(rows):
            s.length += 1
            if s.cancelled():
                self._emit(s, s.decoder.cancel())
            else:
                self._emit(s, s.decoder.feed(logits[r]))
            if s.decoder.done:
                self._end(s)
            else:
                keep.append(r)
        if len(keep) < len(rows):
            self._shrink(keep)

    def _shrink(self, keep: list[int]) -> None:
        """Drop finished rows (index select) and the left columns nobody needs now."""
        assert self._cache is not None and self._mask is not None
        if not keep:
            self._cache, self._mask, self._active = None, None, []
            return
        self._active = [self._active[r] for r in keep]
        idx = torch.tensor(keep)
        L = self._cache.length
        start = L - max(s.length for s in self._active)
        ks = [k.index_select(0, idx)[:, :, start:].contiguous() for k in self._cache.k]
        vs = [v.index_select(0, idx)[:, :, start:].contiguous() for v in self._cache.v]
        self._cache = _BatchCache(ks, vs, L - start)
        self._mask = self._mask.index_select(0, idx)[:, start:]

    def _drain(self) -> None:
        with self._lock:
            self._closed = True
            while True:
                try:
                    left = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if left is not _STOP:
                    self._end(left, RuntimeError("model was unloaded; retry the request"))
