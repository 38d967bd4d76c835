"""Several initializations of the same network: gains as a distribution, a verdict by majority.

A narrow deep network fluctuates a lot from one random initialization to the next (Hanin & Rolnick
2018; REFERENCE #6: at width 32 and depth 50 most seeds end below 0.1× even under He init), so a
verdict from one seed can be luck. :func:`combine_seeds` merges the reports of ``seeds=N`` probes:

* every layer gets ``extra["seeds"]``: the mean and standard deviation over seeds of its cumulative
  gain in decades (log10 of its between-sample signal variance over the first weighted layer's,
  and of its per-sample gradient energy over the last weighted layer's);
* a finding code that is an error in at least half the seeds stays an error; one that is an error in
  fewer seeds becomes a warning; each finding's evidence says in how many seeds it appeared;
* the verdict follows from the combined findings; ``meta["seed_verdicts"]`` lists each seed's.

The statistics shown (``layers[].act`` …) are those of the first seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gradprobe.diagnose.finding import Finding
from gradprobe.report import LayerRecord, Report

__all__ = ["combine_seeds"]


def _weighted(layer: LayerRecord) -> bool:
    return any(len(p.shape) >= 2 for p in layer.params)


def _log_gains(report: Report) -> dict[str, tuple[float | None, float | None]]:
    """Per layer: log10 of signal variance over the first weighted layer's, and of gradient energy
    over the last weighted layer's."""
    weighted = [x for x in report.layers if _weighted(x)]
    first = next((x.act.signal_var for x in weighted if x.act is not None), None)
    last = next((x.grad.energy for x in reversed(weighted) if x.grad is not None), None)

    def log_ratio(value: float | None, ref: float | None) -> float | None:
        if value is None or ref is None or not (value > 0 and ref > 0):
            return None
        if not (math.isfinite(value) and math.isfinite(ref)):
            return None
        return math.log10(value / ref)

    return {
        x.name: (
            log_ratio(None if x.act is None else x.act.signal_var, first),
            log_ratio(None if x.grad is None else x.grad.energy, last),
        )
        for x in report.layers
    }


def _spread(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(vals)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def combine_seeds(reports: list[Report]) -> Report:
    """Combine the reports of one model probed under several seeds (see the module docstring)."""
    if not reports:
        raise ValueError("no reports to combine")
    base = reports[0]
    n = len(reports)
    gains = [_log_gains(r) for r in reports]
    for layer in base.layers:
        act = [g.get(layer.name, (None, None))[0] for g in gains]
        grad = [g.get(layer.name, (None, None))[1] for g in gains]
        layer.extra["seeds"] = {
            "n": n,
            "act_gain_log10": _spread(act),
            "grad_gain_log10": _spread(grad),
        }
    # findings by code: severity by majority of seeds
    by_code: dict[str, list[tuple[int, Finding]]] = {}
    for i, r in enumerate(reports):
        for f in r.findings:
            by_code.setdefault(f.code, []).append((i, f))
    combined: list[Finding] = []
    for items in by_code.values():
        error_seeds = sorted({i for i, f in items if f.severity == "error"})
        seeds_with = sorted({i for i, _ in items})
        first = next((f for _, f in items if f.severity == "error"), items[0][1])
        severity = first.severity
        if severity == "error" and 2 * len(error_seeds) < n:
            severity = "warning"
        note = f" (in {len(seeds_with)} of {n} seeds)"
        combined.append(
            dataclasses.replace(
                first,
                severity=severity,
                message=first.message.rstrip(".") + note + ".",
                evidence={
                    **first.evidence,
                    "seeds_with": len(seeds_with),
                    "seeds_with_error": len(error_seeds),
                    "seeds": n,
                },
            )
        )
    order = {"error": 0, "warning": 1, "info": 2}
    position = {layer.name: i for i, layer in enumerate(base.layers)}
    combined.sort(
        key=lambda f: (
            order[f.severity],
            min((position.get(x, len(position)) for x in f.layers), default=len(position)),
        )
    )
    meta: dict[str, Any] = dict(base.meta)
    meta["seeds"] = [r.meta.get("seed") for r in reports]
    meta["seed_verdicts"] = [r.verdict for r in reports]
    verdict = None
    if any(r.verdict is not None for r in reports):
        verdict = "unstable" if any(f.severity == "error" for f in combined) else "stable"
    return Report(layers=base.layers, meta=meta, findings=combined, verdict=verdict, schema=base.schema)
