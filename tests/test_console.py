"""Renderers: the rich console report and comparison (golden files at a fixed width, colour off) and
the per-layer CSV. Reports are built by hand so that the numbers do not depend on torch or BLAS.

Regenerate the golden files after an intended change with::

    GRADPROBE_UPDATE_GOLDEN=1 python -m pytest tests/test_console.py

and review the diff; never edit them by hand.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import pytest
from report_builders import DEAD, VANISHING, make_report, stats
from rich.console import Console

from gradprobe.render.console import _scale, depth_bar, render_compare, render_report, sparkline
from gradprobe.render.csv import COLUMNS, to_csv

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GRADPROBE_UPDATE_GOLDEN") == "1"
WIDTH = 100


def render(renderable: object) -> str:
    console = Console(width=WIDTH, color_system=None, force_terminal=False, file=io.StringIO(), record=True)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"missing golden file {path}; create it with GRADPROBE_UPDATE_GOLDEN=1")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} changed; if intended, regenerate (see module docstring)"
    )


def test_report_golden() -> None:
    report = make_report(0.1, "xavier_normal", [VANISHING, DEAD])
    text = render(render_report(report))
    check_golden("report_w100.txt", text)
    # the things a reader needs, independent of layout
    assert "UNSTABLE (1 error, 1 warning)" in text
    assert "✗ vanishing_activations" in text and "! dead_units" in text
    assert "→ initialise with kaiming_normal" in text
    assert "1.00e-03" in text  # layer 6's signal variance
    assert "signal: between-sample variance" in text and "E[g²] × elements per sample" in text


def test_compare_golden() -> None:
    reports = [
        make_report(0.1, "xavier_normal", [VANISHING, DEAD]),
        make_report(1.0, "kaiming_normal"),
        make_report(3.0, "normal:std=1"),
    ]
    text = render(render_compare(reports))
    check_golden("compare_w100.txt", text)
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == [
        "kaiming_normal",
        "normal:std=1",
        "xavier_normal",
    ]  # stable first, then smaller gain
    assert rows[0][4] == "×1.0e+00" and rows[2][2] == "unstable" and rows[2][4] == "×1.0e-03"
    assert "✗ vanishing_activations" in text and "! dead_units" in text


def test_report_elides_long_tables_and_shows_notes() -> None:
    report = make_report(1.0, "kaiming_normal", depth=20)
    report.meta["notes"] = ["TorchScript: one block is opaque"]
    report.meta["opaque_layers"] = ["3"]
    report.meta["kept_as_built"] = ["39"]
    report.layers[2].act = stats(1.0, nonfinite=3)
    text = render(render_report(report, max_rows=10))
    assert "30 more" in text and text.count("Linear") + text.count("ReLU") == 10
    assert "note: TorchScript: one block is opaque" in text
    assert "initializer did not apply to 1 module(s), kept as built: 39" in text
    row = next(line for line in text.splitlines() if line.split()[:2] == ["3", "ReLU"])
    assert row.rstrip().endswith("opaque")
    assert "nan/inf" in text
    undiagnosed = make_report(1.0, "keep")
    undiagnosed.verdict = None
    assert "not diagnosed" in render(render_report(undiagnosed))


def test_bars() -> None:
    assert depth_bar(0.0, -2.0, 0.0, width=8) == "█" * 8
    assert _scale([0.0, -1.0]) == (-4.0, 0.0) and _scale([0.0, -30.0]) == (-12.0, 0.0)
    assert depth_bar(-1.0, -2.0, 0.0, width=8) == "████    "
    assert depth_bar(-math.inf, -2.0, 0.0, width=4) == "·   "
    assert depth_bar(None, -2.0, 0.0, width=4) == "    "
    assert depth_bar(-5.0, -2.0, 0.0, width=4) == "▏   "  # below the scale: a sliver, not nothing
    assert sparkline([0.0, -1.0, -2.0, None, -math.inf], -2.0, 0.0) == "█▅▁·"


def test_csv_has_one_row_per_layer() -> None:
    report = make_report(0.1, "xavier_normal", [VANISHING, DEAD])
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(report.layers)
    for row, layer in zip(rows, report.layers):
        assert row["name"] == layer.name and row["type"] == layer.type and row["output_shape"] == "64x16"
        assert float(row["act_var"]) == pytest.approx(layer.act_var, rel=1e-12)
        assert float(row["grad_var"]) == pytest.approx(layer.grad_var, rel=1e-12)
    assert rows[0]["findings"] == "vanishing_activations" and rows[5]["findings"] == "dead_units"
    assert rows[1]["param_rms"] == "" and float(rows[0]["param_rms"]) == 0.25
