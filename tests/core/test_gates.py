"""GatedLinear, injection/removal, trainable modes and optimizer groups (method.md §1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.gates import (
    DEFAULT_TARGETS,
    GateConfig,
    GatedLinear,
    gated_modules,
    inject_gates,
    remove_gates,
    resolve_targets,
)
from core.trainable import (
    configure_trainable,
    gate_state_dict,
    load_trainable_state_dict,
    param_groups,
    trainable_state_dict,
)


def _ids(n_batch: int = 3, n_tok: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 100, (n_batch, n_tok), generator=g)


def _scramble_gates(model: nn.Module, seed: int = 0, p_closed: float = 0.3) -> None:
    """Random gates: some exactly closed, some fractional, some fully open (eval)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            for t in (gm.row_logits, gm.col_logits):
                u = torch.rand(t.shape, generator=g)
                vals = torch.where(u < p_closed, torch.full_like(t, -3.0), torch.full_like(t, 3.0))
                frac = (u > 0.8) & (u < 0.9)  # tanh(0) + .5 = .5: a fractional gate
                t.copy_(torch.where(frac, torch.zeros_like(t), vals))


# -- the layer itself -----------------------------------------------------------------------


def _layer(bias: bool = True, noise: float = 0.1, lora: int = 0) -> GatedLinear:
    torch.manual_seed(0)
    return GatedLinear(nn.Linear(6, 5, bias=bias), GateConfig(noise_std=noise, lora_rank=lora))


def test_init_distribution_and_open_at_init():
    torch.manual_seed(0)
    gm = GatedLinear(nn.Linear(400, 300), GateConfig())
    assert abs(gm.row_logits.mean().item() - 1.0) < 0.03
    assert abs(gm.col_logits.std().item() - 0.1) < 0.02
    z_r, z_c = gm.eval_gates()
    assert torch.equal(z_r, torch.ones(300)) and torch.equal(z_c, torch.ones(400))
    assert gm.row_logits.dtype == torch.float32


def test_eval_gates_deterministic_and_formula():
    gm = _layer()
    with torch.no_grad():
        gm.row_logits.copy_(torch.tensor([-2.0, -0.55, 0.0, 0.3, 2.0]))
    gm.eval()
    a, _ = gm.gates()
    b, _ = gm.gates()
    assert torch.equal(a, b)
    want = (torch.tanh(gm.row_logits) + 0.5).clamp(0, 1)
    torch.testing.assert_close(a, want)
    assert a[0] == 0 and a[1] == 0  # tanh(-0.55) < -0.5: exactly closed
    assert a[2] == 0.5  # fractional gate scales, does not remove
    x = torch.randn(4, 6)
    assert torch.equal(gm(x), gm(x))


def test_training_gates_noisy_and_shared_across_batch():
    gm = _layer(noise=0.1)
    with torch.no_grad():
        gm.row_logits.zero_()  # z = 0.5 + eps, away from the clamp
        gm.col_logits.zero_()
    gm.train()
    x = torch.randn(1, 6).expand(8, 6).contiguous()  # identical rows
    y1, y2 = gm(x), gm(x)
    assert not torch.allclose(y1, y2)  # fresh noise each forward
    # one noise vector per forward shared by the whole batch: identical rows stay identical
    # (up to BLAS rounding: sgemm may sum a row differently depending on its position;
    # per-row noise would differ by ~0.1, far above this tolerance)
    torch.testing.assert_close(y1, y1[:1].expand_as(y1), rtol=0, atol=1e-6)
    z1, _ = gm.gates()
    z2, _ = gm.gates()
    assert not torch.equal(z1, z2)
    assert (z1 - 0.5).abs().max() < 0.6  # noise std 0.1


