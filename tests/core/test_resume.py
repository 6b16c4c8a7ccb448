"""Exact resume: 2N steps straight == N steps, stop, resume, N more steps (CPU)."""

from __future__ import annotations

import json
import random

import torch
from safetensors.torch import load_file

from core.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    prune_checkpoints,
    save_checkpoint,
)
from core.config import Hyperparameters, JobConfig


def _data(tmp_path):
    rng = random.Random(1)
    words = ["good", "great", "bad", "awful", "fine"]
    rows = [{"text": f"the film was {rng.choice(words)} and {rng.choice(words)}",
             "label": rng.choice(["a", "b"])} for _ in range(40)]  # fmt: skip
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


class StopAt:
    def __init__(self, n):
        self.n = n

    def on_step(self, r):
        return False if r.step == self.n else None

    def on_eval(self, r):
        return None

    def on_checkpoint(self, r):
        return None


def test_resume_is_exact(tiny_bert_dir, tmp_path):
    from core.train import train

    n = 4
    hp = Hyperparameters(max_steps=2 * n, batch_size=8, eval_interval=2, checkpoint_interval=2,
                         n_checkpoints=10, learning_rate=0.2, scheduler="linear",
                         warmup_steps=1, target_sparsity=0.3)  # fmt: skip
    job = JobConfig(model=str(tiny_bert_dir), training_file=str(_data(tmp_path)),
                    hyperparameters=hp)  # fmt: skip
    straight = train(job, tmp_path / "a", device="cpu")
    first = train(job, tmp_path / "b", callback=StopAt(n), device="cpu")
    assert first.status == "stopped" and first.steps == n
    resumed = train(job, tmp_path / "b", resume=True, device="cpu")
    assert straight.status == resumed.status == "completed" and resumed.steps == 2 * n

    sa = load_file(str(tmp_path / "a" / "checkpoints" / f"step-{2 * n}" / "trainable.safetensors"))
    sb = load_file(str(tmp_path / "b" / "checkpoints" / f"step-{2 * n}" / "trainable.safetensors"))
    assert sa.keys() == sb.keys()
    gate_keys = [k for k in sa if k.endswith("_logits")]
    assert gate_keys
    # the gates really moved during the second half, so equality is not vacuous
    mid = load_file(str(tmp_path / "b" / "checkpoints" / f"step-{n}" / "trainable.safetensors"))
    assert any(not torch.equal(mid[k], sb[k]) for k in gate_keys)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in mb] == [2, 4, 6, 8]
    for x, y in zip(ma, mb, strict=True):
        ja, jb = json.loads(x), json.loads(y)
        assert ja["measured_sparsity"] == jb["measured_sparsity"]
        assert abs(ja["eval_loss"] - jb["eval_loss"]) < 1e-5


def test_checkpoint_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": [model[0].bias], "lr": 0.1},
        {"params": [model[1].weight, model[1].bias], "lr": 0.01},
    ])  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    d = save_checkpoint(tmp_path / "checkpoints" / "step-3", model=model, optimizer=opt,
                        scheduler=sched, step=3, data_position={"epoch": 0, "micro_batch": 3},
                        objective_state={"offset": 0.25, "t": torch.tensor([1.0, 2.0])})  # fmt: skip
    files = sorted(p.name for p in d.iterdir())
    assert files == ["optimizer.safetensors", "rng.safetensors", "state.json",
                     "trainable.safetensors"]  # fmt: skip
    expected_next = torch.rand(3)

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model2[0].weight.requires_grad_(False)
    opt2 = torch.optim.AdamW([
        {"params": [model2[0].bias], "lr": 0.5},
        {"params": [model2[1].weight, model2[1].bias], "lr": 0.5},
    ])  # fmt: skip
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    st = load_checkpoint(d, model=model2, optimizer=opt2, scheduler=sched2)
    assert st["step"] == 3 and st["data_position"] == {"epoch": 0, "micro_batch": 3}
    assert st["objective"]["offset"] == 0.25
    torch.testing.assert_close(st["objective"]["t"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(torch.rand(3), expected_next)  # RNG restored
    torch.testing.assert_close(model2[1].weight, model[1].weight)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.last_epoch == sched.last_epoch
    p, p2 = model[1].weight, model2[1].weight
    torch.testing.assert_close(opt2.state[p2]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    # and the flat form round-trips onto a third optimizer directly
    t, meta = optimizer_to_flat(opt, model)
    optimizer_from_flat(opt2, model2, t, meta)
    torch.testing.assert_close(opt2.state[p2]["exp_avg"], opt.state[p]["exp_avg"])


def test_prune_keeps_last_n_and_best(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 5):
        (root / f"step-{s}").mkdir(parents=True)
        (root / f"step-{s}" / "state.json").write_text("{}")
    (root / ".step-6-tmp").mkdir()  # an interrupted write is never listed
    prune_checkpoints(root, keep_last=2, keep={2})
    assert [s for s, _ in list_checkpoints(root)] == [2, 4, 5]


def _lm_data(tmp_path):
    rng = random.Random(2)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(30))} for _ in range(60)]
    p = tmp_path / "lm.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_resume_is_exact_with_every_lever_on(tiny_bert_dir, tiny_llama_dir, tmp_path):
    """Head gates, importance init, compensation, distillation and recovery, across an
    epoch boundary, for a classifier (gates+lora) and a sparsify run."""
    from core.train import train

    n = 4
    levers = {"head_gates": True, "importance_init": "flap", "compensation": True,
              "distillation": 0.5, "recovery": True, "sparsity_tolerance": 0.5,
              "calibration_batches": 2}  # fmt: skip
    for name, model_dir, data, task in (
        ("cls", tiny_bert_dir, _data(tmp_path), "classification"),
        ("lm", tiny_llama_dir, _lm_data(tmp_path), "sparsify"),
    ):
        hp = Hyperparameters(max_steps=2 * n, batch_size=8, eval_interval=2,
                             checkpoint_interval=2, n_checkpoints=10, learning_rate=0.2,
                             target_sparsity=0.3, sparsity_warmup_ratio=0.0, max_length=16,
                             **levers)  # type: ignore[arg-type]  # fmt: skip
        job = JobConfig(model=str(model_dir), training_file=str(data), task=task,
                        hyperparameters=hp)  # fmt: skip
        a, b = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
        straight = train(job, a, device="cpu")
        first = train(job, b, callback=StopAt(n), device="cpu")
        assert first.status == "stopped"
        resumed = train(job, b, resume=True, device="cpu")
        assert straight.status == resumed.status == "completed"
        sa = load_file(str(a / "checkpoints" / f"step-{2 * n}" / "trainable.safetensors"))
        sb = load_file(str(b / "checkpoints" / f"step-{2 * n}" / "trainable.safetensors"))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
        ck = json.loads((b / "checkpoints" / f"step-{2 * n}" / "state.json").read_text())
        assert ck["extra"]["recovering_since"] is not None  # recovery really started
        cfg = json.loads((a / "config.json").read_text())
        assert cfg["calibration"]["calibrated"] and cfg["calibration"]["compensated"]
        ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ma] == [r["step"] for r in mb]
        for x, y in zip(ma, mb, strict=True):
            assert x["measured_sparsity"] == y["measured_sparsity"]
            assert abs(x["eval_loss"] - y["eval_loss"]) < 1e-5
