"""The training loop on tiny random models: trainable sets, sparsity, stop, run-dir layout."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from core.config import Hyperparameters, JobConfig
from core.errors import ConfigError
from core.gates import GateConfig, gated_modules, inject_gates
from core.metrics import classification_metrics, perplexity, regression_metrics
from core.train import load_gated_run, train

WORDS = {"good": "positive", "great": "positive", "bad": "negative", "awful": "negative",
         "fine": "neutral", "okay": "neutral"}  # fmt: skip


def _cls_file(tmp_path, n=32, regression=False):
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        w = rng.choice(sorted(WORDS))
        lab = (
            {"positive": 1.0, "neutral": 0.5, "negative": 0.0}[WORDS[w]] if regression else WORDS[w]
        )
        rows.append({"text": f"the movie was {w}", "label": lab})
    p = tmp_path / ("reg.jsonl" if regression else "cls.jsonl")
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _job(model_dir, data, **hp):
    base = {"batch_size": 8, "eval_interval": 100, "max_steps": 2}
    base.update(hp)
    return JobConfig(model=str(model_dir), training_file=str(data),
                     hyperparameters=Hyperparameters(**base))  # fmt: skip


def _fresh_gates(model_dir, seed=1948):
    """The gate init a run starts from (inject_gates is seeded by the job seed)."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    inject_gates(m, None, GateConfig(seed=seed))
    return {f"{n}.row_logits": g.row_logits.detach().clone() for n, g in gated_modules(m).items()}


@pytest.mark.parametrize("mode", ["gates", "gates+lora", "gates+weights"])
def test_only_intended_params_change(tiny_bert_dir, tmp_path, mode):
    data = _cls_file(tmp_path)
    res = train(_job(tiny_bert_dir, data, trainable=mode, lora_rank=4), tmp_path / "run")
    assert res.status == "completed" and res.steps == 2
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "gated_state.safetensors"))
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors"))

    def changed(name_in_final, name_in_base):
        return not torch.equal(final[name_in_final], base[name_in_base])

    q = "bert.encoder.layer.0.attention.self.query"
    emb = "bert.embeddings.word_embeddings.weight"
    ln = "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    # gates moved away from their seeded init
    init = _fresh_gates(tiny_bert_dir)
    assert not torch.equal(final[f"{q}.row_logits"], init[f"{q}.row_logits"])
    # the gated layer's bias and the head train in every mode
    assert changed(f"{q}.base.bias", f"{q}.bias")
    assert changed("classifier.weight", "classifier.weight")
    weights_move = mode == "gates+weights"
    assert changed(f"{q}.base.weight", f"{q}.weight") == weights_move
    assert changed(emb, emb) == weights_move
    assert changed(ln, ln) == weights_move
    has_lora = f"{q}.lora_B" in final
    assert has_lora == (mode == "gates+lora")
    if has_lora:
        assert final[f"{q}.lora_B"].abs().sum() > 0  # B starts at zero
    # checkpoints hold only the trainable tensors
    assert (emb in ckpt) == weights_move
    assert f"{q}.row_logits" in ckpt and "classifier.weight" in ckpt


def test_measured_sparsity_rises_and_run_dir_layout(tiny_bert_dir, tmp_path):
    data = _cls_file(tmp_path)
    job = _job(tiny_bert_dir, data, max_steps=20, eval_interval=5, learning_rate=0.1,
               scheduler="constant", target_sparsity=0.3)  # fmt: skip
    res = train(job, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert {"step", "accuracy", "f1", "mcc", "measured_sparsity", "eval_loss"} <= set(r)
        assert set(r["sparsity_by_type"]) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
        assert r["gated_params"] > 0
    assert rows[0]["measured_sparsity"] == 0.0  # gates start saturated open
    assert rows[-1]["measured_sparsity"] > 0.1
    assert res.measured_sparsity is not None
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "result.json", "final/gated_model.json",
              "final/gated_state.safetensors", "tokenizer/tokenizer_config.json"):  # fmt: skip
        assert (run / f).is_file(), f
    info = json.loads((run / "final" / "gated_model.json").read_text())
    assert info["task"] == "classification" and info["family"] == "bert"
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert info["base_model"] == str(tiny_bert_dir)
    assert len(info["gated_modules"]) == 12  # 2 layers x q, k, v, o, intermediate, output


