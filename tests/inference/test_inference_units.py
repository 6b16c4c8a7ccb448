"""Unit tests for the inference pieces: cache, batcher, sampling, streaming, backends."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from api.inference.backends import ModelSpec, load_dense, prefer_onnx
from api.inference.batcher import DirectRunner, MicroBatcher
from api.inference.cache import ModelCache
from api.inference.generation import SamplingParams, generate_stream, sample_next

# ---------------------------------------------------------------- cache


def test_cache_single_flight_loads_once_under_concurrency():
    calls = []
    started = threading.Event()

    def loader(key):
        calls.append(key)
        started.set()
        time.sleep(0.2)  # slow load: the other threads must wait for it, not start their own
        return {"key": key}

    cache = ModelCache(loader, max_bytes=10**9, size_of=lambda v: 1)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get("m"), range(8)))
    assert calls == ["m"]
    assert all(r is results[0] for r in results)
    assert cache.load_counts["m"] == 1


def test_cache_failed_load_is_retried_and_raised_to_waiters():
    attempts = []

    def loader(key):
        attempts.append(key)
        if len(attempts) == 1:
            time.sleep(0.1)
            raise RuntimeError("disk hiccup")
        return key

    cache = ModelCache(loader, max_bytes=10, size_of=lambda v: 1)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cache.get, "a") for _ in range(3)]
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert cache.get("a") == "a"  # not cached as a failure
    assert attempts == ["a", "a"]


def test_cache_evicts_least_recently_used_by_bytes():
    evicted = []
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500}
    cache = ModelCache(
        lambda k: k,
        max_bytes=100,
        size_of=lambda v: sizes[v],
        on_evict=lambda k, v: evicted.append(k),
    )
    cache.get("a")
    cache.get("b")
    cache.get("a")  # a is now most recent
    cache.get("c")  # 120 > 100: evict the LRU, which is b
    assert evicted == ["b"]
    assert set(cache.keys()) == {"a", "c"}
    assert cache.total_bytes == 80
    cache.get("huge")  # larger than the bound alone: everything else goes, it still serves
    assert cache.keys() == ["huge"]
    assert evicted == ["b", "a", "c"]


# ---------------------------------------------------------------- batcher


def test_batcher_groups_concurrent_items_and_returns_each_its_own():
    seen_batches = []

    def fn(items):
        seen_batches.append(list(items))
        return [x * 10 for x in items]

    batcher = MicroBatcher(fn, max_batch_size=4, max_wait_ms=200)
    try:
        futures = [batcher.submit(i) for i in range(10)]
        results = [f.result(timeout=5) for f in futures]
    finally:
        batcher.close()
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in seen_batches] == [4, 4, 2]
    assert list(batcher.batch_sizes) == [4, 4, 2]


def test_batcher_error_fails_only_that_batch():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    batcher = MicroBatcher(fn, max_batch_size=8, max_wait_ms=50)
    try:
        bad = [batcher.submit("bad"), batcher.submit("x")]
        for f in bad:
            with pytest.raises(ValueError):
                f.result(timeout=5)
        assert batcher.submit("ok").result(timeout=5) == "ok"
    finally:
        batcher.close()


def test_batcher_rejects_bad_settings():
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, max_batch_size=0)


def test_direct_runner_runs_one_item_per_call():
    import asyncio

    runner = DirectRunner(lambda items: [i + 1 for i in items], max_workers=2)
    try:
        assert asyncio.run(runner.run([1, 2, 3])) == [2, 3, 4]
        assert list(runner.batch_sizes) == [1, 1, 1]
    finally:
        runner.close()


# ---------------------------------------------------------------- sampling and streaming


def test_sample_next_greedy_top_p_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(temperature=0), gen) == 1
    # top_p tiny keeps only the most likely token, whatever the seed
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g) == 1
    # top_p 0.9 here keeps tokens 1 and 2 only (0.51 + 0.46 > 0.9)
    picks = {
        sample_next(
            logits, SamplingParams(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s)
        )
        for s in range(200)
    }
    assert picks == {1, 2}
    a = [
        sample_next(logits, SamplingParams(temperature=1.5), torch.Generator().manual_seed(7))
        for _ in range(5)
    ]
    assert len(set(a)) == 1


class ScriptStepper:
    """Emits a fixed token script via one-hot logits; counts steps."""

    def __init__(self, script, vocab=50):
        self.script = list(script)
        self.vocab = vocab
        self.pos = 0
        self.steps = 0

    def _logits(self):
        v = torch.full((self.vocab,), -10.0)
        v[self.script[min(self.pos, len(self.script) - 1)]] = 10.0
        return v

    def prefill(self, ids):
        self.pos = 0
        return self._logits()

    def step(self, token):
        self.steps += 1
        self.pos += 1
        return self._logits()


def _decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_stream_holds_back_possible_stop_prefix_and_cuts_at_stop():
    # tokens spell "abcdefg"; stop "de" -> output "abc", finish "stop"; "d" never leaks out
    stepper = ScriptStepper([0, 1, 2, 3, 4, 5, 6])
    chunks = list(
        generate_stream(
            stepper, [9], _decode, SamplingParams(max_tokens=10, temperature=0, stop=["de"])
        )
    )
    assert "".join(c.text for c in chunks) == "abc"
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert not any("d" in c.text for c in chunks)


def test_stream_length_eos_and_cancel():
    chunks = list(
        generate_stream(
            ScriptStepper([0, 1, 2, 3]), [9], _decode, SamplingParams(max_tokens=3, temperature=0)
        )
    )
    assert "".join(c.text for c in chunks) == "abc" and chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3
    chunks = list(
        generate_stream(
            ScriptStepper([0, 1, 7]),
            [9],
            _decode,
            SamplingParams(max_tokens=10, temperature=0),
            eos_token_ids=[7],
        )
    )
    assert "".join(c.text for c in chunks) == "ab" and chunks[-1].finish_reason == "stop"
    flag = {"n": 0}

    def cancelled():
        flag["n"] += 1
        return flag["n"] > 2

    stepper = ScriptStepper(list(range(40)))
    chunks = list(
        generate_stream(
            stepper, [9], _decode, SamplingParams(max_tokens=40, temperature=0), cancelled=cancelled
        )
    )
    assert chunks[-1].finish_reason == "cancelled"
    assert stepper.steps <= 2  # stopped at the next token, not after 40


# ---------------------------------------------------------------- backends


def test_kv_cached_decoding_equals_full_recompute(tiny_llama_dir):
    backend = load_dense(tiny_llama_dir)
    model = backend.model
    ids = backend.encode_prompt("abc")
    stepper = backend.new_stepper(64)
    cached = [stepper.prefill(ids)]
    seq = list(ids)
    for _ in range(6):
        t = int(torch.argmax(cached[-1]))
        seq.append(t)
        cached.append(stepper.step(t))
    with torch.no_grad():
        full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    for i, logits in enumerate(cached):
        torch.testing.assert_close(logits, full[len(ids) - 1 + i], atol=1e-4, rtol=1e-4)


def test_dense_classifier_backend_padding_does_not_change_scores(tiny_bert_dir):
    backend = load_dense(tiny_bert_dir)
    assert backend.max_length == 64 and backend.labels == ["negative", "neutral", "positive"]
    short, long_ = backend.encode(["fine", "the movie was very very good and the plot was fun"])
    alone = backend.predict([short])[0]
    together = backend.predict([short, long_])[0]
    for label in backend.labels:
        assert together["scores"][label] == pytest.approx(alone["scores"][label], abs=1e-5)


def test_prefer_onnx_reads_the_compression_report(tmp_path):
    from tests.support.artifacts import fake_artifact_dir, write_report

    assert prefer_onnx(tmp_path) is False  # no manifest, no model.onnx
    assert prefer_onnx(fake_artifact_dir(tmp_path / "plain", with_onnx=False)) is False
    fake_artifact_dir(tmp_path)
    rows = [
        {
            "backend": "torch",
            "batch": 1,
            "seq_len": 64,
            "dense_ms": 2,
            "pruned_ms": 1.0,
            "ratio": 0.5,
        },
        {
            "backend": "onnxruntime",
            "batch": 1,
            "seq_len": 64,
            "dense_ms": 2,
            "pruned_ms": 2.0,
            "ratio": 1,
        },
        {
            "backend": "torch",
            "batch": 32,
            "seq_len": 128,
            "dense_ms": 9,
            "pruned_ms": 6.0,
            "ratio": 0.6,
        },
        {
            "backend": "onnxruntime",
            "batch": 32,
            "seq_len": 128,
            "dense_ms": 8,
            "pruned_ms": 4.0,
            "ratio": 0.5,
        },
    ]
    write_report(tmp_path, rows)
    assert prefer_onnx(tmp_path) is True  # wins at the largest batch
    rows[3]["pruned_ms"] = 7.0
    write_report(tmp_path, rows)
    assert prefer_onnx(tmp_path) is False


def test_model_spec_cache_key_is_path_based(tmp_path):
    a = ModelSpec("x", tmp_path, "artifact", owner="t1")
    b = ModelSpec("y", tmp_path / ".", "artifact", owner="t1")
    assert a.cache_key == b.cache_key


def test_length_buckets_cut_padding_and_keep_every_index():
    from api.inference.backends import length_buckets

    lengths = [5] * 10 + [60] * 10 + [6, 7, 61, 200]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    # 7 would pad the short bucket past 1.25x, so it starts the next one (which the
    # 60s then join, as it has fewer than MIN_BUCKET rows); 200 would pad the 60s 3x
    assert [sorted(lengths[i] for i in b) for b in buckets] == [
        [5] * 10 + [6],
        [7] + [60] * 10 + [61],
        [200],
    ]
    assert length_buckets([3, 90, 4]) == [[0, 2, 1]]  # fewer than MIN_BUCKET rows: one call
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    assert padded < len(lengths) * max(lengths) / 3  # far less than one padded batch
    assert length_buckets([]) == [] and length_buckets([9]) == [[0]]
