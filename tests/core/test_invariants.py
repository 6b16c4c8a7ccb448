"""Invariants every model type of the family table keeps (peft-style test matrix).

For each type (tests/support/tiny_models.build_tiny): pruning with some gates closed
gives a smaller model equal to the gated eval model; the artifact loads back (the
serving path) with the same outputs; the gated model's state round-trips; a training
step changes exactly the parameters its ``trainable`` mode allows; outputs are finite.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from core.artifacts import load_artifact, save_artifact
from core.families import ENCODER, MODEL_TYPES
from core.gates import GateConfig, gated_modules, inject_gates
from core.prune import max_abs_diff, prune_model
from core.structure import build_plan
from core.trainable import configure_trainable, param_groups
from tests.support.prune_fixtures import apply_pattern, reference_plan
from tests.support.tiny_models import VOCAB_SIZE, build_tiny

TYPES = sorted(MODEL_TYPES)
MODES = ["gates", "gates+lora", "gates+weights"]


def _inputs(model, seed: int = 0, batch: int = 3, seq: int = 16):
    """Random ids (16 tokens: past the tiny decoders' sliding window of 8); encoders get
    a right-padded row. Decoders get none: HF numbers positions without the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if MODEL_TYPES[model.config.model_type].family == ENCODER:
        mask[-1, seq // 2 :] = 0
        ids = ids.masked_fill(mask == 0, model.config.pad_token_id or 0)
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        if isinstance(model, PreTrainedModel):
            return model(input_ids=ids, attention_mask=mask).logits
        return model(ids, mask)


def _n_params(m) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


@pytest.mark.parametrize("pattern", ["heads", "dims"])
@pytest.mark.parametrize("model_type", TYPES)
def test_prune_equals_gated_and_artifact_serves_it(model_type, pattern, tmp_path):
    gated = apply_pattern(build_tiny(model_type), pattern, seed=3)
    plan = build_plan(gated)
    assert plan.removed_fraction() > 0.2  # the pattern really closes groups
    pm, _ = prune_model(gated, plan)
    assert _n_params(pm) < 0.9 * _n_params(build_tiny(model_type))
    ids, mask = _inputs(gated)
    ref = _logits(gated, ids, mask)
    out = pm(ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert torch.isfinite(out).all() and out.abs().max() > 0.1
    assert max_abs_diff(gated, pm) < 1e-4
    # the independent reference planner agrees with build_plan on what goes
    ref_plan = reference_plan(gated)
    assert [lp.kv_heads_kept for lp in plan.layers] == [
        lp["kv_heads_kept"] for lp in ref_plan["layers"]
    ]
    assert [lp.ffn_kept for lp in plan.layers] == [lp["ffn_kept"] for lp in ref_plan["layers"]]
    # artifact: written, loaded strictly from the manifest (the serving path), same outputs
    save_artifact(pm, None, tmp_path / "art", plan=plan, task="t")
    loaded = load_artifact(tmp_path / "art")
    assert loaded.manifest["model_type"] == model_type
    again = loaded.model(ids, mask)
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_gated_state_round_trips(model_type, tmp_path):
    gated = apply_pattern(build_tiny(model_type), "dims", seed=1)
    names = list(gated_modules(gated))
    save_model(gated, str(tmp_path / "s.safetensors"))
    fresh = build_tiny(model_type, seed=5)  # different base weights: all must be loaded
    inject_gates(fresh, names, GateConfig(seed=9))
    missing, unexpected = load_model(fresh, str(tmp_path / "s.safetensors"), strict=True)
    assert not missing and not unexpected
    fresh.eval()
    ids, mask = _inputs(gated, seed=2)
    torch.testing.assert_close(_logits(fresh, ids, mask), _logits(gated, ids, mask), atol=0, rtol=0)


def _loss(model) -> torch.Tensor:
    ids, mask = _inputs(model, seed=4)
    if MODEL_TYPES[model.config.model_type].family == ENCODER:
        labels = torch.tensor([0, 1, 2])
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", TYPES)
def test_training_step_changes_only_the_trainable_set(model_type, mode):
    model = build_tiny(model_type)
    inject_gates(model, None, GateConfig(seed=0, lora_rank=2, init_mean=0.2))
    trainable = set(configure_trainable(model, mode))
    kinds = {
        n: ("gate" if n.endswith(("row_logits", "col_logits")) else "lora" if "lora_" in n
            else "other")
        for n in trainable
    }  # fmt: skip
    encoder = MODEL_TYPES[model_type].family == ENCODER
    assert encoder == any(n.startswith("classifier.") for n in trainable)  # the head trains
    if mode == "gates":  # gates, biases of gated layers, the head
        other = {n for n, k in kinds.items() if k == "other"}
        assert "gate" in kinds.values() and "lora" not in kinds.values()
        assert all(n.endswith(".base.bias") or n.startswith("classifier.") or
                   n.startswith(("pre_classifier.", "bert.pooler.")) for n in other), other  # fmt: skip
    elif mode == "gates+lora":
        assert "lora" in kinds.values()
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 1e-2), lr=1e-2)
    model.train()
    loss = _loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable, sorted(changed - trainable)
    # every trainable tensor moves, except LoRA A: B starts at zero, so A has no
    # gradient on the first step
    still = {n for n in trainable - changed if not n.endswith("lora_A")}
    assert not still, sorted(still)
