"""Artifact round trip, refusal of corrupted artifacts, the HF copy, and a pruned run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.artifacts import load_artifact, save_artifact, sha256_file
from core.errors import ArtifactError
from core.prune import max_abs_diff, prune_model
from tests.support.artifacts import bert_run, reseal
from tests.support.prune_fixtures import apply_pattern, close_rows, gate, reference_plan
from tests.support.tiny_models import (
    BERT_LABELS,
    build_bert_tokenizer,
    build_llama_tokenizer,
    build_tiny_bert_cls,
    build_tiny_llama,
)

IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))


def _bert_artifact(tmp_path: Path, pattern: str = "heads") -> tuple[Path, torch.nn.Module]:
    model = apply_pattern(build_tiny_bert_cls(seed=0), pattern)
    pm, plan = prune_model(model, reference_plan(model))
    out = tmp_path / "art"
    tok = build_bert_tokenizer(tmp_path / "tok")
    save_artifact(pm, tok, out, plan=plan, task="classification", labels=BERT_LABELS)
    return out, pm


def test_roundtrip_bert_and_manifest_contents(tmp_path):
    out, pm = _bert_artifact(tmp_path)
    la = load_artifact(out)
    torch.testing.assert_close(la.model(IDS), pm(IDS), atol=0, rtol=0)
    m = la.manifest
    assert m["format_version"] == 1 and m["family"] == "bert" and m["task"] == "classification"
    assert m["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert [lp["kv_heads_kept"] for lp in m["plan"]["layers"]][0] == [0, 2, 3]
    assert m["model_config"]["layers"][0]["n_heads"] == 3
    assert set(m["files"]) >= {"model.safetensors", "tokenizer.json"}
    assert m["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    assert la.tokenizer("the movie")["input_ids"][0] == la.tokenizer.cls_token_id
    assert not (out / "hf").exists()  # per-layer shapes differ: no HF copy
    assert m["hf_subfolder"] is None


def test_roundtrip_llama_tied_generation(tmp_path):
    model = apply_pattern(build_tiny_llama(seed=0), "dims")
    pm, plan = prune_model(model, reference_plan(model))
    save_artifact(pm, build_llama_tokenizer(), tmp_path, plan=plan, task="causal_lm")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    la = load_artifact(tmp_path)
    assert la.model.lm_head.weight is la.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9]])
    assert la.model.generate(ids, 6).tolist() == pm.generate(ids, 6).tolist()


def _rewrite_weights(out: Path, edit) -> None:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, str(out / "model.safetensors"))
    reseal(out)  # an attacker who also fixes the hash


@pytest.mark.parametrize(
    "corrupt, match",
    [
        ("flip_byte", "sha256 mismatch"),
        ("truncate", "truncated"),
        ("missing_tensor", "missing \\['layers.1.up.bias'\\]"),
        ("extra_tensor", "unexpected \\['evil'\\]"),
        ("wrong_shape", "'layers.0.up.weight' has shape"),
        ("format_version", "unknown format_version 99"),
        ("no_manifest", "missing manifest.json"),
        ("bad_json", "not valid JSON"),
        ("missing_file", "tokenizer.json: file listed in the manifest is missing"),
        ("bad_config", "model_config is invalid"),
        ("not_safetensors", "not a readable safetensors"),
    ],
)
def test_corrupted_artifact_is_refused(tmp_path, corrupt, match):
    out, _ = _bert_artifact(tmp_path)
    w = out / "model.safetensors"
    mpath = out / "manifest.json"
    if corrupt == "flip_byte":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0xFF
        w.write_bytes(bytes(data))
    elif corrupt == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif corrupt == "missing_tensor":
        _rewrite_weights(out, lambda sd: sd.pop("layers.1.up.bias"))
    elif corrupt == "extra_tensor":
        _rewrite_weights(out, lambda sd: sd.__setitem__("evil", torch.zeros(1)))
    elif corrupt == "wrong_shape":
        _rewrite_weights(out, lambda sd: sd.__setitem__("layers.0.up.weight", torch.zeros(3, 32)))
    elif corrupt in ("format_version", "bad_config"):
        m = json.loads(mpath.read_text())
        if corrupt == "format_version":
            m["format_version"] = 99
        else:
            m["model_config"]["bogus"] = 1
        mpath.write_text(json.dumps(m))
    elif corrupt == "no_manifest":
        mpath.unlink()
    elif corrupt == "bad_json":
        mpath.write_text("{not json")
    elif corrupt == "missing_file":
        (out / "tokenizer.json").unlink()
    elif corrupt == "not_safetensors":
        w.write_bytes(b"\x80\x04garbage-that-is-not-safetensors")
        reseal(out)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(out)


def test_hf_copy_loads_with_plain_from_pretrained_bert(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = gate(build_tiny_bert_cls(seed=0))
    for lyr in model.bert.encoder.layer:  # same FFN cut everywhere, attention intact
        close_rows(lyr.intermediate.dense, range(0, 64, 4))
    pm, plan = prune_model(model, reference_plan(model))
    tok = build_bert_tokenizer(tmp_path / "tok")
    m = save_artifact(pm, tok, tmp_path / "art", plan=plan, task="classification",
                      labels=BERT_LABELS)  # fmt: skip
    assert m["hf_subfolder"] == "hf"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "art" / "hf").eval()
    assert hf.config.intermediate_size == 48 and hf.config.id2label[2] == "positive"
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=IDS).logits, pm(IDS), atol=1e-5, rtol=0)
        assert max_abs_diff(model, pm) < 1e-4
    del mask


def test_hf_copy_loads_with_plain_from_pretrained_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    model = gate(build_tiny_llama(seed=0))
    for lyr in model.model.layers:  # one whole KV group and 8 neurons in every layer
        close_rows(lyr.self_attn.v_proj, range(8, 16))
        close_rows(lyr.mlp.up_proj, range(8))
    pm, plan = prune_model(model, reference_plan(model))
    save_artifact(pm, build_llama_tokenizer(), tmp_path, plan=plan, task="causal_lm")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == 1 and hf.config.num_attention_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=IDS).logits, pm(IDS), atol=1e-5, rtol=0)


def test_pruned_run_writes_artifact_from_gated_run(tmp_path):
    from core.package import build_artifact

    model = apply_pattern(build_tiny_bert_cls(seed=0), "heads")
    bert_run(tmp_path / "run", model, tmp_path / "tok")
    manifest = build_artifact(tmp_path / "run", tmp_path / "art", onnx=False, report=False).manifest
    comp = manifest["compression"]
    assert comp["max_abs_diff_vs_gated"] < 1e-4
    assert comp["max_rel_diff_vs_gated"] == pytest.approx(
        comp["max_abs_diff_vs_gated"] / comp["max_abs_output_gated"]
    )
    assert comp["gated_params_after"] < comp["gated_params_before"]
    assert (
        manifest["base_model"]["id"] == "tiny-bert" and len(manifest["base_model"]["sha256"]) == 64
    )
    assert manifest["problem_type"] == "single_label_classification"
    assert manifest["original_shape"]["num_heads"] == 4
    la = load_artifact(tmp_path / "art")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    torch.testing.assert_close(la.model(IDS), ref, atol=1e-4, rtol=0)


def test_save_artifact_replaces_a_folder_atomically(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous artifact whole (it used to write
    straight into the folder); a save that succeeds replaces the folder, stale files
    included, and leaves no temporary sibling behind."""
    import core.artifacts as artifacts

    out, pm = _bert_artifact(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "stale.bin").write_bytes(b"old")

    def broken_manifest(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "_write_json", broken_manifest)
    model2 = apply_pattern(build_tiny_bert_cls(seed=1), "heads")
    pm2, plan2 = prune_model(model2, reference_plan(model2))
    tok = build_bert_tokenizer(tmp_path / "tok2")
    with pytest.raises(OSError, match="disk full"):
        save_artifact(pm2, tok, out, plan=plan2, task="classification", labels=BERT_LABELS)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        **before,
        "stale.bin": b"old",
    }
    torch.testing.assert_close(load_artifact(out).model(IDS), pm(IDS), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "tok", "tok2"]

    monkeypatch.undo()
    save_artifact(pm2, tok, out, plan=plan2, task="classification", labels=BERT_LABELS)
    assert not (out / "stale.bin").exists()
    torch.testing.assert_close(load_artifact(out).model(IDS), pm2(IDS), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "tok", "tok2"]


