"""The run directory format: its version is written, checked on every read, and an
unknown one is refused with a message naming the directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import Hyperparameters, JobConfig
from core.errors import RunDirError
from core.rundir import RUN_FORMAT_VERSION, RunDir, TrainResult, load_gated_run
from tests.support.artifacts import bert_run
from tests.support.prune_fixtures import apply_pattern
from tests.support.tiny_models import build_tiny_bert_cls


def _newer(root: Path) -> None:
    (root / "format.json").write_text(
        json.dumps({"format": "finegates-run", "format_version": RUN_FORMAT_VERSION + 1})
    )


def test_prepare_writes_the_version_and_a_legacy_dir_reads_as_version_1(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    assert json.loads((tmp_path / "run" / "format.json").read_text()) == {
        "format": "finegates-run",
        "format_version": 1,
    }
    (tmp_path / "old").mkdir()  # written before the version file existed
    assert RunDir(tmp_path / "old").format_version() == 1
    assert RunDir(tmp_path / "old").read_result() is None


def test_a_newer_run_dir_is_refused_by_every_reader(tmp_path):
    root = bert_run(tmp_path / "run", apply_pattern(build_tiny_bert_cls(), "heads"), tmp_path / "t")
    rd = RunDir(root)
    rd.write_result(TrainResult("completed", 3, 3, 3, {}, 0.1, str(rd.final_dir), str(root)))
    assert rd.read_result() is not None and load_gated_run(root)[2]["task"] == "classification"
    _newer(root)
    readers = [
        rd.read_result,
        rd.read_config,
        rd.read_metrics,
        rd.read_final_info,
        lambda: load_gated_run(root),
    ]
    for read in readers:
        with pytest.raises(RunDirError, match=r"format_version 2 is not supported .* newer"):
            read()
    assert str(root) in str(pytest.raises(RunDirError, rd.read_result).value)


def test_train_refuses_to_write_into_a_newer_run_dir(tmp_path, tiny_bert_dir):
    (tmp_path / "run").mkdir()
    _newer(tmp_path / "run")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "good film", "label": "a"}) + "\n" for _ in range(4))
    )
    job = JobConfig(model=str(tiny_bert_dir), training_file=str(data),
                    hyperparameters=Hyperparameters(max_steps=1))  # fmt: skip
    from core.train import train

    with pytest.raises(RunDirError, match="newer"):
        train(job, tmp_path / "run", device="cpu")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["format.json"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"format": "something-else", "format_version": 1}', "not a FineGates run format"),
        ('{"format": "finegates-run", "format_version": "1"}', "not a FineGates run format"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_malformed_version_file_is_refused(tmp_path, content, match):
    (tmp_path / "format.json").write_text(content)
    with pytest.raises(RunDirError, match=match):
        RunDir(tmp_path).format_version()


def test_unknown_final_and_checkpoint_formats_are_refused(tmp_path):
    from core.checkpoint import read_checkpoint_state

    root = bert_run(tmp_path / "run", apply_pattern(build_tiny_bert_cls(), "heads"), tmp_path / "t")
    info_path = root / "final" / "gated_model.json"
    info = json.loads(info_path.read_text())
    info["format"] = "finegates-gated/9"
    info_path.write_text(json.dumps(info))
    with pytest.raises(RunDirError, match="unknown gated state format 'finegates-gated/9'"):
        load_gated_run(root)
    ck = root / "checkpoints" / "step-1"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"format": "finegates-checkpoint/9", "step": 1}))
    with pytest.raises(RunDirError, match="unknown checkpoint format"):
        read_checkpoint_state(ck)


def test_metrics_rows_round_trip_and_truncate_past_a_checkpoint(tmp_path):
    rd = RunDir(tmp_path)
    rd.prepare()
    for s in (2, 4, 6):
        rd.append_metrics({"step": s, "eval_loss": 1.0 / s})
    rd.truncate_metrics(4)
    assert [r["step"] for r in rd.read_metrics()] == [2, 4]
    assert rd.read_metrics()[1]["eval_loss"] == 0.25
    rd.reset_progress()
    assert rd.read_metrics() == []
