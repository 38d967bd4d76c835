"""One CSV row per layer: the per-layer numbers of a Report for spreadsheets and pandas.

Columns (stable; empty cell where a value does not exist, e.g. no gradient):
``index, name, type, calls, output_shape, activation, initializer, act_mean, act_var, act_rms,
act_min, act_max, act_zero_fraction, act_nonfinite, act_units, act_dead_units,
act_saturated_fraction, act_energy, grad_mean, grad_var, grad_rms, grad_energy, grad_nonfinite,
param_rms, grad_to_weight, findings`` — ``output_shape`` as ``8x256``, ``param_rms`` and
``grad_to_weight`` of the layer's ``weight`` (else its first parameter), ``findings`` the codes of
the findings that name the layer, ``;``-separated.

>>> from gradprobe.render.csv import COLUMNS
>>> COLUMNS[:3]
('index', 'name', 'type')
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "to_csv", "write_csv"]

COLUMNS: tuple[str, ...] = (
    "index",
    "name",
    "type",
    "calls",
    "output_shape",
    "activation",
    "initializer",
    "act_mean",
    "act_var",
    "act_rms",
    "act_min",
    "act_max",
    "act_zero_fraction",
    "act_nonfinite",
    "act_units",
    "act_dead_units",
    "act_saturated_fraction",
    "act_energy",
    "grad_mean",
    "grad_var",
    "grad_rms",
    "grad_energy",
    "grad_nonfinite",
    "param_rms",
    "grad_to_weight",
    "findings",
)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return v


def _rows(report: Any) -> list[list[Any]]:
    codes: dict[str, list[str]] = {}
    for f in report.findings:
        for name in f.layers:
            codes.setdefault(name, []).append(f.code)
    rows = []
    for x in report.layers:
        a, g = x.act, x.grad
        weight = x.param("weight") or (x.params[0] if x.params else None)
        rows.append(
            [
                x.index,
                x.name,
                x.type,
                x.calls,
                "x".join(str(s) for s in x.output_shape),
                x.activation,
                x.initializer,
                None if a is None else a.mean,
                None if a is None else a.var,
                None if a is None else a.rms,
                None if a is None else a.min,
                None if a is None else a.max,
                None if a is None else a.zero_fraction,
                None if a is None else a.nonfinite,
                None if a is None else a.units,
                None if a is None else a.dead_units,
                None if a is None else a.saturated_fraction,
                None if a is None else a.energy,
                None if g is None else g.mean,
                None if g is None else g.var,
                None if g is None else g.rms,
                None if g is None else g.energy,
                None if g is None else g.nonfinite,
                None if weight is None else weight.rms,
                None if weight is None else weight.grad_to_weight,
                ";".join(dict.fromkeys(codes.get(x.name, []))),
            ]
        )
    return rows


def to_csv(report: Any) -> str:
    """The CSV text (header + one row per layer, in execution order)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in _rows(report):
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def write_csv(report: Any, path: str | Path) -> Path:
    """Write :func:`to_csv` to ``path``; returns the path."""
    out = Path(path)
    out.write_text(to_csv(report))
    return out
