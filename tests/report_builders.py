"""Hand-built Reports for renderer and gate tests: exact numbers, no torch run, no BLAS dependence."""

from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnose.finding import Finding
from gradprobe.report import LayerRecord, ParamRecord, Report, TensorStats
from gradprobe.stats import Moments


def stats(var: float, units: int = 16, rows: int = 64, mean: float = 0.0, nonfinite: int = 0) -> TensorStats:
    m = Moments(
        rows=rows,
        mean=np.full(units, mean),
        m2=np.full(units, var * rows),
        unit_max=np.full(units, mean + 3 * math.sqrt(var)),
        unit_min=np.full(units, mean - 3 * math.sqrt(var)),
        zeros=0,
        saturated=None,
        nonfinite_units=1 if nonfinite else 0,
        nonfinite=nonfinite,
        calls=1,
    )
    return TensorStats.from_moments(m, units)


def weight(fan: int = 16) -> ParamRecord:
    return ParamRecord(
        name="weight", shape=[fan, fan], numel=fan * fan, requires_grad=True, mean=0.0, var=1 / fan,
        rms=0.25, fan_in=fan, fan_out=fan, grad_sq_sum=1e-4, batches=1,
    )  # fmt: skip


def make_report(gain: float, init: str, findings: list[Finding] | None = None, depth: int = 4) -> Report:
    """A Linear/ReLU stack whose activation variance scales by ``gain`` per Linear (gradients back)."""
    layers = []
    for k in range(depth):
        act = gain**k
        grad = gain ** (depth - 1 - k) * 1e-2
        for j, kind in enumerate(("Linear", "ReLU")):
            i = 2 * k + j
            layers.append(
                LayerRecord(
                    name=str(i), type=kind, index=i, calls=1, output_shape=[64, 16], unit_axis=1, elements_per_sample=16,
                    activation="relu" if kind == "Linear" else None,
                    act=stats(act if kind == "Linear" else act * 0.34),
                    grad=stats(grad if kind == "Linear" else grad * 2),
                    params=[weight()] if kind == "Linear" else [],
                    initializer=init if kind == "Linear" else None,
                )
            )  # fmt: skip
    findings = findings or []
    verdict = "unstable" if any(f.severity == "error" for f in findings) else "stable"
    meta = {
        "model": "TinyMLP",
        "init": init,
        "seed": 0,
        "batch_size": 64,
        "loss": "randn",
        "mode": "train",
        "device": "cpu",
    }
    return Report(layers=layers, meta=meta, findings=findings, verdict=verdict)


VANISHING = Finding(
    code="vanishing_activations",
    severity="error",
    layers=("0", "2", "4", "6"),
    message="The between-sample signal variance falls to 1.0e-03 of the first weighted layer's over 4 layers.",
    suggestion="initialise with kaiming_normal (Var[w] = 2/fan_in for ReLU).",
)
DEAD = Finding(
    code="dead_units",
    severity="warning",
    layers=("5",),
    message="9 of 16 units (56%) of `5` (ReLU) are ≤ 0 for all 64 samples.",
    suggestion="check the bias init.",
)
