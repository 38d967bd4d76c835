"""scripts/benchmark.py runs end to end (a smoke run on small models; the timings themselves are not
asserted: speed lives in the benchmark's own output, never in a unit test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gradprobe_benchmark_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_field_and_attributes_the_breakdown(tmp_path: Path) -> None:
    bench = _load()
    argv = ["--quick", "--configs", "mlp", "--repeats", "2", "--extra-repeats", "1", "--memory-runs", "2"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    entry = result["configs"]["mlp"]
    assert {"gradprobe", "per_layer"} <= set(entry["ratio"])
    assert all(v > 0 for v in entry["median_s"].values())
    # every part of the breakdown that a model with parameters must go through was timed (a part
    # renamed or bypassed in gradprobe reads 0 here, as the statistics did when add() got its fast path)
    parts = entry["breakdown_s"]
    for label in (
        "activation and gradient statistics (hooks)",
        "parameter and parameter-gradient sums",
        "one transfer + building the report",
        "symmetry analysis (gradprobe.diagnose.units)",
        "diagnosis rules",
    ):
        assert parts[label] > 0, label
    memory = entry["memory"]
    assert set(memory) == set(bench.METHODS)
    assert all(len(m["peaks_mib"]) == 2 and m["peak_mib"] >= m["before_mib"] > 0 for m in memory.values())
    assert entry["memory_ratio"] > 0
    table = (tmp_path / "benchmark.md").read_text()
    assert "| (a) MLP 4×128, batch 32 |" in table and "total above bare" in table
    assert "statistics by" in table  # which statistics path ran


def test_kernel_threads_script_pairs_both_ways_and_times_the_kernel() -> None:
    """scripts/bench_kernel_threads.py: both variants go through the kernel (its time is summed on
    each side) and "one" really pins the kernel to one thread while "team" passes the probe's count."""
    import pytest
    import torch

    import gradprobe.stats as stats

    if stats._kernel_module is None:
        pytest.skip("the C kernel is not built here")
    path = SCRIPT.with_name("bench_kernel_threads.py")
    spec = importlib.util.spec_from_file_location("gradprobe_bench_kernel_threads", path)
    assert spec is not None and spec.loader is not None
    threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(threads)
    result = threads.paired("mlp", 2, quick=True)
    assert result["kernel_team_ms"] > 0 and result["kernel_one_ms"] > 0
    assert 0.0 <= result["team_faster"] <= 1.0 and result["q1_ms"] <= result["q3_ms"]
    x = torch.randn(256, 1024)
    out = torch.empty(4 * 1024 + 3, dtype=torch.float64)
    args = (x.data_ptr(), 0, 256, 1024, 1, 1024, 1, 1, out.data_ptr(), stats.KERNEL_TILE, 0, 0.0, 0.0, 2)
    runtime, _ = stats._kernel_module.team()
    threads._Kernel(1).unit_stats(*args)
    assert stats._kernel_module.team()[1] == 1
    if runtime is not None:
        threads._Kernel(None).unit_stats(*args)
        assert stats._kernel_module.team()[1] == 2
    assert threads.main(["--quick", "--configs", "mlp", "--repeats", "2"]) == 0
