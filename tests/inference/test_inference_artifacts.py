"""Pruned FineGates artifacts served through the routes (core.prune + core.artifacts)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from api.inference import InferenceConfig, InferenceEngine
from api.inference.app import create_inference_app
from api.inference.resolver import DbModelResolver
from tests.support.inference import ServerThread, make_deployment


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from core.artifacts import save_artifact
    from core.prune import prune_model
    from tests.support.prune_fixtures import apply_pattern
    from tests.support.tiny_models import (
        BERT_LABELS,
        build_bert_tokenizer,
        build_llama_tokenizer,
        build_tiny_bert_cls,
        build_tiny_llama,
    )

    root = tmp_path_factory.mktemp("artifacts")
    bert = apply_pattern(build_tiny_bert_cls(seed=3), "heads", seed=3)
    pruned_bert, plan_b = prune_model(bert)
    bert_dir = root / "cls"
    save_artifact(
        pruned_bert,
        build_bert_tokenizer(root / "tok"),
        bert_dir,
        plan=plan_b,
        task="classification",
        labels=BERT_LABELS,
        base_model="tiny-bert",
    )
    llama = apply_pattern(build_tiny_llama(seed=4), "heads", seed=4)
    pruned_llama, plan_l = prune_model(llama)
    llama_dir = root / "lm"
    save_artifact(
        pruned_llama,
        build_llama_tokenizer(),
        llama_dir,
        plan=plan_l,
        task="causal_lm",
        base_model="tiny-llama",
    )
    return bert_dir, llama_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory, artifacts):
    bert_dir, llama_dir = artifacts
    dep = make_deployment(tmp_path_factory.mktemp("dep"), bert_dir, llama_dir)
    engine = InferenceEngine(InferenceConfig(max_wait_ms=50), DbModelResolver(dep.settings))
    with ServerThread(create_inference_app(dep.settings, engine=engine)) as srv:
        yield srv, dep, engine


def test_pruned_classifier_matches_direct_artifact_outputs(served, artifacts):
    from core.artifacts import load_artifact

    srv, dep, engine = served
    art = load_artifact(artifacts[0])
    texts = ["the movie was good", "awful plot"]
    r = httpx.post(
        srv.base_url + "/classify",
        json={"model": dep.model_ids["cls"], "input": [[t] for t in texts]},  # a batch, not a pair
        headers={"Authorization": f"Bearer {dep.keys['alice']}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    loaded = engine.resolve_and_load(dep.tenant_ids["alice"], dep.model_ids["cls"])
    assert loaded.backend.backend == "torch"  # no model.onnx / report: PyTorch
    for text, row in zip(texts, r.json()["data"], strict=True):
        enc = art.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(art.model(**enc), -1)[0]
        names = [art.manifest["id2label"][str(i)] for i in range(probs.numel())]
        for name, p in zip(names, probs.tolist(), strict=True):
            assert row["scores"][name] == pytest.approx(p, abs=1e-5)


def test_pruned_decoder_generates_like_its_own_generate(served, artifacts):
    from core.artifacts import load_artifact

    srv, dep, _ = served
    art = load_artifact(artifacts[1])
    client = openai.OpenAI(base_url=srv.base_url, api_key=dep.keys["alice"], max_retries=0)
    prompt = "abc"
    res = client.completions.create(
        model=dep.model_ids["lm"], prompt=prompt, max_tokens=10, temperature=0
    )
    ids = art.tokenizer(prompt)["input_ids"]
    out = art.model.generate(torch.tensor([ids]), max_new_tokens=10, temperature=0.0)
    new = out[0, len(ids) :].tolist()
    eos = set(art.model.config.eos_token_id or [art.tokenizer.eos_token_id])
    if any(t in eos for t in new):
        new = new[: next(i for i, t in enumerate(new) if t in eos)]
    assert res.choices[0].text == art.tokenizer.decode(new, skip_special_tokens=True)
    assert res.usage.completion_tokens == len(new)
    streamed = client.completions.create(
        model=dep.model_ids["lm"], prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == res.choices[0].text


ONNX_FASTER = [
    {"backend": "torch", "batch": 32, "seq_len": 128, "dense_ms": 9, "pruned_ms": 6.0},
    {"backend": "onnxruntime", "batch": 32, "seq_len": 128, "dense_ms": 8, "pruned_ms": 4.0},
]


def test_onnx_backend_chosen_from_report_and_matches_torch(artifacts, tmp_path):
    import shutil

    from api.inference.backends import ModelSpec, load_backend
    from core.package import rebuild_artifact
    from tests.support.artifacts import write_report

    art = tmp_path / "cls"
    shutil.copytree(artifacts[0], art)
    rebuild_artifact(art, onnx=True)
    write_report(art, ONNX_FASTER)
    spec = ModelSpec("m", art, "artifact")
    ort_backend = load_backend(spec)
    torch_backend = load_backend(spec, classifier_backend="torch")
    assert ort_backend.backend == "onnxruntime" and torch_backend.backend == "torch"
    batch = ort_backend.encode(["the movie was good", ("the plot", "was awful"), "fine"])
    for a, b in zip(ort_backend.predict(batch), torch_backend.predict(batch), strict=True):
        assert a["label"] == b["label"]
        for k in a["scores"]:
            assert a["scores"][k] == pytest.approx(b["scores"][k], abs=1e-4)


def test_report_the_manifest_does_not_vouch_for_is_not_trusted(artifacts, tmp_path):
    """The backend comes only from a report.json the manifest hashes: an unlisted one is
    ignored, and a listed one that was altered gets the whole artifact refused."""
    import json
    import shutil

    from api.inference.backends import ModelSpec, load_backend, prefer_onnx
    from core.errors import ArtifactError
    from core.package import rebuild_artifact
    from tests.support.artifacts import write_report

    art = tmp_path / "cls"
    shutil.copytree(artifacts[0], art)
    rebuild_artifact(art, onnx=True)
    spec = ModelSpec("m", art, "artifact")

    write_report(art, ONNX_FASTER, hashed=False)  # dropped in beside the manifest
    assert "report.json" not in json.loads((art / "manifest.json").read_text())["files"]
    assert prefer_onnx(art) is False
    assert load_backend(spec).backend == "torch"

    write_report(art, ONNX_FASTER)  # now listed: trusted
    assert prefer_onnx(art) is True and load_backend(spec).backend == "onnxruntime"

    slower = [dict(r, pruned_ms=1.0) if r["backend"] == "torch" else r for r in ONNX_FASTER]
    (art / "report.json").write_text(json.dumps({"latency": slower}))  # hash now stale
    assert prefer_onnx(art) is False
    with pytest.raises(
        ArtifactError, match=r"report\.json: (size .* manifest says|sha256 mismatch)"
    ):
        load_backend(spec)