def test_a_manifest_from_the_previous_writer_still_loads(tmp_path):
    """Before the typed schema, problem_type & co. were optional extras and report.json
    sat unlisted beside the manifest; such an artifact still loads and reads the same."""
    out, pm = _bert_artifact(tmp_path)
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    for key in ("problem_type", "measured_sparsity", "max_length", "source_run"):
        del m[key]
    m["synthetic_fraction"] = 0.5  # a free-form extra of the old writer
    mpath.write_text(json.dumps(m))
    (out / "report.json").write_text(json.dumps({"latency": []}))
    la = load_artifact(out)
    torch.testing.assert_close(la.model(IDS), pm(IDS), atol=0, rtol=0)
    assert la.manifest.problem_type is None and la.manifest["synthetic_fraction"] == 0.5
    assert la.manifest.labels() == list(BERT_LABELS)
    assert "report.json" not in la.manifest.files
    again = type(la.manifest).from_dict(la.manifest.to_dict())
    assert again == la.manifest and dict(again)["synthetic_fraction"] == 0.5


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("task", 3, "manifest field 'task' must be a string or null, got int"),
        ("id2label", {"0": 1}, "id2label must map class indices to label strings"),
        ("id2label", {"first": "a"}, "id2label must map class indices"),
        ("files", {"model.safetensors": {"sha256": 1}}, r"files\['model.safetensors'\]"),
        ("max_length", "128", "'max_length' must be an integer or null, got str"),
        ("format_version", [1], "unknown format_version \\[1\\]"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_refused(tmp_path, key, value, match):
    out, _ = _bert_artifact(tmp_path)
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    m[key] = value
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(out)
