"""The family table (core.families): every listed type matches the real HF architecture,
trains, prunes and serves; anything else is refused up front, naming the supported types.
"""

from __future__ import annotations

import json

import pytest
import torch

from core.artifacts import load_artifact
from core.catalog import list_models, register_model
from core.config import Hyperparameters, JobConfig
from core.errors import UnsupportedModelError
from core.families import ENCODER, MODEL_TYPES, SUPPORTED_TYPES, check_config, require
from core.gates import gated_modules, inject_gates, resolve_targets
from core.modeling import load_base
from core.package import build_artifact
from core.prune import prune_model
from core.structure import build_plan, describe
from core.train import load_gated_run, train
from tests.support.prune_fixtures import apply_pattern, close_rows, gate
from tests.support.tiny_models import SLIDING_WINDOW, build_tiny, save_tiny

TYPES = sorted(MODEL_TYPES)


@pytest.mark.parametrize("model_type", TYPES)
def test_layout_names_the_real_modules(model_type):
    """describe() finds every layer; the default targets are exactly its projections."""
    model = build_tiny(model_type)
    S = describe(model)
    assert len(S.layers) == model.config.num_hidden_layers == 2
    assert S.family == require(model_type).family and S.model_type == model_type
    roles = [n for ls in S.layers for n in ls.roles()]
    assert sorted(resolve_targets(model, None)) == sorted(roles)
    modules = dict(model.named_modules())
    for ls in S.layers:  # the norms the pruned model copies exist and are norms
        for n in (ls.norm1, ls.norm2, ls.q_norm, ls.k_norm):
            if n is not None:
                assert "norm" in type(modules[n]).__name__.lower(), n
    assert (S.layers[0].q_norm is not None) == (model_type == "qwen3")
    # nothing outside the layers is gated by default: heads, pooler, embeddings projection
    names = inject_gates(model)
    assert set(names) == set(roles)


def test_unlisted_types_are_refused_with_the_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    for call in (lambda: describe(model), lambda: require(model), lambda: inject_gates(model)):
        with pytest.raises(UnsupportedModelError) as ei:
            call()
        assert "'gpt2'" in str(ei.value) and "distilbert" in str(ei.value)
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported model types"):
        register_model("my-gpt2", folder, tmp_path)
    assert "my-gpt2" not in {e.id for e in list_models(tmp_path)}
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_base(folder, "causal_lm")


def test_configs_the_pruned_models_cannot_reproduce_are_refused():
    check_config({"model_type": "llama", "hidden_act": "silu"})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        check_config({"model_type": "llama", "hidden_act": "gelu"})
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        check_config({"model_type": "qwen2", "rope_parameters": rope})
    with pytest.raises(UnsupportedModelError, match="activation 'tanh'"):
        check_config({"model_type": "distilbert", "activation": "tanh"})
    with pytest.raises(UnsupportedModelError, match="is_decoder"):
        check_config({"model_type": "bert", "is_decoder": True})


@pytest.mark.parametrize("model_type", ["distilbert", "qwen3"])
def test_registration_and_listing_read_the_table(model_type, tmp_path):
    folder = save_tiny(model_type, tmp_path / model_type)
    register_model("mine", folder, tmp_path / "data")
    entry = {e.id: e for e in list_models(tmp_path / "data")}["mine"]
    assert entry.family == require(model_type).family


def test_decoder_classification_is_refused_before_training(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "q")
    with pytest.raises(UnsupportedModelError, match="task 'classification' needs an encoder"):
        load_base(folder, "classification", labels=["a", "b"])
    enc = save_tiny("electra", tmp_path / "e")
    with pytest.raises(UnsupportedModelError, match="task 'causal_lm' needs a decoder"):
        load_base(enc, "causal_lm")


