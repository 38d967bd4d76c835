"""The diagnosis rules: one small pure function per concept, ``(Report, Thresholds) -> list[Finding]``.

Each reads only the report (plain data), so each is tested on hand-built reports. The registry
:data:`RULES` fixes the order in which they run; :func:`gradprobe.diagnose.diagnose` sorts the
findings by severity and position afterwards. Codes and defaults are documented in docs/findings.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradprobe.diagnose.finding import Finding
from gradprobe.diagnose.gates import report_deficits
from gradprobe.diagnose.profile import depth_profile, fit_trend
from gradprobe.diagnose.suggest import depth_fix, dominant_activation, init_for_activation
from gradprobe.diagnose.thresholds import Thresholds
from gradprobe.report import LayerRecord, Report, TensorStats

__all__ = [
    "RULES",
    "Rule",
    "depth_rule",
    "zero_gate_rule",
    "symmetry_rule",
    "dead_units_rule",
    "saturation_rule",
    "non_finite_rule",
    "expected_dead_fraction",
    "RELU_FAMILY_MODULES",
]

Rule = Callable[[Report, Thresholds], list[Finding]]

# Modules whose output is ≤ 0 exactly where their input is ≤ 0, so a unit whose maximum over the
# batch is ≤ 0 never entered the active (slope ≈ 1) region.
RELU_FAMILY_MODULES = frozenset(
    {
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "ELU",
        "CELU",
        "SELU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardswish",
    }
)


def _g(x: float | None) -> str:
    """A number for a message: 2 significant digits, scientific when small or large."""
    if x is None:
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _by_position(report: Report, names: set[str] | list[str]) -> tuple[str, ...]:
    wanted = set(names)
    return tuple(x.name for x in report.layers if x.name in wanted)


# --------------------------------------------------------------------------------------------
# 1-2. Vanishing / exploding along depth
# --------------------------------------------------------------------------------------------

_METRIC = {
    "forward": ("activations", "between-sample signal variance", "first"),
    "backward": ("gradients", "per-sample gradient energy", "last"),
}


def depth_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """Vanishing and exploding activations and gradients, judged on the depth profile.

    Forward: between-sample signal variance at each weighted layer's output relative to the first
    weighted layer; backward: per-sample gradient energy relative to the last. Deficits that a gate
    explains (see :mod:`gradprobe.diagnose.gates`) are left out here and reported as ``zero_gate``.
    Error when the extreme cumulative ratio is at or beyond the error threshold; warning when it is at
    or beyond the warning threshold *and* the decay or growth is exponential (critical tanh decays
    polynomially and trains).
    """
    profile = depth_profile(report)
    deficits = report_deficits(report, thr)
    findings: list[Finding] = []
    for direction in ("forward", "backward"):
        kind, metric, end = _METRIC[direction]
        explained = {d.layer for d in deficits if d.direction == direction and d.status != "persistent"}
        persistent = {d.layer: d for d in deficits if d.direction == direction and d.status == "persistent"}
        names, ratios = profile.forward(explained) if direction == "forward" else profile.backward(explained)
        if len(names) < 2:
            continue
        trend = fit_trend(names, ratios)
        ref = names[0]
        long_enough = trend.layers >= thr.trend_min_layers
        gains = [None] + [b / a if a > 0 else None for a, b in zip(ratios, ratios[1:])]
        profile_evidence = {"layers": names, "ratios": ratios, "gains": gains}
        for sense in ("vanishing", "exploding"):
            code = f"{sense}_{kind}"
            err = getattr(thr, f"{code}_error")
            warn = getattr(thr, f"{code}_warning")
            if sense == "vanishing":
                extreme, at = trend.smallest, trend.smallest_at
                hit = [n for n, r in zip(names, ratios) if r <= (err if extreme <= err else warn)]
                severity = "error" if extreme <= err else "warning" if extreme <= warn else None
                word = "falls to"
            else:
                extreme, at = trend.largest, trend.largest_at
                hit = [n for n, r in zip(names, ratios) if r >= (err if extreme >= err else warn)]
                severity = "error" if extreme >= err else "warning" if extreme >= warn else None
                word = "grows to"
            if severity == "warning" and not (trend.kind == "exponential" and long_enough):
                severity = None
            if severity is None:
                continue
            suggestion, init = depth_fix(report, code, hit)
            if extreme == 0:
                message = (
                    f"The {metric} is exactly 0 at `{at}` ({len(hit)} of {trend.layers} weighted layers, "
                    f"relative to the {end} weighted layer `{ref}`)"
                )
            else:
                message = (
                    f"The {metric} {word} {_g(extreme)} of the {end} weighted layer's (`{ref}`) at `{at}` "
                    f"over {trend.layers} weighted layers ({trend.kind}, ×{trend.per_layer_gain:.3g} per layer)"
                )
            evidence: dict[str, Any] = {
                "direction": direction,
                "metric": metric,
                "reference": ref,
                "extreme": extreme,
                "at": at,
                "cumulative": trend.cumulative,
                "trend": trend.kind,
                "per_layer_gain": trend.per_layer_gain,
                "polynomial_exponent": trend.polynomial_exponent,
                "weighted_layers": trend.layers,
                "threshold": err if severity == "error" else warn,
                "profile": profile_evidence,
                "gated_layers_left_out": sorted(explained),
                "suggested_init": init,
            }
            if sense == "vanishing":
                held = [persistent[n] for n in hit if n in persistent]
                after = [d.after_ratio for d in held if d.after_ratio is not None]
                if after:
                    evidence["after_steps_ratio"] = min(after)
                gated_by = sorted({d.gate for d in held if d.gate is not None})
                steps = report.meta.get("gate_check", {}).get("steps", "?")
                if gated_by:
                    message += (
                        f"; behind {_names(gated_by)}, but the signal behind the gate decays too or still does not "
                        f"flow after {steps} optimizer steps (ratio {_g(min(after)) if after else 'n/a'})"
                    )
                elif after:
                    message += f"; no zero or small gate explains it ({_g(min(after))} after {steps} optimizer steps)"
            findings.append(
                Finding(
                    code=code,
                    severity=severity,  # type: ignore[arg-type]
                    layers=_by_position(report, hit),
                    message=message + ".",
                    suggestion=suggestion,
                    evidence=evidence,
                )
            )
    return findings


# --------------------------------------------------------------------------------------------
# 4. Gated signal
# --------------------------------------------------------------------------------------------


def zero_gate_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """Deficits explained by a zero or small multiplicative gate: ``zero_gate`` info when the layers
    behind it are healthy among themselves (at init, or after the probe's optimizer steps for an
    exactly-zero gate), a warning when the gate is exactly zero and the step check did not run."""
    deficits = report_deficits(report, thr)
    findings: list[Finding] = []
    check = report.meta.get("gate_check") if isinstance(report.meta.get("gate_check"), dict) else None
    for status, severity in (("gated", "info"), ("unverified", "warning")):
        chosen = [d for d in deficits if d.status == status]
        if not chosen:
            continue
        gates: dict[str, dict[str, Any]] = {}
        for d in chosen:
            assert d.gate is not None
            entry = gates.setdefault(d.gate, {"scale": d.gate_scale, "held_back": [], "directions": []})
            if d.layer not in entry["held_back"]:
                entry["held_back"].append(d.layer)
            if d.direction not in entry["directions"]:
                entry["directions"].append(d.direction)
        for entry in gates.values():
            entry["held_back"] = list(_by_position(report, entry["held_back"]))
        order = _by_position(report, set(gates))
        held = _by_position(report, {d.layer for d in chosen})
        worst = min(d.ratio for d in chosen)
        what = "no" if worst == 0 else f"as little as {_g(worst)} of the reference"
        gate_text = _names(list(order))
        internal = [d.internal for d in chosen if d.internal is not None]
        worst_internal = min(internal) if internal else None
        head = (
            f"{len(held)} weighted layer(s) get {what} signal at init only because of {len(order)} zero or "
            f"small gate(s) ({gate_text})"
        )
        if status == "gated":
            reasons = []
            if any(d.how == "scale" for d in chosen):
                reasons.append(
                    "behind each gate the signal is healthy, so the gate's own small factor explains it"
                )
            if any(d.how == "steps" for d in chosen) and check is not None:
                reasons.append(
                    f"after {check.get('steps')} {check.get('optimizer', 'optimizer')} steps (lr {check.get('lr')}) "
                    "signal reaches every layer behind them"
                )
            message = f"{head}: {'; '.join(reasons)}; gated by design, not vanishing"
            suggestion = ""
        else:
            message = (
                f"{len(held)} weighted layer(s) get {what} signal at init behind exactly-zero parameters in "
                f"{gate_text}; that looks like a gate by design, but the optimizer-step check did not run"
            )
            suggestion = "probe with gate_check=True to confirm that signal flows once the gate opens."
        findings.append(
            Finding(
                code="zero_gate",
                severity=severity,  # type: ignore[arg-type]
                layers=order,
                message=message + ".",
                suggestion=suggestion,
                evidence={
                    "gates": {g: gates[g] for g in order},
                    "held_back": list(held),
                    "worst_ratio": worst,
                    "worst_ratio_behind_gate": worst_internal,
                    "worst_ratio_after_steps": min(
                        (d.after_ratio for d in chosen if d.after_ratio is not None), default=None
                    ),
                    "gate_check": check,
                },
            )
        )
    return findings


# --------------------------------------------------------------------------------------------
# 3. Symmetry
# --------------------------------------------------------------------------------------------


def _symmetry_verdicts(layer: LayerRecord, checked: bool) -> dict[str, int] | None:
    """Groups of this layer classified as locked, breaking, or undetermined (see units.py for the
    facts recorded; the severities are decided here)."""
    sym = layer.extra.get("symmetry")
    if not isinstance(sym, dict):
        return None
    locked = int(sym.get("locked", {}).get("groups", 0))
    locked_units = int(sym.get("locked", {}).get("units", 0))
    broken = int(sym.get("broken", {}).get("groups", 0))
    undetermined = 0
    zero = sym.get("zero_gradient", {})
    after = layer.extra.get("after_steps")
    after_energy = after.get("grad_energy") if isinstance(after, dict) else None

    def part(kind: str) -> tuple[int, int]:
        c = zero.get(f"outgoing_{kind}", {})
        return int(c.get("groups", 0)), int(c.get("units", 0))

    if checked and after_energy == 0:
        # No gradient even after the optimizer steps: nothing will ever separate them.
        locked += int(zero.get("groups", 0))
        locked_units += int(zero.get("units", 0))
    else:
        g, u = part("identical")  # outgoing identical too: identical gradients once any arrive
        locked, locked_units = locked + g, locked_units + u
        broken += part("distinct")[0]
        undetermined += part("unknown")[0]
    return {"locked": locked, "locked_units": locked_units, "broken": broken, "undetermined": undetermined}


def symmetry_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """Units that gradient descent can never separate (identical incoming weights and bias *and*
    identical gradients) are an error; identical units whose gradients differ are info
    ``tie_broken_by_gradients``; ties whose gradient is zero at init and whose outgoing weights could
    not be compared are a warning."""
    checked = isinstance(report.meta.get("gate_check"), dict)
    per_layer: dict[str, dict[str, Any]] = {}
    for layer in report.layers:
        v = _symmetry_verdicts(layer, checked)
        if v is None:
            continue
        sym = layer.extra["symmetry"]
        per_layer[layer.name] = {
            **v,
            "units": sym.get("units"),
            "distinct": sym.get("distinct"),
            "effective_width": sym.get("effective_width"),
            "largest_group": sym.get("largest_group"),
        }
    findings: list[Finding] = []
    locked = [n for n, v in per_layer.items() if v["locked"]]
    if locked:
        first = per_layer[locked[0]]
        init, said = init_for_activation(dominant_activation(report, locked))
        findings.append(
            Finding(
                code="symmetry",
                severity="error",
                layers=_by_position(report, locked),
                message=(
                    f"{len(locked)} layer(s) have units that gradient descent can never separate (identical "
                    f"incoming weights and bias and identical gradients): `{locked[0]}` has "
                    f"{first['distinct']} distinct of {first['units']} units (effective width "
                    f"{_g(first['effective_width'])}, {first['locked_units']} units in {first['locked']} locked group(s))."
                ),
                suggestion=f"break the symmetry with a random init: {said}.",
                evidence={
                    "layers": {n: per_layer[n] for n in _by_position(report, locked)},
                    "suggested_init": init,
                },
            )
        )
    undetermined = [n for n, v in per_layer.items() if v["undetermined"] and not v["locked"]]
    if undetermined:
        findings.append(
            Finding(
                code="symmetry",
                severity="warning",
                layers=_by_position(report, undetermined),
                message=(
                    f"{len(undetermined)} layer(s) have identical units whose gradient is zero at init, so "
                    "whether training separates them cannot be told at step 0."
                ),
                suggestion="probe with gate_check=True, or give these layers a random init.",
                evidence={"layers": {n: per_layer[n] for n in _by_position(report, undetermined)}},
            )
        )
    broken = [n for n, v in per_layer.items() if v["broken"] and not v["locked"]]
    if broken:
        findings.append(
            Finding(
                code="tie_broken_by_gradients",
                severity="info",
                layers=_by_position(report, broken),
                message=(
                    f"{len(broken)} layer(s) start with identical units whose gradients differ (zero-init head "
                    "or branch, duplicated rows with distinct outgoing weights, identity-like init): the first "
                    "steps separate them."
                ),
                evidence={"layers": {n: per_layer[n] for n in _by_position(report, broken)}},
            )
        )
    return findings


# --------------------------------------------------------------------------------------------
# 5. Dead units
# --------------------------------------------------------------------------------------------


def expected_dead_fraction(depth: int) -> float:
    """Fraction of ReLU units off for a whole batch under *healthy* random init at this depth.

    Input correlation grows with depth, so units become constant-sign without being dead: with He
    init and centred inputs ≈ 14% at layer 10 and ≈ 40% at layer 50 (REFERENCE traps). Interpolated
    linearly in log-depth through those two points, clipped to [0, 0.9].
    """
    if depth <= 0:
        return 0.0
    f = 0.14 + (0.40 - 0.14) * math.log(depth / 10) / math.log(5)
    return min(max(f, 0.0), 0.9)


def _samples(report: Report, stats: TensorStats) -> int:
    samples = report.meta.get("samples")
    if isinstance(samples, int) and samples > 0:
        return samples
    return int(stats.moments.rows)


def _grouped(
    report: Report, code: str, items: list[tuple[str, LayerRecord, str, dict[str, Any], str]], key: str
) -> list[Finding]:
    """One finding per severity over ``items`` = (severity, layer, message, evidence, suggestion): the
    message and top-level evidence are those of the worst layer (largest ``evidence[key]``); every
    flagged layer's numbers are in ``evidence["layers"]``."""
    findings: list[Finding] = []
    for severity in ("error", "warning"):
        chosen = [item for item in items if item[0] == severity]
        if not chosen:
            continue
        worst = max(chosen, key=lambda item: item[3][key])
        _, layer, message, evidence, suggestion = worst
        if len(chosen) > 1:
            others = [item[1].name for item in chosen if item is not worst]
            message += f" Also {_names(others)}."
        findings.append(
            Finding(
                code=code,
                severity=severity,  # type: ignore[arg-type]
                layers=_by_position(report, [item[1].name for item in chosen]),
                message=message,
                suggestion=suggestion,
                evidence={
                    "worst": layer.name,
                    **evidence,
                    "layers": {item[1].name: item[3] for item in chosen},
                },
            )
        )
    return findings


