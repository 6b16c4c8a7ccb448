"""Helpers for the pruning tests: set gates to chosen dead patterns, and a small
independent reference planner (so prune tests do not only trust core.structure).

The module access below is written out per Hugging Face architecture on purpose rather
than read from core.families, so a wrong entry in that table shows up as a mismatch.

Gate logits: CLOSED (tanh <= -0.5 -> eval gate exactly 0), OPEN (gate 1), or
fractional values (a gate in (0, 1): scaled, not removed).
"""

from __future__ import annotations

import torch

from core.gates import GateConfig, gated_modules, inject_gates

CLOSED = -3.0
OPEN = 3.0


def gate(model, seed: int = 0):
    """Inject default gates, then give every gate a random fractional value (all open)."""
    inject_gates(model, None, GateConfig(seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            # tanh in (-0.45, 0.55) -> gates in (0.05, 1): all open, most fractional
            for p in (gm.row_logits, gm.col_logits):
                p.copy_(torch.empty_like(p).uniform_(-0.48, 0.6, generator=gen))
    return model.eval()


def _encoder(model):
    for attr in ("bert", "roberta", "electra", "distilbert"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return None


def _layers(model):
    enc = _encoder(model)
    if hasattr(model, "distilbert"):
        return [
            {
                "q": lyr.attention.q_lin,
                "k": lyr.attention.k_lin,
                "v": lyr.attention.v_lin,
                "o": lyr.attention.out_lin,
                "up": lyr.ffn.lin1,
                "down": lyr.ffn.lin2,
            }
            for lyr in enc.transformer.layer
        ]
    if enc is not None:
        return [
            {
                "q": lyr.attention.self.query,
                "k": lyr.attention.self.key,
                "v": lyr.attention.self.value,
                "o": lyr.attention.output.dense,
                "up": lyr.intermediate.dense,
                "down": lyr.output.dense,
            }
            for lyr in enc.encoder.layer
        ]
    return [
        {
            "q": lyr.self_attn.q_proj,
            "k": lyr.self_attn.k_proj,
            "v": lyr.self_attn.v_proj,
            "o": lyr.self_attn.o_proj,
            "gate": lyr.mlp.gate_proj,
            "up": lyr.mlp.up_proj,
            "down": lyr.mlp.down_proj,
        }
        for lyr in model.model.layers
    ]


def _qk_norm(model) -> bool:
    """Qwen3: per-head RMSNorm on q and k (a q/k dim must be closed on both sides)."""
    return _encoder(model) is None and hasattr(model.model.layers[0].self_attn, "q_norm")


def close_rows(mod, rows):
    with torch.no_grad():
        mod.row_logits[list(rows)] = CLOSED


def close_cols(mod, cols):
    with torch.no_grad():
        mod.col_logits[list(cols)] = CLOSED


def kill_head(model, layer: int, head: int, hd: int):
    """Whole head (BERT) / KV group (Llama) dead through its value rows."""
    close_rows(_layers(model)[layer]["v"], range(head * hd, (head + 1) * hd))


def apply_pattern(model, pattern: str, seed: int = 0):
    """Random gates plus one of: 'heads' (whole heads dead + scattered dims),
    'dims' (only some dims dead), 'none', 'ffn' (every FFN neuron of layer 0 dead)."""
    gate(model, seed)
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    kv = getattr(cfg, "num_key_value_heads", None) or H
    group = H // kv
    llama = _encoder(model) is None
    qk_norm = _qk_norm(model)
    L = _layers(model)
    gen = torch.Generator().manual_seed(seed + 1)
    if pattern == "none":
        return model
    if pattern == "ffn":
        close_rows(L[0]["up"], range(L[0]["up"].out_features))
        return model
    if pattern == "heads":
        kill_head(model, 0, 1, hd)
        kill_head(model, 1, 0, hd)
        if not llama:  # second route to a dead head: its output-projection columns
            close_cols(L[1]["o"], range(2 * hd, 3 * hd))
    # scattered dead dims in every layer
    for m in L:
        for g in range(kv):
            # v/o dims: some via v rows, some via o columns of every head in the group
            d1 = torch.randperm(hd, generator=gen)[:2].tolist()
            close_rows(m["v"], [g * hd + d for d in d1])
            d2 = int(torch.randint(hd, (1,), generator=gen))
            close_cols(m["o"], [(g * group + j) * hd + d2 for j in range(group)])
            # q/k dims (pairs for rope): via k rows, or q rows of every head in the group
            half = hd // 2
            p = torch.randperm(half, generator=gen)[:2].tolist()
            dims_k = [p[0], p[0] + half] if llama else [p[0]]
            close_rows(m["k"], [g * hd + d for d in dims_k])
            dims_q = [p[1], p[1] + half] if llama else [p[1]]
            close_rows(m["q"], [(g * group + j) * hd + d for j in range(group) for d in dims_q])
            if llama:  # a half-dead pair must stay
                close_rows(m["k"], [g * hd + p[1]])
            if qk_norm:  # q/k norms: only a pair closed on both sides goes
                close_rows(m["q"], [(g * group + j) * hd + d for j in range(group) for d in dims_k])
        n = m["up"].out_features
        close_rows(m["up"], torch.randperm(n, generator=gen)[: n // 4].tolist())
        close_cols(m["down"], torch.randperm(n, generator=gen)[: n // 8].tolist())
        if "gate" in m:
            close_rows(m["gate"], torch.randperm(n, generator=gen)[: n // 8].tolist())
    return model


@torch.no_grad()
def reference_plan(model) -> dict:
    """Independent planner: dead groups from the eval gates, padded to uniform widths."""
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    kv = getattr(cfg, "num_key_value_heads", None) or H
    llama = _encoder(model) is None
    qk_norm = _qk_norm(model)
    if not llama:
        kv = H
    group = H // kv
    half = hd // 2
    layers = []
    for i, m in enumerate(_layers(model)):
        z = {k: mod.eval_gates() for k, mod in m.items()}
        live_groups, qk, vo = [], [], []
        for g in range(kv):
            heads = range(g * group, (g + 1) * group)
            v_live = z["v"][0][g * hd : (g + 1) * hd] > 0
            o_live = torch.zeros(hd, dtype=torch.bool)
            for h in heads:
                o_live |= z["o"][1][h * hd : (h + 1) * hd] > 0
            vo_live = v_live & o_live
            if not vo_live.any():
                continue
            k_live = z["k"][0][g * hd : (g + 1) * hd] > 0
            q_live = torch.zeros(hd, dtype=torch.bool)
            for h in heads:
                q_live |= z["q"][0][h * hd : (h + 1) * hd] > 0
            if llama:
                k_live = (k_live[:half] | k_live[half:]).repeat(2)
                q_live = (q_live[:half] | q_live[half:]).repeat(2)
            live_groups.append(g)
            qk.append((k_live | q_live) if qk_norm else (k_live & q_live))
            vo.append(vo_live)

        def pad(masks, pairs):
            if not masks:
                return []
            if pairs:
                masks = [mk[:half] for mk in masks]
            n = max(int(mk.sum()) for mk in masks)
            out = []
            for mk in masks:
                keep = mk.nonzero().flatten().tolist()
                extra = [d for d in range(len(mk)) if not mk[d]][: n - len(keep)]
                keep = sorted(keep + extra)
                if pairs:
                    keep = keep + [d + half for d in keep]
                out.append(keep)
            return out

        ffn_live = (z["up"][0] > 0) & (z["down"][1] > 0)
        if "gate" in z:
            ffn_live &= z["gate"][0] > 0
        layers.append(
            {
                "index": i,
                "heads_kept": [g * group + j for g in live_groups for j in range(group)],
                "kv_heads_kept": live_groups,
                "qk_dims": pad(qk, llama),
                "vo_dims": pad(vo, False),
                "ffn_kept": ffn_live.nonzero().flatten().tolist(),
            }
        )
    return {"family": "llama" if llama else "bert", "layers": layers}