def _data(tmp_path, model_type):
    p = tmp_path / "train.jsonl"
    if require(model_type).family == ENCODER:
        words = [("good", "positive"), ("bad", "negative"), ("fine", "neutral")] * 4
        rows = [{"text": f"the movie was {w}", "label": lab} for w, lab in words]
    else:
        rows = [{"text": "some plain text about a movie"}] * 8
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("model_type", TYPES)
def test_train_prune_artifact_serve(model_type, tmp_path):
    """The whole engine path on each type: train, rebuild the run, prune, write and load
    the artifact, then compare the served model with the gated one on real tokens."""
    folder = save_tiny(model_type, tmp_path / "base")
    hp = Hyperparameters(batch_size=4, max_steps=2, eval_interval=100, learning_rate=0.1)
    res = train(JobConfig(model=str(folder), training_file=str(_data(tmp_path, model_type)),
                          hyperparameters=hp), tmp_path / "run")  # fmt: skip
    assert res.status == "completed" and res.steps == 2
    manifest = build_artifact(tmp_path / "run", tmp_path / "art", onnx=False, report=False).manifest
    assert manifest["model_type"] == model_type
    assert manifest["compression"]["max_abs_diff_vs_gated"] < 1e-4
    served = load_artifact(tmp_path / "art")
    gated, tok, _ = load_gated_run(tmp_path / "run")
    enc = tok(["the movie was good", "bad"], return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    with torch.no_grad():
        if require(model_type).family == ENCODER:
            ref = gated(**enc).logits
            out = served.model(enc["input_ids"], mask, enc.get("token_type_ids"))
        else:  # decoders pad right here: compare the real tokens
            ref = gated(input_ids=enc["input_ids"], attention_mask=mask).logits[mask.bool()]
            out = served.model(enc["input_ids"], mask)[mask.bool()]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert served.tokenizer is not None


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_sliding_window_generation_matches_gated(model_type):
    """KV-cached greedy decoding past the window equals the gated model's own greedy."""
    gated = apply_pattern(build_tiny(model_type), "dims", seed=2)
    pm, _ = prune_model(gated)
    assert pm.config.sliding_window == SLIDING_WINDOW
    ids = torch.tensor([[1, 17, 23, 45, 8, 9]])
    new = 3 * SLIDING_WINDOW
    ours = pm.generate(ids, max_new_tokens=new, stop_token_ids=[])
    ref = ids.clone()
    with torch.no_grad():
        for _ in range(new):
            nxt = gated(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert ours.tolist() == ref.tolist()


def test_qwen3_qk_dim_goes_only_when_closed_on_both_sides():
    """Per-head q/k norms: a dim closed in q only still feeds q's norm, so it stays."""
    model = gate(build_tiny("qwen3"))
    S = describe(model)
    ls = S.layers[0]
    q, k = model.get_submodule(ls.q), model.get_submodule(ls.k)
    hd, half = S.head_dim, S.head_dim // 2
    pair = [1, 1 + half]
    # every query head, q side only (widths are uniform per layer: both groups must lose it)
    close_rows(q, [h * hd + d for h in range(S.num_heads) for d in pair])
    assert build_plan(model, equal_head_dims=False).layers[0].qk_dims == [list(range(hd))] * 2
    close_rows(k, [g * hd + d for g in range(S.num_kv_heads) for d in pair])  # both sides now
    plan = build_plan(model, equal_head_dims=False)
    assert plan.layers[0].qk_dims == [[d for d in range(hd) if d not in pair]] * 2
    pm, _ = prune_model(model, plan, equal_head_dims=False)
    assert pm.layers[0].attn.d_qk == hd - 2
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_the_table_lists_these_types():
    encoders = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"}
    decoders = {"llama", "mistral", "qwen2", "qwen3"}
    assert set(SUPPORTED_TYPES) == encoders | decoders
    assert {t for t in TYPES if require(t).family == ENCODER} == encoders
    for t in TYPES:  # 2 layers x (q, k, v, o, FFN in, FFN out); SwiGLU has two FFN inputs
        model = build_tiny(t)
        inject_gates(model)
        assert len(gated_modules(model)) == (14 if t in decoders else 12), t
