"""The inference routes against a running uvicorn, driven by the openai SDK and httpx."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from api.inference import InferenceConfig, InferenceEngine
from api.inference.app import create_inference_app
from api.inference.resolver import DbModelResolver
from tests.support.inference import ServerThread, make_deployment

CAP_TOKENS = 64
CAP_INPUTS = 32


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    return make_deployment(tmp_path_factory.mktemp("inference"), tiny_bert_dir, tiny_llama_dir)


@pytest.fixture(scope="module")
def server(deployment):
    config = InferenceConfig(
        max_batch_size=16,
        max_wait_ms=100.0,  # generous so concurrent test requests surely meet in one batch
        max_inputs_per_request=CAP_INPUTS,
        max_tokens_cap=CAP_TOKENS,
    )
    engine = InferenceEngine(config, DbModelResolver(deployment.settings))
    app = create_inference_app(deployment.settings, engine=engine)
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv


def client_for(server, deployment, tenant="alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=deployment.keys[tenant], max_retries=0)


def post(server, deployment, path, body, tenant="alice"):
    headers = {"Authorization": f"Bearer {deployment.keys[tenant]}"}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


# ---------------------------------------------------------------- direct references


@pytest.fixture(scope="module")
def bert_ref(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)

    def direct(item):
        enc = (
            tok(item, return_tensors="pt")
            if isinstance(item, str)
            else tok(*item, return_tensors="pt")
        )
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0], -1)
        labels = [model.config.id2label[i] for i in range(probs.numel())]
        return dict(zip(labels, probs.tolist(), strict=True))

    return direct


@pytest.fixture(scope="module")
def llama_ref(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def greedy(ids, n):
        """Greedy continuation WITHOUT a KV cache (full recompute each token)."""
        ids = list(ids)
        out = []
        with torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                t = int(torch.argmax(logits))
                if t == tok.eos_token_id:
                    break
                out.append(t)
                ids.append(t)
        return out

    return model, tok, greedy


# ---------------------------------------------------------------- generation


def test_completion_matches_uncached_greedy_and_counts_usage(server, deployment, llama_ref):
    _, tok, greedy = llama_ref
    client = client_for(server, deployment)
    prompt = "the cat sat"
    res = client.completions.create(
        model=deployment.model_ids["lm"], prompt=prompt, max_tokens=12, temperature=0
    )
    ids = tok(prompt)["input_ids"]
    expected = greedy(ids, 12)
    assert res.object == "text_completion"
    assert res.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert res.usage.prompt_tokens == len(ids)
    assert res.usage.completion_tokens == len(expected)
    assert res.usage.total_tokens == len(ids) + len(expected)
    assert res.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")


def test_chat_plain_and_streaming_agree(server, deployment, llama_ref):
    _, tok, greedy = llama_ref
    client = client_for(server, deployment)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    plain = client.chat.completions.create(
        model=deployment.model_ids["lm"], messages=messages, max_tokens=10, temperature=0
    )
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = tok.decode(greedy(ids, 10), skip_special_tokens=True)
    assert plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected
    assert plain.usage.prompt_tokens == len(ids)

    chunks = list(
        client.chat.completions.create(
            model=deployment.model_ids["lm"],
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done_marker(server, deployment):
    with httpx.stream(
        "POST",
        server.base_url + "/completions",
        json={
            "model": deployment.model_ids["lm"],
            "prompt": "abc",
            "max_tokens": 4,
            "stream": True,
        },
        headers={"Authorization": f"Bearer {deployment.keys['alice']}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    objs = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)


def test_seed_reproducible_and_stop_strings(server, deployment):
    client = client_for(server, deployment)
    kw = {"model": deployment.model_ids["lm"], "prompt": "abc", "max_tokens": 20}
    a = client.completions.create(temperature=1.0, top_p=0.9, seed=123, **kw).choices[0].text
    b = client.completions.create(temperature=1.0, top_p=0.9, seed=123, **kw).choices[0].text
    assert a == b
    full = client.completions.create(temperature=0, **kw).choices[0]
    text = full.text
    assert len(text) >= 4, "the tiny model must produce some text for the stop test"
    stop = text[2:4]
    cut = client.completions.create(temperature=0, stop=[stop], **kw).choices[0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"


def test_base_catalog_model_is_served_dense_to_every_tenant(server, deployment):
    for tenant in ("alice", "bob"):
        res = client_for(server, deployment, tenant).completions.create(
            model=deployment.model_ids["base_lm"], prompt="hello", max_tokens=3, temperature=0
        )
        assert res.model == deployment.model_ids["base_lm"]
        assert res.usage.completion_tokens <= 3


def test_models_list_shows_own_and_base_models(server, deployment):
    ids_alice = {m.id for m in client_for(server, deployment, "alice").models.list()}
    ids_bob = {m.id for m in client_for(server, deployment, "bob").models.list()}
    assert {deployment.model_ids["cls"], deployment.model_ids["lm"]} <= ids_alice
    assert "tiny-base-lm" in ids_alice and "tiny-base-lm" in ids_bob
    assert deployment.model_ids["lm"] not in ids_bob


# ---------------------------------------------------------------- classification


def test_classify_equals_direct_model_outputs(server, deployment, bert_ref):
    inputs = ["the movie was good", ["the plot", "was awful"], ["fine"]]
    r = post(
        server, deployment, "/classify", {"model": deployment.model_ids["cls"], "input": inputs}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == 3
    refs = [bert_ref("the movie was good"), bert_ref(("the plot", "was awful")), bert_ref("fine")]
    for row, ref in zip(body["data"], refs, strict=True):
        assert set(row["scores"]) == set(ref)
        for label, p in ref.items():
            assert row["scores"][label] == pytest.approx(p, abs=1e-5)
        best = max(ref, key=ref.get)
        assert row["label"] == best
        assert row["score"] == pytest.approx(ref[best], abs=1e-5)
    assert body["usage"]["prompt_tokens"] > 0
    # a single [a, b] is one pair, not two inputs
    pair = post(
        server,
        deployment,
        "/classify",
        {"model": deployment.model_ids["cls"], "input": ["the plot", "was awful"]},
    )
    assert len(pair.json()["data"]) == 1
    assert pair.json()["data"][0]["scores"]["positive"] == pytest.approx(
        refs[1]["positive"], abs=1e-5
    )


def test_concurrent_distinct_inputs_are_batched_and_answered_separately(
    server, deployment, bert_ref
):
    words = ["good", "bad", "great", "awful", "fine", "boring", "fun", "okay"]
    texts = [f"the {a} movie was {b}" for a in words[:4] for b in words[4:]]  # 16 distinct
    texts = list(dict.fromkeys(texts))
    model_id = deployment.model_ids["cls"]
    post(server, deployment, "/classify", {"model": model_id, "input": "warm up"})
    loaded = server.engine.cache.get(next(iter(server.engine.cache.keys())))
    runner = [
        m for m in (server.engine.cache.get(k) for k in server.engine.cache.keys()) if m.runner
    ][0].runner
    before = len(runner.batch_sizes)
    barrier = threading.Barrier(len(texts))

    def call(text):
        barrier.wait()
        return post(server, deployment, "/classify", {"model": model_id, "input": text})

    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(call, texts))
    assert loaded is not None
    for text, r in zip(texts, responses, strict=True):
        assert r.status_code == 200, r.text
        ref = bert_ref(text)
        got = r.json()["data"][0]["scores"]
        for label, p in ref.items():
            assert got[label] == pytest.approx(p, abs=1e-5), text
    sizes = list(runner.batch_sizes)[before:]
    assert sum(sizes) == len(texts)
    assert max(sizes) > 1, f"no batching happened: {sizes}"


# ---------------------------------------------------------------- errors and limits


def test_too_long_input_is_400_naming_the_limit_unless_truncated(server, deployment):
    long_text = " ".join(["movie"] * 100)  # > 64 tokens, the tiny BERT's limit
    model_id = deployment.model_ids["cls"]
    r = post(server, deployment, "/classify", {"model": model_id, "input": long_text})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "64" in err["message"] and err["code"] == "context_length_exceeded"
    assert err["param"] == "input"
    ok = post(
        server, deployment, "/classify", {"model": model_id, "input": long_text, "truncate": True}
    )
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_unknown_model_wrong_task_and_caps(server, deployment):
    client = client_for(server, deployment)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="ft:nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    # classifier on a generation route, LM on /classify
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=deployment.model_ids["cls"], prompt="x", max_tokens=2)
    assert e.value.param == "model" and "/v1/classify" in e.value.message
    r = post(server, deployment, "/classify", {"model": deployment.model_ids["lm"], "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    # max_tokens cap and context length
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=deployment.model_ids["lm"], prompt="x", max_tokens=CAP_TOKENS + 1
        )
    assert e.value.param == "max_tokens" and str(CAP_TOKENS) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=deployment.model_ids["lm"], prompt="word " * 30, max_tokens=60
        )
    assert e.value.code == "context_length_exceeded" and "128" in e.value.message
    # batch cap
    r = post(
        server,
        deployment,
        "/classify",
        {"model": deployment.model_ids["cls"], "input": ["a"] * (CAP_INPUTS + 1)},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs"
    # bad body
    r = post(
        server,
        deployment,
        "/completions",
        {"model": deployment.model_ids["lm"], "prompt": "x", "temperature": 5},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_tenant_isolation_and_auth(server, deployment):
    bob = client_for(server, deployment, "bob")
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=deployment.model_ids["lm"], prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(
            model=deployment.model_ids["lm"],
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
        )
    r = post(
        server,
        deployment,
        "/classify",
        {"model": deployment.model_ids["cls"], "input": "x"},
        tenant="bob",
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    # the same id answers alice
    r = post(server, deployment, "/classify", {"model": deployment.model_ids["cls"], "input": "x"})
    assert r.status_code == 200
    anon = httpx.post(
        server.base_url + "/classify", json={"model": deployment.model_ids["cls"], "input": "x"}
    )
    assert anon.status_code == 401 and "error" in anon.json()
    bad = openai.OpenAI(
        base_url=server.base_url, api_key="fg-not-a-real-key-000000000000", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=deployment.model_ids["base_lm"], prompt="x", max_tokens=2)


def test_client_disconnect_stops_generation(server, deployment):
    model = server.engine.resolve_and_load(
        deployment.tenant_ids["alice"], deployment.model_ids["lm"]
    )
    backend = model.backend
    original_new_stepper, original_eos = backend.new_stepper, backend.eos_token_ids

    class SlowStepper:
        def __init__(self, inner):
            self.inner = inner

        def prefill(self, ids):
            return self.inner.prefill(ids)

        def step(self, token):
            time.sleep(0.05)
            return self.inner.step(token)

    backend.new_stepper = lambda n: SlowStepper(original_new_stepper(n))
    backend.eos_token_ids = []  # never stop early on its own
    try:
        before = len(server.engine.last_generations)
        with httpx.stream(
            "POST",
            server.base_url + "/completions",
            json={
                "model": deployment.model_ids["lm"],
                "prompt": "go",
                "max_tokens": 60,
                "stream": True,
            },
            headers={"Authorization": f"Bearer {deployment.keys['alice']}"},
            timeout=60,
        ) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 10
        while len(server.engine.last_generations) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        reason, tokens = list(server.engine.last_generations)[-1]
        assert reason == "cancelled"
        assert tokens < 40, f"generation ran on after the disconnect ({tokens} tokens)"
    finally:
        backend.new_stepper = original_new_stepper
        backend.eos_token_ids = original_eos


def test_embedded_api_app_serves_the_same_routes(deployment, bert_ref):
    """The API's create_app (embedded default) mounts the inference router with its auth."""
    from api.app import create_app

    app = create_app(deployment.settings, enqueue=lambda job_id, queue: None)
    with ServerThread(app) as srv:
        r = httpx.post(
            srv.base_url + "/classify",
            json={"model": deployment.model_ids["cls"], "input": "the movie was good"},
            headers={"Authorization": f"Bearer {deployment.keys['alice']}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        ref = bert_ref("the movie was good")
        assert r.json()["data"][0]["scores"]["positive"] == pytest.approx(ref["positive"], abs=1e-5)
        bob = openai.OpenAI(base_url=srv.base_url, api_key=deployment.keys["bob"], max_retries=0)
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model=deployment.model_ids["lm"], prompt="x", max_tokens=2)
        res = bob.completions.create(
            model=deployment.model_ids["base_lm"], prompt="abc", max_tokens=3, temperature=0
        )
        assert res.usage.prompt_tokens > 0