def test_closed_row_outputs_exactly_zero_even_with_bias():
    gm = _layer(bias=True)
    with torch.no_grad():
        gm.base.bias.fill_(3.0)
        gm.row_logits[1] = -4.0
    gm.eval()
    y = gm(torch.randn(7, 6) * 100)
    assert torch.all(y[:, 1] == 0)
    assert torch.all(y[:, 0] != 0)
    wf, bf = gm.folded_weight_and_bias()
    assert torch.all(wf[1] == 0) and bf[1] == 0


def test_closed_column_ignores_its_input():
    gm = _layer()
    with torch.no_grad():
        gm.col_logits[2] = -4.0
    gm.eval()
    x = torch.randn(3, 6)
    x2 = x.clone()
    x2[:, 2] = 1e6
    assert torch.equal(gm(x), gm(x2))


def test_never_invents_a_bias(tiny_llama):
    gm = _layer(bias=False)
    assert gm.base.bias is None and gm.bias is None
    wf, bf = gm.folded_weight_and_bias()
    assert bf is None
    assert gm.to_linear(fold=True).bias is None
    inject_gates(tiny_llama)
    for name, _p in tiny_llama.named_parameters():
        assert not name.endswith("bias"), name
    remove_gates(tiny_llama, fold=True)
    assert all(m.bias is None for m in tiny_llama.modules() if isinstance(m, nn.Linear))


def test_lora_inside_gates_formula():
    gm = _layer(lora=2)
    assert torch.all(gm.lora_B == 0)  # B starts at zero: no change at injection
    with torch.no_grad():
        gm.lora_B.normal_()
        gm.row_logits.copy_(torch.tensor([-3.0, 0.0, 3.0, 0.2, -0.1]))
        gm.col_logits.copy_(torch.tensor([3.0, 0.0, -3.0, 0.4, 1.0, -0.3]))
    gm.eval()
    x = torch.randn(4, 6)
    z_r, z_c = gm.eval_gates()
    w = gm.base.weight + gm.lora_scale * gm.lora_B @ gm.lora_A
    want = z_r * ((x * z_c) @ w.T + gm.base.bias)
    torch.testing.assert_close(gm(x), want)
    wf, bf = gm.folded_weight_and_bias()
    torch.testing.assert_close(x @ wf.T + bf, want)


def test_keep_probs_range():
    gm = _layer()
    with torch.no_grad():
        gm.row_logits.copy_(torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0]))
    p_r, _ = gm.keep_probs()
    assert p_r[0].item() == pytest.approx(0.158655, abs=1e-5)  # Phi(-1)
    assert p_r[-1].item() == pytest.approx(0.998650, abs=1e-5)  # Phi(3)
    assert torch.all(p_r[1:] > p_r[:-1])


# -- injection -----------------------------------------------------------------------------


