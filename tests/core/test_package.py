"""The packaging pipeline: the artifact is complete and fully hashed before it becomes
visible, optional phases degrade to warnings, and nothing half-written is ever left."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import core.package as package
from core.artifacts import load_artifact, read_manifest, sha256_file
from core.errors import ArtifactError, PruningError
from core.package import PackageEvent, build_artifact, rebuild_artifact
from tests.support.artifacts import bert_run
from tests.support.prune_fixtures import close_rows, gate
from tests.support.tiny_models import build_tiny_bert_cls

FAST = {"shapes": ((1, 8),), "runs": 1, "warmup": 0}


class Abort(BaseException):
    """Not an Exception: stands for a kill mid-build that no phase may swallow."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    model = gate(build_tiny_bert_cls(seed=0))
    for lyr in model.bert.encoder.layer:  # the same FFN cut in every layer: an hf/ copy too
        close_rows(lyr.intermediate.dense, range(0, 64, 4))
    root = tmp_path_factory.mktemp("pkg")
    return bert_run(root / "run", model, root / "tok")


def _files_on_disk(art: Path) -> dict[str, str]:
    return {
        p.relative_to(art).as_posix(): sha256_file(p)
        for p in sorted(art.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _listed(art: Path) -> dict[str, str]:
    return {k: v["sha256"] for k, v in read_manifest(art).files.items()}


def test_build_publishes_a_complete_artifact_with_every_file_hashed(run_dir, tmp_path):
    events: list[PackageEvent] = []
    res = build_artifact(run_dir, tmp_path / "art", on_event=events.append, **FAST)
    art = tmp_path / "art"
    assert res.path == art.absolute()
    on_disk = _files_on_disk(art)
    assert on_disk == _listed(art)  # every file, and only those, with its real hash
    assert {"model.safetensors", "model.onnx", "report.json", "hf/model.safetensors"} <= set(
        on_disk
    )
    assert [(e.phase, e.level) for e in events] == [
        ("prune", "info"),
        ("prune", "info"),
        ("onnx", "info"),
        ("onnx", "info"),
        ("onnx", "info"),  # model.int8.onnx
        ("report", "info"),
        ("report", "info"),
    ]
    # each phase opens with an event naming it (the job's progress.phase), the report's
    # with an estimate of how long the measurement takes
    opened = [e.data for e in events if e.data and "phase" in e.data]
    assert [d["phase"] for d in opened] == ["pruning", "exporting", "measuring"]
    assert opened[2]["eta_seconds"] is not None and opened[2]["eta_seconds"] >= 0
    assert json.loads((art / "report.json").read_text()) == json.loads(
        json.dumps(res.report, default=str)
    )
    assert {r["backend"] for r in res.report["latency"]} == {"torch", "onnxruntime"}
    assert res.formats == ["safetensors", "onnx", "onnx-int8"]
    assert res.size_bytes == sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
    summary = res.summary()
    assert summary["gated_params_after"] < summary["gated_params_before"]
    assert summary["latency"] and "flop_ideal_ratio" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging left behind
    la = load_artifact(art)
    assert la.manifest["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert la.manifest.labels() == ["negative", "neutral", "positive"]
    assert la.manifest.problem_type == "single_label_classification"
    # names only: the manifest is served to tenants, so no absolute server paths
    assert la.manifest.source_run == run_dir.resolve().name
    text = (art / "manifest.json").read_text()
    assert str(run_dir.resolve().parent) not in text and str(tmp_path) not in text


def test_artifact_is_invisible_until_complete(run_dir, tmp_path, monkeypatch):
    """While the last phase runs, the destination does not exist yet, and the staging
    folder beside it already holds the earlier phases' files."""
    dest = tmp_path / "art"
    seen: dict[str, Any] = {}
    real = package.compression_report

    def watching(model, manifest, stage, **kw):
        seen["dest_exists"] = dest.exists()
        seen["stage"] = Path(stage)
        seen["stage_files"] = sorted(p.name for p in Path(stage).iterdir())
        return real(model, manifest, stage, **kw)

    monkeypatch.setattr(package, "compression_report", watching)
    build_artifact(run_dir, dest, **FAST)
    assert seen["dest_exists"] is False
    assert seen["stage"].parent == tmp_path.absolute() and seen["stage"].name.startswith(".art")
    assert {"model.safetensors", "model.onnx", "manifest.json"} <= set(seen["stage_files"])
    assert not seen["stage"].exists()  # renamed into place
    assert "report.json" in _listed(dest)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_in_the_report_phase_leaves_no_half_written_artifact(
    run_dir, tmp_path, monkeypatch, existing
):
    dest = tmp_path / "art"
    before: dict[str, str] = {}
    if existing:
        build_artifact(run_dir, dest, onnx=False, report=False)
        before = _files_on_disk(dest)

    def killed(*a: Any, **k: Any) -> None:
        raise Abort()

    monkeypatch.setattr(package, "compression_report", killed)
    with pytest.raises(Abort):
        build_artifact(run_dir, dest, **FAST)
    if existing:  # the previous artifact, whole and untouched
        assert _files_on_disk(dest) == before == _listed(dest)
        assert "model.onnx" not in before
    else:
        assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["art"] if existing else [])


def test_a_failing_report_is_a_warning_and_the_artifact_is_published_without_it(
    run_dir, tmp_path, monkeypatch
):
    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("no timer")

    monkeypatch.setattr(package, "compression_report", broken)
    events: list[PackageEvent] = []
    res = build_artifact(run_dir, tmp_path / "art", on_event=events.append, **FAST)
    assert res.report is None and res.formats == ["safetensors", "onnx", "onnx-int8"]
    assert [(e.phase, e.level) for e in events][-1] == ("report", "warning")
    assert events[-1].message == "Compression report skipped: RuntimeError: no timer"
    assert res.warnings == [events[-1].message]
    assert not (tmp_path / "art" / "report.json").exists()
    assert _files_on_disk(tmp_path / "art") == _listed(tmp_path / "art")
    assert "latency" not in res.summary()


def test_a_failing_onnx_export_leaves_the_report_on_torch_only(run_dir, tmp_path, monkeypatch):
    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(package, "export_onnx", broken)
    events: list[PackageEvent] = []
    res = build_artifact(run_dir, tmp_path / "art", on_event=events.append, **FAST)
    assert [(e.phase, e.level) for e in events if not (e.data and "phase" in e.data)] == [
        ("prune", "info"),
        ("onnx", "warning"),
        ("report", "info"),
    ]
    assert res.formats == ["safetensors"]
    assert {r["backend"] for r in res.report["latency"]} == {"torch"}
    assert "model.onnx" not in _listed(tmp_path / "art")


def test_a_pruning_failure_raises_and_publishes_nothing(tmp_path):
    events: list[PackageEvent] = []
    (tmp_path / "run").mkdir()
    with pytest.raises(PruningError, match=r"pruning the trained model failed \(TrainingError"):
        build_artifact(tmp_path / "run", tmp_path / "art", on_event=events.append)
    assert [(e.phase, e.level, e.message) for e in events] == [
        ("prune", "info", "Pruning the gated model"),
        ("prune", "error", "Pruning traceback"),
    ]
    assert "gated_model.json missing" in events[1].data["traceback"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_rebuilds_in_place_with_a_rehashed_manifest(run_dir, tmp_path):
    art = tmp_path / "art"
    build_artifact(run_dir, art, onnx=False, report=False)
    (art / "notes.txt").write_text("not part of the artifact")  # unlisted: not carried
    before = _listed(art)
    rebuild_artifact(art, onnx=True)
    after = _listed(art)
    assert set(after) == set(before) | {"model.onnx", "model.int8.onnx"}
    assert {k: after[k] for k in before} == before
    assert _files_on_disk(art) == after
    ids = torch.randint(3, 100, (2, 7))
    from core.onnx_export import OnnxRunner

    with torch.no_grad():
        ref = load_artifact(art).model(ids)
    torch.testing.assert_close(OnnxRunner(art / "model.onnx")(ids), ref, atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_rebuild_refuses_a_tampered_artifact_and_leaves_it_as_it_was(run_dir, tmp_path):
    art = tmp_path / "art"
    build_artifact(run_dir, art, onnx=False, report=False)
    w = art / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}
    with pytest.raises(ArtifactError, match="model.safetensors: sha256 mismatch"):
        rebuild_artifact(art, onnx=True)
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_rebuild_can_write_a_new_directory(run_dir, tmp_path):
    build_artifact(run_dir, tmp_path / "a", onnx=False, report=False)
    res = rebuild_artifact(tmp_path / "a", tmp_path / "b", report=True, backends=("torch",), **FAST)
    assert "report.json" not in _listed(tmp_path / "a")
    assert _files_on_disk(tmp_path / "b") == _listed(tmp_path / "b")
    assert res.report is not None and "report.json" in _listed(tmp_path / "b")


def test_a_failing_publish_is_a_pruning_error_and_keeps_the_old_artifact(
    run_dir, tmp_path, monkeypatch
):
    dest = tmp_path / "art"
    build_artifact(run_dir, dest, onnx=False, report=False)
    before = _files_on_disk(dest)

    def full(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(package, "publish", full)
    with pytest.raises(PruningError, match=r"publishing the pruned artifact failed \(OSError"):
        build_artifact(run_dir, dest, **FAST)
    assert _files_on_disk(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