def dead_units_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """Units of ReLU-family modules that are ≤ 0 for every sample, against random-init expectations."""
    items: list[tuple[str, LayerRecord, str, dict[str, Any], str]] = []
    depth = 0
    gated = {d.layer for d in report_deficits(report, thr) if d.status != "persistent"}
    positions = {x.name: i for i, x in enumerate(report.layers)}
    for layer in report.layers:
        if layer.type not in RELU_FAMILY_MODULES or layer.act is None or not layer.act.units:
            continue
        depth += 1
        stats = layer.act
        fraction = stats.dead_units / stats.units
        expected = expected_dead_fraction(depth)
        warn_at = max(thr.dead_warning_fraction, expected + thr.dead_margin)
        samples = _samples(report, stats)
        enough = samples >= thr.dead_min_samples
        if fraction < warn_at and fraction < thr.dead_error_fraction:
            continue
        silent = stats.zero_fraction == 1.0
        if silent and any(positions.get(g, math.inf) < positions[layer.name] for g in gated):
            continue  # exactly zero input behind a gate: the zero_gate finding covers it
        severity = "error" if fraction >= thr.dead_error_fraction and enough else "warning"
        message = (
            f"{stats.dead_units} of {stats.units} units ({fraction:.0%}) of `{layer.name}` ({layer.type}) are ≤ 0 "
            f"for all {samples} samples; healthy random init leaves ≈ {expected:.0%} off at this depth ({depth})"
        )
        if silent:
            message += "; its input is exactly zero everywhere"
        if not enough:
            message += f"; with fewer than {thr.dead_min_samples} samples the batch is too small to tell dead from rarely active"
        suggestion = (
            "check the bias init (a negative bias switches units off) and the weight scale before it "
            "(He/Kaiming for ReLU), or use a leaky activation; normalise inputs to zero mean."
            if enough
            else f"probe with at least {thr.dead_min_samples} samples to tell."
        )
        evidence = {
            "dead_units": stats.dead_units,
            "units": stats.units,
            "fraction": fraction,
            "expected_at_init": expected,
            "warning_at": warn_at,
            "relu_depth": depth,
            "samples": samples,
            "enough_samples": enough,
        }
        items.append((severity, layer, message + ".", evidence, suggestion))
    return _grouped(report, "dead_units", items, "fraction")


