"""ONNX export parity (1e-4) with dynamic batch/sequence axes, and adding it to an artifact."""

from __future__ import annotations

import onnx
import pytest
import torch

from core.artifacts import load_artifact, save_artifact
from core.onnx_export import OnnxRunner, export_onnx
from core.package import rebuild_artifact
from core.prune import prune_model
from tests.support.prune_fixtures import apply_pattern, reference_plan
from tests.support.tiny_models import build_bert_tokenizer, build_tiny_bert_cls, build_tiny_llama


def _pruned(family: str):
    build = build_tiny_bert_cls if family == "bert" else build_tiny_llama
    model = apply_pattern(build(seed=0), "heads", seed=2)
    return prune_model(model, reference_plan(model))[0]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_onnx_parity_dynamic_shapes(tmp_path, family):
    pm = _pruned(family)
    path = export_onnx(pm, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]  # not fixed sizes
    runner = OnnxRunner(path)
    gen = torch.Generator().manual_seed(1)
    for B, T in [(1, 5), (4, 23)]:  # shapes different from the export example (2, 8)
        ids = torch.randint(3, 100, (B, T), generator=gen)
        mask = torch.ones_like(ids)
        if family == "bert":
            mask[-1, T - 3 :] = 0
        else:
            mask[-1, :2] = 0  # left padding
        with torch.no_grad():
            ref = pm(ids, mask)
        out = runner(ids, mask)
        assert out.shape == ref.shape
        if family == "llama":
            keep = mask.bool()
            out, ref = out[keep], ref[keep]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_export_artifact_adds_hashed_onnx(tmp_path):
    pm = _pruned("bert")
    save_artifact(pm, build_bert_tokenizer(tmp_path / "tok"), tmp_path / "a", task="classification")
    rebuild_artifact(tmp_path / "a", onnx=True)
    la = load_artifact(tmp_path / "a")  # hash list now includes model.onnx, still verifies
    assert "model.onnx" in la.manifest["files"]
    ids = torch.randint(3, 100, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            OnnxRunner(tmp_path / "a" / "model.onnx")(ids), la.model(ids), atol=1e-4, rtol=0
        )