def test_default_targets_bert(tiny_bert_cls):
    names = inject_gates(tiny_bert_cls)
    assert len(names) == 12
    per_layer = [n.split("layer.0.", 1)[1] for n in names if ".layer.0." in n]
    assert per_layer == [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    assert isinstance(tiny_bert_cls.classifier, nn.Linear)
    assert isinstance(tiny_bert_cls.bert.pooler.dense, nn.Linear)
    assert isinstance(tiny_bert_cls.bert.embeddings.word_embeddings, nn.Embedding)


def test_default_targets_llama_and_all_linear(tiny_llama):
    from tests.support.tiny_models import build_tiny_llama

    names = inject_gates(tiny_llama)
    assert len(names) == 14
    assert {n.rsplit(".", 1)[1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert isinstance(tiny_llama.lm_head, nn.Linear)
    other = build_tiny_llama()
    assert inject_gates(other, "all-linear") == names  # everything but lm_head


def test_all_linear_bert_excludes_pooler_and_classifier(tiny_bert_cls):
    names = inject_gates(tiny_bert_cls, "all-linear")
    assert len(names) == 12
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_roberta_classifier_dense_never_gated():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(cfg)
    names = inject_gates(model)
    assert len(names) == 6
    assert isinstance(model.classifier.dense, nn.Linear)
    assert resolve_targets(RobertaForSequenceClassification(cfg), ["dense"]) == [
        "roberta.encoder.layer.0.attention.output.dense",
        "roberta.encoder.layer.0.intermediate.dense",
        "roberta.encoder.layer.0.output.dense",
    ]


def test_suffix_regex_and_unknown_patterns(tiny_bert_cls):
    assert len(resolve_targets(tiny_bert_cls, ["query", "value"])) == 4
    assert resolve_targets(tiny_bert_cls, [r".*layer\.1\.attention\.self\.key"]) == [
        "bert.encoder.layer.1.attention.self.key"
    ]
    with pytest.raises(ConfigError) as e:
        resolve_targets(tiny_bert_cls, ["query", "qeury"])
    assert e.value.field == "target_modules" and "qeury" in str(e.value)
    with pytest.raises(ConfigError):
        resolve_targets(tiny_bert_cls, ["classifier"])  # heads are never gated


def test_inject_is_idempotent_and_exact_at_init(tiny_bert_cls):
    x = _ids()
    ref = tiny_bert_cls(x).logits
    names = inject_gates(tiny_bert_cls)
    assert all(not gm.training for gm in gated_modules(tiny_bert_cls).values())
    assert torch.equal(tiny_bert_cls(x).logits, ref)  # gates start fully open
    assert inject_gates(tiny_bert_cls) == names
    assert not any(isinstance(gm.base, GatedLinear) for gm in gated_modules(tiny_bert_cls).values())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_remove_unfolded_restores_original_exactly(family):
    from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama

    model = build_tiny_bert_cls() if family == "bert" else build_tiny_llama()
    x = _ids()

    def out(m: nn.Module) -> torch.Tensor:
        return m(x).logits

    ref = out(model)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject_gates(model)
    _scramble_gates(model)
    assert not torch.allclose(out(model), ref)  # the gates do something
    remove_gates(model, fold=False)
    assert not gated_modules(model)
    assert torch.equal(out(model), ref)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m is originals[n]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fold_equals_gated_eval_forward(family):
    from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama

    model = build_tiny_bert_cls() if family == "bert" else build_tiny_llama()
    x = _ids()
    inject_gates(model, cfg=GateConfig(lora_rank=2))
    _scramble_gates(model, seed=3)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            gm.lora_B.normal_(0, 0.1)
    model.eval()
    gated = model(x).logits
    remove_gates(model, fold=True)
    assert not gated_modules(model)
    torch.testing.assert_close(model(x).logits, gated, atol=1e-5, rtol=1e-5)


# -- trainable modes ------------------------------------------------------------------------


def _one_step_changed(model: nn.Module, mode: str) -> tuple[set[str], set[str]]:
    trainable = set(configure_trainable(model, mode))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    x = _ids(4, 10)
    loss = torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([0, 1, 2, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return trainable, changed


def _bert_for_modes(lora: int = 0):
    from tests.support.tiny_models import build_tiny_bert_cls

    model = build_tiny_bert_cls()
    inject_gates(model, cfg=GateConfig(lora_rank=lora, noise_std=0.0))
    with torch.no_grad():
        for gm in gated_modules(model).values():
            gm.row_logits.zero_()  # off the clamp so the task loss reaches every gate
            gm.col_logits.zero_()
            if gm.lora_B is not None:
                gm.lora_B.normal_(0, 0.1)
    return model


def _expected(model: nn.Module, with_lora: bool) -> set[str]:
    # the task head: classifier + BERT's pooler (dense + tanh in front of it)
    out = {
        n
        for n, _ in model.named_parameters()
        if n.startswith("classifier.") or n.startswith("bert.pooler.")
    }
    for g, _gm in gated_modules(model).items():
        out |= {f"{g}.row_logits", f"{g}.col_logits", f"{g}.base.bias"}
        if with_lora:
            out |= {f"{g}.lora_A", f"{g}.lora_B"}
    return out


def test_mode_gates_changes_only_gates_head_biases():
    model = _bert_for_modes()
    trainable, changed = _one_step_changed(model, "gates")
    assert trainable == _expected(model, with_lora=False)
    assert changed == trainable


def test_mode_gates_lora_adds_only_lora():
    model = _bert_for_modes(lora=2)
    trainable, changed = _one_step_changed(model, "gates+lora")
    assert trainable == _expected(model, with_lora=True)
    assert changed == trainable
    assert not any(n.endswith("base.weight") for n in changed)


def test_mode_gates_weights_trains_everything():
    model = _bert_for_modes()
    trainable, changed = _one_step_changed(model, "gates+weights")
    assert trainable == {n for n, _ in model.named_parameters()}
    assert changed <= trainable
    for g in gated_modules(model):
        assert f"{g}.base.weight" in changed and f"{g}.row_logits" in changed
    assert "bert.embeddings.word_embeddings.weight" in changed


def test_mode_errors_and_newly_initialised_head(tiny_bert_cls):
    with pytest.raises(ConfigError):
        configure_trainable(tiny_bert_cls, "gates")  # nothing injected yet
    inject_gates(tiny_bert_cls)
    with pytest.raises(ConfigError) as e:
        configure_trainable(tiny_bert_cls, "lora")
    assert e.value.field == "trainable"
    with pytest.raises(ConfigError) as e:
        configure_trainable(tiny_bert_cls, "gates+lora")
    assert e.value.field == "lora_rank"
    names = configure_trainable(tiny_bert_cls, "gates", ["classifier", "bert.pooler"])
    assert "bert.pooler.dense.weight" in names
    groups = {g["name"]: g for g in param_groups(tiny_bert_cls, 1e-2, head_lr=1e-3)}
    assert any(p is tiny_bert_cls.bert.pooler.dense.weight for p in groups["head"]["params"])


def test_param_groups_names_lrs_and_decay():
    model = _bert_for_modes(lora=2)
    configure_trainable(model, "gates+lora")
    groups = param_groups(model, 1e-2, head_lr=1e-3, lora_lr=5e-4, weight_decay=0.01)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"gates", "head", "biases", "lora"}
    assert by["gates"]["lr"] == 1e-2 and by["gates"]["weight_decay"] == 0.0
    assert by["head"]["lr"] == 1e-3 and by["head"]["weight_decay"] == 0.01
    assert by["lora"]["lr"] == 5e-4
    assert len(by["gates"]["params"]) == 24 and len(by["biases"]["params"]) == 12
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    configure_trainable(model, "gates+weights")
    by = {g["name"]: g for g in param_groups(model, 1e-2, weight_lr=1e-5)}
    assert by["weights"]["lr"] == 1e-5


def test_trainable_state_dict_roundtrip(tiny_llama):
    inject_gates(tiny_llama, cfg=GateConfig(lora_rank=2))
    configure_trainable(tiny_llama, "gates", head_modules=[])
    sd = trainable_state_dict(tiny_llama)
    assert set(sd) == set(gate_state_dict(tiny_llama)) - {
        k for k in gate_state_dict(tiny_llama) if "lora" in k
    }
    assert all(k.endswith(("row_logits", "col_logits")) for k in sd)
    saved = {k: v.clone() + 1 for k, v in sd.items()}
    load_trainable_state_dict(tiny_llama, saved)
    assert all(torch.equal(trainable_state_dict(tiny_llama)[k], saved[k]) for k in saved)
    with pytest.raises(ConfigError):
        load_trainable_state_dict(tiny_llama, {"nope": torch.zeros(1)})


def test_default_targets_table_is_complete():
    from core.families import LAYOUTS, MODEL_TYPES

    assert set(DEFAULT_TARGETS) == set(LAYOUTS)
    assert {spec.layout.name for spec in MODEL_TYPES.values()} == set(LAYOUTS)
