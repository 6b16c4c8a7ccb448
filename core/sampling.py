"""Next-token sampling: greedy, temperature and nucleus (top-p), written once.

Why one place: the pruned decoder's own ``generate`` and the inference server's
streaming loop must pick the same token from the same logits and seed; two copies had
already drifted apart on the top-p boundary.

Nucleus semantics (Holtzman et al.): keep the smallest set of most likely tokens whose
cumulative probability reaches ``top_p``, i.e. drop a token once the mass of the tokens
ranked above it already reaches ``top_p``. The most likely token is always kept, so
``top_p <= 0`` means greedy among the top token, and ``top_p >= 1`` keeps everything.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_p_filter", "sample"]


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` (..., vocab) restricted to the nucleus and renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    drop = before >= top_p
    drop[..., 0] = False  # at least one token
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token ids of shape ``logits.shape[:-1]``: argmax at temperature <= 0, otherwise a
    draw from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    picked = torch.multinomial(flat, 1, generator=generator)  # (N, 1)
    return picked.reshape(probs.shape[:-1])
