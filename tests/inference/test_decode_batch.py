"""Batched decoding: each stream gets exactly the tokens it gets alone (greedy), shares
forwards with the others, and a stream that stops or is cancelled leaves the rest as
they were."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from api.inference.backends import FineGatesStepper
from api.inference.decode_batch import DecodeBatcher
from api.inference.generation import GenerationChunk, SamplingParams, generate_stream


@pytest.fixture(scope="module")
def pruned_lm():
    from core.prune import prune_model
    from tests.support.prune_fixtures import apply_pattern
    from tests.support.tiny_models import build_tiny_llama

    model = apply_pattern(build_tiny_llama(seed=5), "heads", seed=5)
    return prune_model(model)[0].eval()


def _decode(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


def _alone(model, prompt, params, eos=()):
    chunks = list(
        generate_stream(FineGatesStepper(model, len(prompt) + params.max_tokens), prompt,
                        _decode, params, eos)
    )  # fmt: skip
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


class _Sink:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.cancel = threading.Event()

    def emit(self, item):
        self.q.put(item)

    def collect(self, timeout=60):
        chunks: list[GenerationChunk] = []
        while True:
            item = self.q.get(timeout=timeout)
            if item is None:
                return chunks
            if isinstance(item, BaseException):
                raise item
            chunks.append(item)


def _tokens(chunks):
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


def test_each_stream_gets_its_solo_tokens(pruned_lm):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 100, (n,), generator=gen).tolist() for n in (3, 9, 5, 14, 1, 7)]
    maxes = [12, 5, 20, 8, 16, 1]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in maxes]
    # a seeded sampled stream too: same seed, same tokens, alone or batched
    prompts.append([7, 8, 9, 10])
    params.append(SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=42))
    expected = [_alone(pruned_lm, p, sp) for p, sp in zip(prompts, params, strict=True)]
    dec = DecodeBatcher(pruned_lm)
    try:
        sinks = []
        for p, sp in zip(prompts, params, strict=True):
            s = _Sink()
            dec.submit(p, sp, _decode, [], s.emit, s.cancel.is_set)
            sinks.append(s)
        got = [_tokens(s.collect()) for s in sinks]
    finally:
        dec.close()
    assert got == expected
    assert max(dec.step_sizes) > 1  # streams really shared forwards


def test_eos_stop_and_cancel_leave_the_others_untouched(pruned_lm):
    prompt = [11, 12, 13, 14, 15]
    long = SamplingParams(max_tokens=24, temperature=0.0)
    solo, _ = _alone(pruned_lm, prompt, long)
    eos = solo[3]  # a token the greedy stream emits: the EOS stream stops there
    expected_eos = _alone(pruned_lm, prompt, long, eos=[eos])
    dec = DecodeBatcher(pruned_lm)
    try:
        a, b, c = _Sink(), _Sink(), _Sink()
        c.cancel.set()  # client gone before its first batched step
        dec.submit(prompt, long, _decode, [], a.emit, a.cancel.is_set)
        dec.submit(prompt, long, _decode, [eos], b.emit, b.cancel.is_set)
        dec.submit([20, 21], long, _decode, [], c.emit, c.cancel.is_set)
        got_a, got_b, got_c = _tokens(a.collect()), _tokens(b.collect()), c.collect()
    finally:
        dec.close()
    assert got_a == (solo, "length")
    assert got_b == expected_eos and got_b[1] == "stop"
    assert got_c[-1].finish_reason == "cancelled"


def test_a_closed_decoder_fails_waiting_streams_instead_of_hanging(pruned_lm):
    dec = DecodeBatcher(pruned_lm)
    dec.close()
    dec._thread.join(10)
    with pytest.raises(RuntimeError):
        dec.submit([1, 2], SamplingParams(max_tokens=3), _decode, [], lambda x: None, lambda: False)


def test_a_stream_joining_mid_flight_matches_solo(pruned_lm):
    pa, pb = [30, 31, 32], list(range(40, 52))  # the joiner's prompt is longer
    sp = SamplingParams(max_tokens=30, temperature=0.0)
    exp_a, exp_b = _alone(pruned_lm, pa, sp), _alone(pruned_lm, pb, sp)
    dec = DecodeBatcher(pruned_lm)
    try:
        a, b = _Sink(), _Sink()
        dec.submit(pa, sp, _decode, [], a.emit, a.cancel.is_set)
        first = [a.q.get(timeout=30) for _ in range(3)]  # a is decoding by now
        dec.submit(pb, sp, _decode, [], b.emit, b.cancel.is_set)
        got_a = _tokens(first + a.collect())
        got_b = _tokens(b.collect())
    finally:
        dec.close()
    assert got_a == exp_a and got_b == exp_b
    assert 1 in dec.step_sizes and 2 in dec.step_sizes
