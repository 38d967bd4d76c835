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
