"""Gated signal is not vanishing: tell a zero or small multiplicative gate from signal that dies.

A zero-init classifier, a zero-γ last norm of a residual branch, ReZero's α = 0 or LayerScale 1e-6
hold back signal *by design*: the layers behind them get exactly zero or tiny gradients at step 0
(and a zero-init layer outputs nothing), yet the gate opens in training. Evidence, never a module
name, decides it:

1. **A gate parameter.** Walking the layers in execution order, layers whose ratio to the reference
   is at or below the direction's error threshold form runs (modules called at several places, such
   as a ReLU reused inside a residual block, are skipped: their merged statistics sit at no single
   depth). Backward, the gate is the first layer after a run, where the gradient is healthy again;
   forward, a zero or tiny layer inside the run holds back itself and what follows it. A layer is a gate when its
   multiplicative parameter is tiny relative to its natural scale (:func:`gate_scale`). A run with
   no gate parameter is plain vanishing.
2. **Healthy signal behind the gate.** The layers held back by one gate must keep a healthy profile
   *among themselves* (each above the threshold relative to the largest of them): then the deficit
   is the gate's factor and nothing else. LayerScale 1e-6 is decided here, at init.
3. **Signal after a few optimizer steps**, when the gate is exactly zero (nothing to compare at
   init). The probe then takes a few Adam steps on its own copy of the parameters and stores per
   layer ``extra["after_steps"] = {"act_var", "signal_var", "grad_var", "grad_energy"}`` and
   ``meta["gate_check"]``. After the steps every layer behind the gate must be healthy at the
   *warning* level relative to the largest layer behind the same gate, or sit behind a second,
   nested gate that explains the rest (a zero-init classifier in front of zero-γ branches: after
   the steps the classifier is open and the branches are still behind their γ). The stricter level
   is the fair one after the steps, which lift plain vanishing by several decades.

Recovery alone is not enough: a few Adam steps also lift plain exponential vanishing by orders of
magnitude (their sign-like updates add a coherent rank-one path through every layer), so a deficit
without a gate parameter is always *persistent*, and so is one whose profile behind the gate decays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gradprobe.diagnose.profile import DepthProfile, depth_profile, finite_positive, forward_chain, per_report
from gradprobe.diagnose.thresholds import Thresholds
from gradprobe.report import LayerRecord, Report

__all__ = ["Deficit", "gate_scale", "find_deficits", "report_deficits", "after_steps_value"]

Direction = Literal["forward", "backward"]
Status = Literal["gated", "persistent", "unverified"]

# Layers scanned past the end of a backward run for its gate: a residual block's branch ends, its
# gate (zero-γ norm, α, LayerScale) and the next block's first layers fit in it.
_GATE_WINDOW = 8


@dataclass(frozen=True)
class Deficit:
    """A weighted layer whose cumulative ratio is at or below the error threshold of its direction.

    ``status``: ``"gated"`` (explained by ``gate``), ``"persistent"`` (no gate parameter, a decaying
    profile behind it, or a gate that did not open in the steps) or ``"unverified"`` (behind an
    exactly-zero gate, but the probe ran no optimizer-step check, or behind a second zero gate that
    the steps did not reach yet). ``how``: ``"scale"`` when the gate's own factor
    explains it at init, ``"steps"`` when the optimizer-step check showed signal flowing.
    ``internal``: the ratio to the largest layer held back by the same gate (at init, or after the
    steps for ``"steps"``).
    """

    layer: str
    direction: Direction
    ratio: float
    after_ratio: float | None
    gate: str | None
    gate_scale: float | None
    status: Status
    how: str | None = None
    internal: float | None = None


def gate_scale(layer: LayerRecord) -> float | None:
    """How large a layer's multiplicative parameter is relative to its natural scale.

    The parameter named ``weight`` when there is one (PyTorch's convention for the multiplicative
    parameter: Linear/Conv weights, norm γ), else the largest of the layer's own parameters (α,
    LayerScale's γ). A matrix is measured as rms·√fan_in (1 ≈ a variance-preserving init), a vector
    or scalar by its rms (1 = an identity scale). None for layers without parameters.
    """
    if not layer.params:
        return None
    weight = layer.param("weight")
    candidates = [weight] if weight is not None else layer.params
    best: float | None = None
    for p in candidates:
        if not math.isfinite(p.rms):
            continue
        scale = p.rms * math.sqrt(p.fan_in) if len(p.shape) >= 2 and p.fan_in else p.rms
        best = scale if best is None else max(best, scale)
    return best


def after_steps_value(layer: LayerRecord, key: str) -> float | None:
    """A value the probe measured after its optimizer steps, None when it did not run."""
    after = layer.extra.get("after_steps")
    if not isinstance(after, dict):
        return None
    v = after.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


_KEYS = {"forward": "signal_var", "backward": "grad_energy"}


def _metric(layer: LayerRecord, direction: Direction, after: bool = False) -> float | None:
    if after:
        return after_steps_value(layer, _KEYS[direction])
    stats = layer.act if direction == "forward" else layer.grad
    if stats is None:
        return None
    v = stats.signal_var if direction == "forward" else stats.energy
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class _Verdict:
    state: str  # "ok" | "gated" | "closed" (zero behind a gate) | "persistent"
    gate: str | None = None
    scale: float | None = None
    internal: float | None = None


_OK = _Verdict("ok")
_PERSISTENT = _Verdict("persistent")


def _ratios(report: Report, direction: Direction, ref: LayerRecord, *, after: bool) -> dict[str, float]:
    """Every layer's ratio to the reference in this direction (forward: through
    :func:`forward_chain`, so normalization layers reset the scale), at init or after the steps.
    Computed once per :func:`~gradprobe.diagnose.profile.analysis_scope`: not to be modified."""
    return per_report(
        report,
        ("gates.ratios", direction, ref.name, after),
        lambda: _compute_ratios(report, direction, ref, after),
    )


def _compute_ratios(report: Report, direction: Direction, ref: LayerRecord, after: bool) -> dict[str, float]:
    ref_value = _metric(ref, direction, after)
    if not finite_positive(ref_value):
        return {}
    assert ref_value is not None
    values = {x.name: v for x in report.layers for v in [_metric(x, direction, after)] if v is not None}
    if direction == "forward":
        return forward_chain(report, values, ref.name)
    return {name: v / ref_value for name, v in values.items()}


def _classify(
    report: Report, direction: Direction, ref: LayerRecord, limit: float, thr: Thresholds, *, after: bool
) -> dict[str, _Verdict]:
    """Every layer with the metric: ok, or its deficit explained by a gate, zero behind a gate, or
    persistent."""
    values = _ratios(report, direction, ref, after=after)
    if not values:
        return {}
    if after:
        # The steps lift plain vanishing by orders of magnitude: after them a layer must reach the
        # warning level (or sit behind a nested gate with a profile healthy at that level).
        limit = (
            thr.vanishing_activations_warning if direction == "forward" else thr.vanishing_gradients_warning
        )
    verdicts = {name: _OK for name, v in values.items() if v > limit}
    behind: dict[str, list[str]] = {}
    scales: dict[str, float] = {}
    for run in _runs(report, values, limit):
        for names, gate, scale in _segments(report, run, direction, values, thr):
            if gate is None:
                verdicts.update({n: _PERSISTENT for n in names})
            else:
                behind.setdefault(gate, []).extend(names)
                scales[gate] = scale  # type: ignore[assignment]
    for gate, names in behind.items():
        top = max(values[n] for n in names)
        for n in names:
            v = values[n]
            if v == 0 or top == 0:
                verdicts[n] = _Verdict("closed", gate, scales[gate])
            else:
                internal = v / top
                state = "gated" if internal > limit else "persistent"
                verdicts[n] = _Verdict(state, gate, scales[gate], internal)
    return verdicts


def _shared(layer: LayerRecord) -> bool:
    """Called at several places in the graph (a ReLU module reused inside a block, tied weights, an
    RNN loop): its merged statistics belong to no single depth, so it neither joins nor breaks a run
    of the execution-order chain, nor ends a gate search."""
    return layer.calls > 1


def _runs(report: Report, ratios: dict[str, float], limit: float) -> list[list[int]]:
    """Runs of consecutive deficit layers (ratio to the reference at or below ``limit``; positions
    in ``report.layers``); layers without the
    metric (not on the gradient path, no floating output) and shared layers neither join nor break
    a run."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, layer in enumerate(report.layers):
        v = ratios.get(layer.name)
        if v is None or _shared(layer):
            continue
        if v <= limit:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _segments(
    report: Report, run: list[int], direction: Direction, values: dict[str, float], thr: Thresholds
) -> list[tuple[list[str], str | None, float | None]]:
    """The run split by the gate that holds each part back: ``(names, gate or None, its scale)``.

    Backward, one gate for the whole run: the first layer after it that has the metric and is not
    shared (the first healthy one, since runs are maximal), within ``_GATE_WINDOW`` layers. Forward,
    a gate holds back itself and what follows it: each layer of the run whose own parameter scale
    is tiny starts a new part; layers before the first such one have no gate. A layer is a gate
    when its parameter scale is at most ``gate_param_scale``."""

    def is_gate(layer: LayerRecord) -> float | None:
        scale = gate_scale(layer)
        return scale if scale is not None and scale <= thr.gate_param_scale else None

    names = [report.layers[i].name for i in run]
    if direction == "backward":
        for i in range(run[-1] + 1, min(len(report.layers), run[-1] + 1 + _GATE_WINDOW)):
            layer = report.layers[i]
            if layer.name in values and not _shared(layer):
                scale = is_gate(layer)
                return [(names, layer.name if scale is not None else None, scale)]
        return [(names, None, None)]
    parts: list[tuple[list[str], str | None, float | None]] = [([], None, None)]
    for i in run:
        layer = report.layers[i]
        scale = is_gate(layer)
        if scale is not None:
            parts.append(([], layer.name, scale))
        parts[-1][0].append(layer.name)
    return [part for part in parts if part[0]]