def test_load_gated_run_rebuilds_the_final_state(tiny_bert_dir, tmp_path):
    data = _cls_file(tmp_path)
    train(_job(tiny_bert_dir, data, max_steps=3, learning_rate=0.1), tmp_path / "run")
    model, tok, info = load_gated_run(tmp_path / "run")
    assert not model.training
    # target not reached in 3 steps -> final/ is the last state == the last checkpoint
    assert info["target_reached"] is False
    ck = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for k, v in ck.items():
        torch.testing.assert_close(params[k].detach(), v, rtol=0, atol=0)
    enc = tok(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        a = model(**enc).logits
        b = model(**enc).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval gates are deterministic


def test_callback_false_stops_cleanly_after_a_checkpoint(tiny_bert_dir, tmp_path):
    seen = []

    class Stop:
        def on_step(self, r):
            seen.append(r)
            return False if r.step == 2 else None

        def on_eval(self, r):
            return None

        def on_checkpoint(self, r):
            seen.append(r)

    data = _cls_file(tmp_path)
    res = train(_job(tiny_bert_dir, data, max_steps=6), tmp_path / "run", callback=Stop())
    assert res.status == "stopped" and res.steps == 2 and res.final_dir is None
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "state.json").is_file()
    step_recs = [r for r in seen if hasattr(r, "task_loss")]
    assert [r.step for r in step_recs] == [1, 2]
    assert step_recs[0].total_steps == 6 and step_recs[0].examples_per_second > 0
    assert step_recs[1].eta_seconds is not None and step_recs[1].tokens > step_recs[0].tokens


def test_regression_reports_pearson_and_spearman(tiny_bert_dir, tmp_path):
    data = _cls_file(tmp_path, regression=True)
    train(_job(tiny_bert_dir, data, max_steps=2, eval_interval=2), tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"pearson", "spearman", "measured_sparsity"} <= set(row)
    info = json.loads((tmp_path / "run" / "final" / "gated_model.json").read_text())
    assert info["problem_type"] == "regression" and info["labels"] is None


def test_chat_causal_lm_reports_perplexity(tiny_llama_dir, tmp_path):
    chat = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    p = tmp_path / "chat.jsonl"
    p.write_text((json.dumps(chat) + "\n") * 8)
    res = train(_job(tiny_llama_dir, p, max_steps=2, eval_interval=2, batch_size=4), tmp_path / "r")
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["perplexity"] > 1.0 and "measured_sparsity" in row
    assert res.status == "completed"
    info = json.loads((tmp_path / "r" / "final" / "gated_model.json").read_text())
    assert info["task"] == "causal_lm" and info["family"] == "llama"
    assert len(info["gated_modules"]) == 14  # 2 layers x q, k, v, o, gate, up, down


def test_sparsify_refuses_non_gate_training(tiny_llama_dir, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "some plain text"}) + "\n")
    job = _job(tiny_llama_dir, p, trainable="gates+weights")
    job.task = "sparsify"
    with pytest.raises(ConfigError) as ei:
        train(job, tmp_path / "r")
    assert ei.value.field == "trainable"


def test_metrics_on_known_inputs():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # macro over classes 0 and 1
    assert m["mcc"] == pytest.approx(1 / 3**0.5)
    r = regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0])
    assert r["spearman"] == pytest.approx(1.0)
    assert r["pearson"] == pytest.approx(11.5 / (5 * 26.75) ** 0.5)  # by hand
    assert perplexity(2.0 * 10, 10) == pytest.approx(torch.e**2)
    assert regression_metrics([1.0, 1.0], [0.0, 1.0])["pearson"] == 0.0  # constant: no NaN


def _lm_text(tmp_path, n=64):
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    p = tmp_path / "lm.jsonl"
    p.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                         for _ in range(n)))  # fmt: skip
    return p


@pytest.mark.parametrize("task", ["causal_lm", "sparsify"])
def test_lm_job_reaches_its_target_and_starts_with_a_dense_evaluation(
    tiny_llama_dir, tmp_path, task
):
    job = _job(tiny_llama_dir, _lm_text(tmp_path), max_steps=150, eval_interval=10,
               target_sparsity=0.3, max_length=32)  # fmt: skip
    job.task = task
    res = train(job, tmp_path / "r", device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["step"] == 0 and first["dense"] is True and first["measured_sparsity"] == 0.0
    assert first["perplexity"] > 1.0
    assert res.target_reached and abs(res.measured_sparsity - 0.3) <= 0.03
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["config"]["hyperparameters"]["distillation"] == 0.5  # "auto" for LM tasks
    assert cfg["calibration"]["calibrated"] is True


def test_compensated_run_reloads_with_its_means_and_head_groups(tiny_llama_dir, tmp_path):
    job = _job(tiny_llama_dir, _lm_text(tmp_path, 24), max_steps=4, eval_interval=2,
               target_sparsity=0.3, compensation=True, max_length=32)  # fmt: skip
    job.task = "sparsify"
    train(job, tmp_path / "r", device="cpu")
    info = json.loads((tmp_path / "r" / "final" / "gated_model.json").read_text())
    assert info["compensated"] and info["column_groups"]
    model, _, _ = load_gated_run(tmp_path / "r")
    gms = gated_modules(model)
    assert all(gms[n].comp_mean is not None for n in info["compensated"])
    assert all(gms[n].col_group == g for n, g in info["column_groups"].items())
    (tmp_path / "r" / "final" / "compensation.safetensors").unlink()
    with pytest.raises(Exception, match="compensation.safetensors"):
        load_gated_run(tmp_path / "r")