# --------------------------------------------------------------------------------------------
# 6. Saturation
# --------------------------------------------------------------------------------------------


def saturation_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """Bounded activations whose outputs mostly sit where φ′(z)/φ′(0) is small."""
    items: list[tuple[str, LayerRecord, str, dict[str, Any], str]] = []
    suggestion = (
        "the inputs to these activations are too large: scale the weights before them down "
        "(Xavier/Glorot, `xavier_normal`) or normalise before them."
    )
    for layer in report.layers:
        if layer.act is None or layer.act.saturated_fraction is None:
            continue
        fraction = layer.act.saturated_fraction
        if not math.isfinite(fraction):
            continue
        if fraction >= thr.saturation_error:
            severity = "error"
        elif fraction >= thr.saturation_warning:
            severity = "warning"
        else:
            continue
        message = (
            f"{fraction:.0%} of `{layer.name}`'s ({layer.type}) outputs are saturated (the activation's "
            "derivative below a tenth of its value at 0), so little gradient passes through them."
        )
        evidence = {
            "saturated_fraction": fraction,
            "threshold": thr.saturation_error if severity == "error" else thr.saturation_warning,
            "type": layer.type,
            "suggested_init": "xavier_normal",
        }
        items.append((severity, layer, message, evidence, suggestion))
    return _grouped(report, "saturated_units", items, "saturated_fraction")


