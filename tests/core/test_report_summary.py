"""The report's answer to "how much smaller, how much faster", its spread, and the
busy-machine warning (pure functions of a report dict)."""

from __future__ import annotations

from core.report import BUSY_PREFIX, spread, summarize, timing_warning


def _report(**over):
    row = {
        "backend": "torch", "batch": 1, "seq_len": 64, "dense_ms": 10.0, "pruned_ms": 8.0,
        "speedup": 1.25, "dense_relative_spread": 0.1, "pruned_relative_spread": 0.1,
    }  # fmt: skip
    big = {**row, "batch": 32, "seq_len": 128, "dense_ms": 400.0, "pruned_ms": 300.0}
    r = {
        "gated_removed_fraction": 0.3,
        "params_removed_fraction": 0.14,
        "file_sizes": {"model.safetensors": 77_500_000, "dense_fp32_estimate": 90_900_000},
        "latency": [big, row],
        "torch_threads": 2,
        "machine": {"cpu": "Some CPU", "logical_cpus": 4, "torch_threads": 2,
                    "load_average_before": 0.5, "load_average_after": 0.7},
    }  # fmt: skip
    r.update(over)
    return r


def test_summary_sentence_names_removal_sizes_and_the_smallest_torch_shape() -> None:
    s = summarize(_report())
    assert s["sentence"] == (
        "Removed 30.0% of the gated weights (14.0% of the model); weights file 90.9 MB -> "
        "77.5 MB; CPU latency at 1x64 dense 10.0 ms -> pruned 8.0 ms (1.25x faster) on "
        "Some CPU, 2 threads."
    )
    assert (s["latency_shape"], s["speedup"]) == ([1, 64], 1.25)
    slower = _report(latency=[{**_report()["latency"][1], "pruned_ms": 12.5, "speedup": 0.8}])
    assert "(1.25x slower)" in summarize(slower)["sentence"]


def test_busy_machine_is_flagged_by_load_or_spread_and_quiet_otherwise() -> None:
    assert timing_warning(_report()) is None
    loaded = _report(machine={**_report()["machine"], "load_average_before": 6.0})
    assert timing_warning(loaded).startswith(BUSY_PREFIX)
    assert "load average was 6.0 on 4 CPUs" in timing_warning(loaded)
    noisy = _report()
    noisy["latency"][1]["pruned_relative_spread"] = 0.9
    assert "torch 1x64" in timing_warning(noisy) and "32x128" not in timing_warning(noisy)


def test_spread_is_the_10_90_percentile_band() -> None:
    s = spread([float(x) for x in range(1, 12)])  # 1..11, median 6
    assert (s["p10_ms"], s["p90_ms"]) == (2.0, 10.0)
    assert s["relative_spread"] == (10.0 - 2.0) / 6.0
