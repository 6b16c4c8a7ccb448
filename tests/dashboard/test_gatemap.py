"""core.gatemap on tiny models with hand-closed gates, and the snapshot the loop records.

Tiny BERT: 2 layers, 4 heads x 8, intermediate 64. Tiny Llama: 2 layers, 6 query heads in
2 KV groups ({0,1,2}, {3,4,5}) x 8, intermediate 64.
"""

from __future__ import annotations

import json

import torch

from core import gatemap
from core.callbacks import EvalRecord
from core.config import Hyperparameters, JobConfig
from core.gates import gated_modules, inject_gates
from core.structure import build_plan, describe
from core.train import train
from tests.support.tiny_models import build_tiny_bert_cls, build_tiny_llama


def _open(model):
    inject_gates(model)
    with torch.no_grad():
        for gm in gated_modules(model).values():
            gm.row_logits.fill_(3.0)
            gm.col_logits.fill_(3.0)
    return model


def _close_rows(model, name, rows):
    with torch.no_grad():
        for i in rows:
            model.get_submodule(name).row_logits[i] = -3.0


def test_bert_heads_and_neurons_kept_per_layer():
    model = _open(build_tiny_bert_cls())
    S = describe(model)
    _close_rows(model, S.layers[0].v, range(8, 16))  # all v rows of head 1: head 1 is dead
    _close_rows(model, S.layers[1].ffn_in[0], range(16))  # FFN neurons 0..15 of layer 1
    g = gatemap.from_model(model, step=7)
    assert (g["source"], g["step"], g["num_heads"], g["intermediate_size"]) == ("eval", 7, 4, 64)
    l0, l1 = g["layers"]
    assert l0["heads_kept"] == [0, 2, 3] and l0["heads"] == {"kept": 3, "total": 4}
    assert l0["ffn"] == {"kept": 64, "total": 64} and l0["ffn_bins"] == [1.0] * 32
    assert l1["heads"] == {"kept": 4, "total": 4}
    assert l1["ffn"] == {"kept": 48, "total": 64}
    assert l1["ffn_bins"] == [0.0] * 8 + [1.0] * 24  # 32 slices of 2 neurons
    assert l0["qk_dims"] == {"kept": 8, "total": 8} and l0["vo_dims"] == {"kept": 8, "total": 8}
    assert g["totals"]["heads"] == {"kept": 7, "total": 8}
    assert g["totals"]["ffn"] == {"kept": 112, "total": 128}
    plan = build_plan(model)
    assert g["totals"]["removed_fraction"] == round(plan.removed_fraction(), 6) > 0
    json.dumps(g)  # JSON-able as stored


def test_from_plan_dict_matches_the_model_and_gqa_groups():
    model = _open(build_tiny_llama())
    S = describe(model)
    _close_rows(model, S.layers[1].v, range(8, 16))  # KV group 1 (query heads 3, 4, 5)
    live = gatemap.from_model(model)
    final = gatemap.from_plan(json.loads(build_plan(model).to_json()))  # as in a manifest
    assert final["source"] == "plan"
    assert final["layers"] == live["layers"]
    l1 = final["layers"][1]
    assert l1["heads_kept"] == [0, 1, 2] and l1["kv_heads_kept"] == [0]
    assert l1["kv_heads"] == {"kept": 1, "total": 2} and l1["heads"] == {"kept": 3, "total": 6}


def test_old_dict_plan_takes_totals_from_elsewhere_and_bins_cover_odd_sizes():
    plan = {
        "family": "bert",
        "layers": [
            {"index": 0, "heads_kept": [1], "kv_heads_kept": [1], "qk_dims": [[0, 1]],
             "vo_dims": [[0, 1, 2]], "ffn_kept": [0, 1, 2, 9]}
        ],
        "gated_params_before": 100,
        "gated_params_after": 40,
    }  # fmt: skip
    g = gatemap.from_plan(
        plan, bins=4, totals={"num_heads": 2, "head_dim": 4, "intermediate_size": 10}
    )
    (layer,) = g["layers"]
    assert layer["heads"] == {"kept": 1, "total": 2}
    assert layer["qk_dims"] == {"kept": 2, "total": 4} and layer["vo_dims"]["kept"] == 3
    assert layer["ffn_bins"] == [1.0, 0.3333, 0.0, 0.3333]  # slices of 2, 3, 2, 3 neurons
    assert g["totals"]["removed_fraction"] == 0.6


def test_training_eval_records_carry_the_map(tiny_bert_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"it was {w}", "label": w}) + "\n" for w in ["good", "bad"] * 12
        )
    )
    seen: list[EvalRecord] = []

    class Collect:
        def on_step(self, r):
            return None

        def on_eval(self, r):
            seen.append(r)

        def on_checkpoint(self, r):
            return None

    hp = Hyperparameters(batch_size=8, max_steps=2, eval_interval=1)
    train(JobConfig(model=str(tiny_bert_dir), training_file=str(data), hyperparameters=hp),
          tmp_path / "run", callback=Collect())  # fmt: skip
    assert seen and all(r.gates is not None for r in seen)
    g = seen[-1].gates
    assert g["step"] == seen[-1].step and len(g["layers"]) == 2
    assert g["layers"][0]["heads"]["total"] == 4