# --------------------------------------------------------------------------------------------
# 7. Non-finite values
# --------------------------------------------------------------------------------------------


def _finite_extremes(streams: list[TensorStats]) -> list[bool]:
    """For each stream, whether its per-unit maxima and minima are all finite: ``np.isfinite`` of
    every stream's ``unit_max`` and ``unit_min`` at once (a transformer has ~400 streams; one numpy
    call each cost more than the check), then the array each non-finite value lies in."""
    arrays = [a for stats in streams for a in (stats.moments.unit_max, stats.moments.unit_min)]
    if not arrays:
        return []
    try:
        finite = np.isfinite(np.concatenate(arrays))
    except (ValueError, TypeError):  # not all 1-D arrays: one at a time
        return [
            bool(np.isfinite(s.moments.unit_max).all() and np.isfinite(s.moments.unit_min).all())
            for s in streams
        ]
    if finite.all():
        return [True] * len(streams)
    ends = np.cumsum([np.size(a) for a in arrays])
    hit = np.zeros(len(arrays), dtype=bool)
    hit[np.searchsorted(ends, np.flatnonzero(~finite), side="right")] = True  # ends[k-1] ≤ position < ends[k]
    return (~(hit[0::2] | hit[1::2])).tolist()


def _nonfinite(stats: TensorStats | None, extremes_finite: bool | None = None) -> dict[str, Any] | None:
    """What kind of non-finite values a stream holds, None when all finite. ``extremes_finite``: the
    stream's entry of :func:`_finite_extremes` when known."""
    if stats is None:
        return None
    m = stats.moments
    hi, lo = m.unit_max, m.unit_min
    flagged = m.nonfinite_units > 0 or (stats.nonfinite or 0) > 0
    if not flagged and (
        extremes_finite if extremes_finite is not None else np.isfinite(hi).all() and np.isfinite(lo).all()
    ):
        return None
    # Per-unit max/min propagate NaN, so they tell NaN from ±inf; a flag with finite extremes cannot
    # be attributed and counts as NaN.
    nan = bool(np.isnan(hi).any() or np.isnan(lo).any())
    pos = bool(np.isposinf(hi).any())
    neg = bool(np.isneginf(lo).any())
    nan = nan or not (pos or neg)
    return {
        "nan": nan,
        "+inf": pos,
        "-inf": neg,
        "count": stats.nonfinite,
        "units": int(m.nonfinite_units),
        "mask_like": neg and not nan and not pos,
    }


