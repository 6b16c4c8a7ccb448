"""Pruned model == gated eval model (fp32, 1e-4) for BERT and Llama-GQA-RoPE, and the
plan validation that guards it."""

from __future__ import annotations

import pytest
import torch

from core.errors import PlanError
from core.prune import compression_figures, dense_plan, max_abs_diff, prune_model
from core.pruned import KVCache
from tests.support.prune_fixtures import apply_pattern, close_rows, reference_plan
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama

BUILDERS = {"bert": build_tiny_bert_cls, "llama": build_tiny_llama}
PATTERNS = ["heads", "dims", "none", "ffn"]


def _shapes(pm):
    if pm.family == "bert":
        return [(lyr.n_heads, lyr.d_qk, lyr.d_vo, lyr.ffn) for lyr in pm.layers]
    return [(b.attn.n_kv, b.attn.d_qk, b.attn.d_vo, b.mlp.ffn) for b in pm.layers]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruned_equals_gated(family, pattern):
    model = apply_pattern(BUILDERS[family](seed=0), pattern, seed=3)
    plan = reference_plan(model)
    pm, _ = prune_model(model, plan)
    shapes = _shapes(pm)
    full = (4, 8, 8, 64) if family == "bert" else (2, 8, 8, 64)
    if pattern == "none":
        assert shapes == [full, full]
    elif pattern == "ffn":
        assert shapes[0][3] == 0 and shapes[0][:3] == full[:3]
    elif pattern == "heads":
        assert shapes[0][0] == full[0] - 1 and shapes[1][0] < full[0]
    else:  # dims only: same head count, fewer dims
        assert all(s[0] == full[0] for s in shapes)
        assert all(s[1] < 8 and s[2] < 8 and s[3] < 64 for s in shapes)
    # a shrunk model must still agree to fp32 rounding (padded rows included for BERT)
    assert max_abs_diff(model, pm, batch=3, seq_len=12) < 1e-4
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (2, 20), generator=gen)
    ref = model(input_ids=ids).logits
    torch.testing.assert_close(pm(ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("equal", [True, False])
def test_equal_head_dims_padding_is_exact(family, equal):
    model = apply_pattern(BUILDERS[family](seed=4), "dims", seed=9)
    plan = reference_plan(model)
    pm, _ = prune_model(model, plan, equal_head_dims=equal)
    raw = [(len(lp["qk_dims"][0]), len(lp["vo_dims"][0])) for lp in plan["layers"]]
    assert any(q != v for q, v in raw)  # the pattern really gives unequal widths
    for (q, v), s in zip(raw, _shapes(pm), strict=True):
        if equal:
            target = max(q, v)
            if family == "llama" and (target - q) % 2:
                target += 1  # RoPE: q/k grow by whole pairs
            assert s[1] == s[2] == target
        else:
            assert (s[1], s[2]) == (q, v)
    assert max_abs_diff(model, pm) < 1e-4


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_multiples_keep_dead_neurons_and_dims_exactly(family):
    model = apply_pattern(BUILDERS[family](seed=0), "dims", seed=3)
    pm, _ = prune_model(model, reference_plan(model), ffn_multiple=16, dim_multiple=4)
    assert all(s[3] % 16 == 0 and s[1] % 4 == 0 and s[2] % 4 == 0 for s in _shapes(pm))
    assert max_abs_diff(model, pm) < 1e-4


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_structure_build_plan_matches_reference(family):
    from core import structure

    model = apply_pattern(BUILDERS[family](seed=1), "heads", seed=5)
    plan = structure.build_plan(model, structure.describe(model))
    pm, _ = prune_model(model, plan)  # validates: every dropped group is dead
    assert max_abs_diff(model, pm) < 1e-4
    ref = reference_plan(model)
    got = [list(lp.kv_heads_kept) for lp in plan.layers]
    assert got == [lp["kv_heads_kept"] for lp in ref["layers"]]


def test_qk_all_dead_gives_uniform_attention_not_zero():
    model = apply_pattern(build_tiny_bert_cls(seed=0), "none")
    q = model.bert.encoder.layer[0].attention.self.query
    close_rows(q, range(32))  # every q dim of every head dead in layer 0
    pm, _ = prune_model(model, reference_plan(model))
    assert pm.layers[0].d_qk == 0 and pm.layers[0].n_heads == 4
    assert max_abs_diff(model, pm) < 1e-4


def test_llama_qk_all_dead_uniform_causal():
    model = apply_pattern(build_tiny_llama(seed=0), "none")
    close_rows(model.model.layers[1].self_attn.k_proj, range(16))
    pm, _ = prune_model(model, reference_plan(model))
    assert pm.layers[1].attn.d_qk == 0
    assert max_abs_diff(model, pm) < 1e-4


def test_llama_kv_cache_matches_full_forward_and_padding():
    model = apply_pattern(build_tiny_llama(seed=2), "dims", seed=2)
    pm, _ = prune_model(model, reference_plan(model))
    ids = torch.randint(3, 100, (2, 10))
    full = pm(ids)
    cache = KVCache(pm, 2, 16)
    a = pm(ids[:, :6], cache=cache)
    b = pm(ids[:, 6:9], cache=cache)  # chunk after a prefix
    c = pm(ids[:, 9:], cache=cache)  # single-token decode
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=0)
    # left padding: row 1 padded by 3 must equal its unpadded run
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    padded = pm(ids, attention_mask=mask)
    alone = pm(ids[1:, 3:])
    torch.testing.assert_close(padded[1, 3:], alone[0], atol=1e-5, rtol=0)


def test_greedy_generation_identical_to_gated():
    model = apply_pattern(build_tiny_llama(seed=0), "heads", seed=1)
    pm, _ = prune_model(model, reference_plan(model))
    ids = torch.tensor([[1, 17, 23, 45, 8]])
    ours = pm.generate(ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    ref = ids.clone()
    with torch.no_grad():
        for _ in range(12):  # gated model greedy, no cache
            nxt = model(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert ours.tolist() == ref.tolist()
    streamed = [int(t[0]) for t in pm.stream(ids, 12, stop_token_ids=[])]
    assert streamed == ref[0, 5:].tolist()


def test_generation_stops_and_samples_reproducibly():
    model = apply_pattern(build_tiny_llama(seed=0), "none")
    pm, _ = prune_model(model, dense_plan(model))
    ids = torch.tensor([[1, 17, 23]])
    greedy = pm.generate(ids, 8)[0, 3:].tolist()
    stop = greedy[2]
    out = pm.generate(ids, 8, stop_token_ids=[stop])[0, 3:].tolist()
    assert out == greedy[: greedy.index(stop) + 1]
    g1 = pm.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    g2 = pm.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert g1.tolist() == g2.tolist()


def test_pruned_does_not_share_storage_with_gated():
    model = apply_pattern(build_tiny_bert_cls(seed=0), "dims")
    pm, _ = prune_model(model, reference_plan(model))
    before = pm(torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = pm(torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_compression_figures_count_removed_params():
    model = apply_pattern(build_tiny_bert_cls(seed=0), "heads")
    pm, plan = prune_model(model, reference_plan(model))
    f = compression_figures(model, pm, plan)
    assert f["gated_params_before"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert 0 < f["gated_params_after"] < f["gated_params_before"]
    # the paper's per-matrix count: rows kept x cols kept of every gated matrix
    from core.gates import gated_modules

    paper = 0
    for gm in gated_modules(model).values():
        zr, zc = gm.eval_gates()
        paper += int((zr > 0).sum()) * int((zc > 0).sum())
    assert f["paper_params_after"] == paper
    # coupling removes partners the paper still counts (e.g. o columns of a dead v row)
    assert f["gated_params_after"] < paper
    assert f["params_before"] - f["params_after"] == (
        f["gated_params_before"] - f["gated_params_after"]
    ) + _removed_biases(pm)
    assert sum(r["gated_after"] for r in f["per_layer"]) == f["gated_params_after"]


def _removed_biases(pm) -> int:
    full = 2 * (3 * 32 + 32 + 64 + 32)
    kept = sum(lyr.n_heads * (2 * lyr.d_qk + lyr.d_vo) + 32 + lyr.ffn + 32 for lyr in pm.layers)
    return full - kept


# ---------------------------------------------------------------- plan validation
def _bad(plan, layer, key, value):
    plan["layers"][layer][key] = value
    return plan


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: _bad(p, 0, "ffn_kept", [0, 0, 1]), r"layer 0\.ffn_kept: .*sorted and unique"),
        (lambda p: _bad(p, 1, "ffn_kept", [999]), r"layer 1\.ffn_kept: index out of range"),
        (lambda p: _bad(p, 0, "heads_kept", [0, 1]), r"layer 0\.heads_kept"),
        (lambda p: _bad(p, 0, "qk_dims", [[0, 4], [0, 1, 4, 5]]), r"layer 0\.qk_dims"),
        (lambda p: _bad(p, 0, "qk_dims", [[0, 1], [0, 1]]), r"RoPE"),
        (lambda p: {**p, "layers": p["layers"][:1]}, r"plan\.layers"),
        (lambda p: {**p, "family": "bert"}, r"plan\.family"),
    ],
)
def test_plan_errors_name_layer_and_field(mutate, match):
    model = apply_pattern(build_tiny_llama(seed=0), "none")
    with pytest.raises(PlanError, match=match):
        prune_model(model, mutate(dense_plan(model)))


def test_plan_dropping_live_groups_is_refused_before_any_change():
    model = apply_pattern(build_tiny_bert_cls(seed=0), "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = dense_plan(model)
    plan["layers"][1]["ffn_kept"] = list(range(1, 64))  # neuron 0 is alive
    with pytest.raises(PlanError, match=r"layer 1\.ffn_kept: dropped neurons \[0\] are live"):
        prune_model(model, plan)
    plan = dense_plan(model)
    plan["layers"][0]["heads_kept"] = plan["layers"][0]["kv_heads_kept"] = [0, 1, 2]
    plan["layers"][0]["qk_dims"] = plan["layers"][0]["qk_dims"][:3]
    plan["layers"][0]["vo_dims"] = plan["layers"][0]["vo_dims"][:3]
    with pytest.raises(PlanError, match=r"layer 0\.kv_heads_kept: head/group 3 is dropped"):
        prune_model(model, plan)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
        type_vocab_size=1,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
        num_labels=1,  # regression head
    )
    return RobertaForSequenceClassification(cfg).eval()


def test_roberta_regression_positions_and_head():
    model = apply_pattern(_tiny_roberta(), "heads", seed=2)
    pm, _ = prune_model(model, reference_plan(model))
    ids = torch.randint(3, 100, (3, 14), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    ids = ids.masked_fill(mask == 0, 1)  # RoBERTa pads with id 1: positions restart there
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    out = pm(ids, mask)
    assert out.shape == (3, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
