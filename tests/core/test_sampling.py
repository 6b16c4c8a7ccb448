"""core.sampling on hand-made distributions (dyadic probabilities: sums are exact)."""

from __future__ import annotations

import math

import pytest
import torch

from core.sampling import sample, top_p_filter

P = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])  # sorted: 1, 3, 0, {2, 4}


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1.0, {0, 1, 2, 3, 4}),
        (0.5, {1}),  # the top token alone reaches 0.5
        (0.5001, {1, 3}),
        (0.75, {1, 3}),  # 0.5 + 0.25 reaches it exactly: the smallest such set
        (0.76, {0, 1, 3}),
        (0.875, {0, 1, 3}),
        (0.9, None),  # past 0.875: one of the two tied 0.0625 tokens joins
        (0.1, {1}),
        (0.0, {1}),  # always at least one token
    ],
)
def test_nucleus_is_the_smallest_set_reaching_top_p(top_p, kept):
    out = top_p_filter(P, top_p)
    got = set(out.nonzero().flatten().tolist())
    if kept is None:
        assert got >= {0, 1, 3} and len(got) == 4
    else:
        assert got == kept
    assert float(out.sum()) == pytest.approx(1.0)
    # kept tokens keep their relative odds
    i, j = sorted(got)[:2] if len(got) > 1 else (next(iter(got)),) * 2
    assert float(out[i] / out[j]) == pytest.approx(float(P[i] / P[j]))


def test_filter_works_per_row():
    probs = torch.stack([P, P.flip(0)])
    out = top_p_filter(probs, 0.5)
    assert out[0].nonzero().flatten().tolist() == [1]
    assert out[1].nonzero().flatten().tolist() == [3]


def test_greedy_and_seeded_sampling():
    logits = torch.log(P)
    assert int(sample(logits, temperature=0.0)) == 1
    rows = torch.stack([logits, logits.flip(0)])
    assert sample(rows, temperature=0.0).tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, 1.0, 0.75, generator=g)) for _ in range(400)]
    assert set(draws) == {1, 3}  # only the nucleus is ever drawn
    assert 0.55 < draws.count(1) / 400 < 0.78  # ~ 0.5 / 0.75 = 2/3
    a = sample(rows, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample(rows, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist() and a.shape == (2,)


def test_temperature_sharpens_and_flattens():
    logits = torch.log(torch.tensor([0.6, 0.4]))
    g = torch.Generator().manual_seed(1)
    cold = [int(sample(logits, 0.05, generator=g)) for _ in range(200)]
    assert cold.count(0) > 195  # (0.6/0.4)^20 ~ 3300 : 1
    hot = [int(sample(logits, 50.0, generator=g)) for _ in range(2000)]
    share = hot.count(0) / 2000
    expect = 1 / (1 + math.exp(-(math.log(0.6) - math.log(0.4)) / 50))
    assert abs(share - expect) < 0.05