def non_finite_rule(report: Report, thr: Thresholds) -> list[Finding]:
    """The first module whose output turns non-finite (forward, execution order), or when the forward
    pass is finite the first whose output gradient does (backward order). A −inf-only output followed
    by finite outputs is an attention mask, not an error."""
    findings: list[Finding] = []
    layers = report.layers
    streams = [s for x in layers for s in (x.act, x.grad) if s is not None]
    finite = dict(zip(map(id, streams), _finite_extremes(streams)))

    def kind_of(stats: TensorStats | None) -> dict[str, Any] | None:
        return _nonfinite(stats, None if stats is None else finite.get(id(stats)))

    first: tuple[LayerRecord, dict[str, Any]] | None = None
    masks: list[str] = []
    for i, layer in enumerate(layers):
        kind = kind_of(layer.act)
        if kind is None:
            continue
        later_finite = any(x.act is not None and kind_of(x.act) is None for x in layers[i + 1 :])
        if kind["mask_like"] and later_finite:
            masks.append(layer.name)
            continue
        first = (layer, kind)
        break
    backward = [x for x in sorted(layers, key=lambda x: -x.index) if kind_of(x.grad) is not None]
    if first is not None:
        layer, kind = first
        inputs_finite = layer.extra.get("inputs_finite")
        values = "/".join(k for k in ("nan", "+inf", "-inf") if kind[k]) or "non-finite values"
        count = f"{kind['count']} " if isinstance(kind["count"], int) and kind["count"] > 0 else ""
        if inputs_finite is True:
            origin = "from finite inputs: this module creates them"
            suggestion = (
                f"inspect `{layer.name}`'s arithmetic (log/sqrt/division of non-positive values, overflow of "
                "large weights) or lower its weight scale."
            )
        elif inputs_finite is False:
            origin = (
                "and its inputs were already non-finite (the model's input or an operation outside modules)"
            )
            suggestion = "check the input data and the operations before this module for NaN/Inf."
        else:
            origin = "(its inputs were not checked)"
            suggestion = f"inspect `{layer.name}` and the operations just before it."
        findings.append(
            Finding(
                code="non_finite",
                severity="error",
                layers=(layer.name,),
                message=(
                    f"`{layer.name}` ({layer.type}) is the first module, in execution order, whose output holds "
                    f"{count}{values.upper()} values, {origin}."
                ),
                suggestion=suggestion,
                evidence={
                    "direction": "forward",
                    "kind": kind,
                    "inputs_finite": inputs_finite,
                    "masks_ignored": masks,
                    "gradients_non_finite_from": backward[0].name if backward else None,
                },
            )
        )
    elif backward:
        layer = backward[0]
        kind = kind_of(layer.grad)
        assert kind is not None
        values = "/".join(k for k in ("nan", "+inf", "-inf") if kind[k]) or "non-finite values"
        findings.append(
            Finding(
                code="non_finite",
                severity="error",
                layers=(layer.name,),
                message=(
                    f"The forward pass is finite, but `{layer.name}` ({layer.type}) is the first module, in backward "
                    f"order, whose output gradient holds {values.upper()} values."
                ),
                suggestion=(
                    f"look for a non-differentiable point in or right after `{layer.name}` (sqrt or norm at 0, "
                    "log near 0, a −inf mask over a whole row) or gradient overflow."
                ),
                evidence={"direction": "backward", "kind": kind, "masks_ignored": masks},
            )
        )
    return findings


# The order findings are produced in (diagnose() sorts them by severity and position afterwards).
RULES: dict[str, Rule] = {
    "non_finite": non_finite_rule,
    "depth": depth_rule,
    "zero_gate": zero_gate_rule,
    "symmetry": symmetry_rule,
    "dead_units": dead_units_rule,
    "saturation": saturation_rule,
}
