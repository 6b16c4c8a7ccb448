"""Job config validation: every bad value names its field and the allowed range."""

from __future__ import annotations

import json

import pytest

from core.config import Hyperparameters, JobConfig
from core.errors import ConfigError


@pytest.mark.parametrize(
    ("task", "trainable", "distillation"),
    [
        ("classification", "gates+lora", 0.0),
        ("causal_lm", "gates+lora", 0.5),
        ("sparsify", "gates", 0.5),
    ],
)
def test_auto_levers_resolve_per_task(task, trainable, distillation):
    hp = Hyperparameters().resolve(1000, task)
    assert hp.trainable == trainable
    assert hp.distillation == distillation
    # an explicit choice is kept
    assert Hyperparameters(trainable="gates").resolve(1000, task).trainable == "gates"


def test_calibration_needed_by_importance_init():
    with pytest.raises(ConfigError) as e:
        Hyperparameters(calibration_batches=0)
    assert e.value.field == "calibration_batches"
    assert Hyperparameters(calibration_batches=0, importance_init="none").calibration_batches == 0


def test_defaults_follow_method_md():
    hp = Hyperparameters()
    assert hp.target_sparsity == 0.4
    assert hp.sparsity_weight == 50.0
    assert hp.gate_noise_std == 0.1
    assert hp.gate_init_mean == 1.0 and hp.gate_init_std == 0.1
    assert hp.weight_decay == 0.0
    assert hp.seed == 1948
    assert hp.objective == "calibrated"
    assert hp.trainable == "auto"
    assert hp.head_gates is True and hp.importance_init == "flap"
    assert hp.compensation is False and hp.recovery is False
    assert hp.n_epochs == "auto" and hp.batch_size == "auto" and hp.learning_rate == "auto"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("target_sparsity", 1.5, "[0.0, 0.95]"),
        ("target_sparsity", -0.1, "[0.0, 0.95]"),
        ("sparsity_weight", -1, "[0.0,"),
        ("batch_size", 0, "[1, 4096]"),
        ("n_epochs", 2.5, "integer"),
        ("learning_rate", "fast", "got 'fast'"),
        ("trainable", "everything", "'gates', 'gates+lora', 'gates+weights'"),
        ("importance_init", "magic", "'flap', 'wanda', 'none'"),
        ("distillation", -1, "[0.0, 100.0]"),
        ("head_gates", "maybe", "true or false"),
        ("objective", "l0", "'calibrated', 'paper'"),
        ("kurtosis", "maybe", "true or false"),
        ("gate_noise_std", float("nan"), "finite"),
        ("target_sparsity", "auto", "not allowed"),
        ("max_steps", True, "got True"),
        ("targets", [], "all-linear"),
    ],
)
def test_invalid_values_name_the_field(name, value, fragment):
    with pytest.raises(ConfigError) as ei:
        Hyperparameters.from_dict({name: value})
    assert ei.value.field == name
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(f"{name}: ")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError) as ei:
        Hyperparameters.from_dict({"learning_rat": 0.1})
    assert ei.value.field == "learning_rat"
    assert "learning_rate" in ei.value.reason and "target_sparsity" in ei.value.reason


def test_strings_from_the_command_line_are_coerced():
    hp = Hyperparameters.from_dict(
        {"batch_size": "16", "learning_rate": "1e-3", "kurtosis": "true", "n_epochs": "AUTO"}
    )
    assert hp.batch_size == 16 and hp.learning_rate == 1e-3 and hp.kurtosis is True
    assert hp.n_epochs == "auto"


def test_resolve_replaces_every_auto():
    hp = Hyperparameters().resolve(n_train=100, task="classification")
    assert hp.is_resolved()
    assert hp.batch_size == 32 and hp.max_length == 128
    # 100 rows / 32 = 4 steps per epoch -> auto epochs aim at >= 600 steps, capped at 20
    assert hp.n_epochs == 20
    lm = Hyperparameters(max_steps=50).resolve(n_train=10_000, task="sparsify")
    assert lm.batch_size == 8 and lm.max_length == 512 and lm.eval_interval == 5
    assert lm.checkpoint_interval == lm.eval_interval


def test_jobconfig_round_trip_and_errors(tmp_path):
    cfg = JobConfig(
        model="minilm-l6",
        training_file="a.jsonl",
        task="classification",
        hyperparameters=Hyperparameters(target_sparsity=0.2, max_steps=10),
        seed=7,
    )
    p = tmp_path / "job.json"
    cfg.save(p)
    back = JobConfig.load(p)
    assert back.to_dict() == cfg.to_dict()
    assert back.effective_seed == 7
    assert json.loads(p.read_text())["hyperparameters"]["target_sparsity"] == 0.2

    with pytest.raises(ConfigError) as ei:
        JobConfig.from_dict({"model": "x", "training_file": "a", "task": "translate"})
    assert ei.value.field == "task"
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_dict({"model": "x"})
    assert ei.value.field == "training_file"
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_dict({"model": "x", "training_file": "a", "hyperparameters": {"lr": 1}})
    assert ei.value.field == "lr"


def test_sparsity_ramp_auto_depends_on_objective_and_focus_is_a_validated_bool():
    assert Hyperparameters().sparsity_focus is True
    cal = Hyperparameters(sparsity_warmup_ratio="auto").resolve(1000, "classification")
    paper = Hyperparameters(objective="paper").resolve(1000, "classification")
    assert cal.sparsity_warmup_ratio == 0.3 and paper.sparsity_warmup_ratio == 0.0
    assert (
        Hyperparameters(sparsity_warmup_ratio=0.1)
        .resolve(10, "classification")
        .sparsity_warmup_ratio
        == 0.1
    )
    assert Hyperparameters(sparsity_focus="off").sparsity_focus is False
    with pytest.raises(ConfigError) as e:
        Hyperparameters(sparsity_focus="maybe")
    assert e.value.field == "sparsity_focus"