def report_deficits(report: Report, thr: Thresholds) -> list[Deficit]:
    """:func:`find_deficits` on the report's own :func:`~gradprobe.diagnose.profile.depth_profile`,
    computed once per :func:`~gradprobe.diagnose.profile.analysis_scope` (the depth, zero-gate and
    dead-unit rules all read it): not to be modified."""
    return per_report(report, ("deficits", thr), lambda: find_deficits(report, depth_profile(report), thr))


def find_deficits(report: Report, profile: DepthProfile, thr: Thresholds) -> list[Deficit]:
    """Every weighted layer at or below its direction's error threshold, with its gate and status."""
    checked = isinstance(report.meta.get("gate_check"), dict)
    found: list[Deficit] = []
    for direction in ("forward", "backward"):
        ref_name = profile.forward_reference if direction == "forward" else profile.backward_reference
        if ref_name is None:
            continue
        ref = report[ref_name]
        limit = thr.vanishing_activations_error if direction == "forward" else thr.vanishing_gradients_error
        at_init = _classify(report, direction, ref, limit, thr, after=False)  # type: ignore[arg-type]
        after = _classify(report, direction, ref, limit, thr, after=True) if checked else {}  # type: ignore[arg-type]
        after_ratios = _ratios(report, direction, ref, after=True) if checked else {}  # type: ignore[arg-type]
        tops: dict[str | None, float] = {}  # per gate: the largest ratio after the steps behind it
        for p in profile.points:
            ratio = p.forward_ratio if direction == "forward" else p.backward_ratio
            if ratio is None or ratio > limit:
                continue
            v = at_init.get(p.name, _PERSISTENT)
            after_ratio = after_ratios.get(p.name)
            status: Status
            how: str | None = None
            internal = v.internal
            gate, scale = v.gate, v.scale
            if v.state == "gated":
                status, how = "gated", "scale"
            elif v.state == "persistent":
                status = "persistent"
            elif not checked or after_ratio is None:
                status = "unverified"
            else:
                # Behind the same gate, after the steps: healthy at the warning level relative to the
                # largest layer it holds back, or behind a nested gate that explains the rest.
                if v.gate not in tops:
                    tops[v.gate] = max(
                        (
                            after_ratios[n]
                            for n, w in at_init.items()
                            if w.gate == v.gate and n in after_ratios
                        ),
                        default=0.0,
                    )
                top = tops[v.gate]
                healthy = (
                    thr.vanishing_activations_warning
                    if direction == "forward"
                    else thr.vanishing_gradients_warning
                )
                nested = after.get(p.name)
                if after_ratio > 0 and top > 0 and after_ratio / top > healthy:
                    status, how, internal = "gated", "steps", after_ratio / top
                elif nested is not None and nested.state == "gated":
                    status, how, internal = "gated", "steps", nested.internal
                    gate, scale = nested.gate, nested.scale
                elif nested is not None and nested.state == "closed" and nested.gate != v.gate:
                    status = "unverified"  # the outer gate opened; an inner one has not yet
                    gate, scale = nested.gate, nested.scale
                else:
                    status = "persistent"  # the gate itself never opened, or signal still decays
            found.append(
                Deficit(
                    layer=p.name,
                    direction=direction,  # type: ignore[arg-type]
                    ratio=ratio,
                    after_ratio=after_ratio,
                    gate=gate,
                    gate_scale=scale,
                    status=status,
                    how=how,
                    internal=internal,
                )
            )
    return found
