"""Each diagnosis rule on hand-built reports (no network run), including the exact boundaries."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.diagnose import CODES, Thresholds, diagnose, suggested_init
from gradprobe.diagnose.finding import Finding
from gradprobe.diagnose.gates import find_deficits, gate_scale
from gradprobe.diagnose.profile import depth_profile, fit_trend
from gradprobe.diagnose.rules import (
    dead_units_rule,
    depth_rule,
    expected_dead_fraction,
    non_finite_rule,
    saturation_rule,
    symmetry_rule,
    zero_gate_rule,
)
from gradprobe.diagnose.suggest import depth_fix, init_for_activation, weight_scale_match
from gradprobe.diagnose.units import analyse_units, group_rows, group_units, unit_features
from gradprobe.errors import UsageError
from gradprobe.report import LayerRecord, ParamRecord, Report, TensorStats
from gradprobe.stats import Moments

THR = Thresholds()

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def stats(
    var: float | list[float] = 1.0,
    *,
    mean: float | list[float] = 0.0,
    units: int = 1,
    rows: int = 256,
    unit_max: list[float] | None = None,
    unit_min: list[float] | None = None,
    saturated: int | None = None,
    nonfinite_units: int = 0,
    nonfinite: int | None = 0,
    zeros: int = 0,
    eps: int | None = None,
) -> TensorStats:
    """TensorStats with exactly these per-unit variances and means (energy = var + mean² per element
    times ``eps``, by default one element per sample per unit)."""
    v = np.broadcast_to(np.asarray(var, dtype=np.float64), (units,)).copy()
    mu = np.broadcast_to(np.asarray(mean, dtype=np.float64), (units,)).copy()
    hi = np.asarray(unit_max, dtype=np.float64) if unit_max is not None else mu + 3 * np.sqrt(v) + 1.0
    lo = np.asarray(unit_min, dtype=np.float64) if unit_min is not None else mu - 3 * np.sqrt(v) - 1.0
    m = Moments(
        rows=rows,
        mean=mu,
        m2=v * rows,
        unit_max=hi,
        unit_min=lo,
        zeros=zeros,
        saturated=saturated,
        nonfinite_units=nonfinite_units,
        nonfinite=nonfinite,
        calls=1,
    )
    return TensorStats.from_moments(m, eps if eps is not None else units)


def param(name: str, shape: tuple[int, ...], rms: float, fan_in: int | None = None) -> ParamRecord:
    numel = math.prod(shape)
    return ParamRecord(
        name=name,
        shape=list(shape),
        numel=numel,
        requires_grad=True,
        mean=0.0,
        var=rms * rms,
        rms=rms,
        fan_in=fan_in if fan_in is not None else (shape[1] if len(shape) >= 2 else None),
        fan_out=shape[0] if len(shape) >= 2 else None,
        grad_sq_sum=1.0,
        batches=1,
    )


def layer(
    name: str,
    index: int,
    *,
    type: str = "Linear",
    act: TensorStats | None = None,
    grad: TensorStats | None = None,
    weight_rms: float | None = 0.0625,  # 1/√256: a Xavier/LeCun-scale weight at width 256
    width: int = 256,
    activation: str | None = None,
    params: list[ParamRecord] | None = None,
    extra: dict[str, Any] | None = None,
    calls: int = 1,
) -> LayerRecord:
    if params is None:
        params = [] if weight_rms is None else [param("weight", (width, width), weight_rms)]
    return LayerRecord(
        name=name,
        type=type,
        index=index,
        calls=calls,
        output_shape=[256, width],
        unit_axis=1,
        elements_per_sample=act.units if act is not None else 1,
        activation=activation,
        act=act,
        grad=grad,
        params=params,
        extra=dict(extra or {}),
    )


def chain(
    forward: list[float],
    backward: list[float],
    *,
    activation: str | None = "relu",
    weight_rms: float = 0.0625,
    meta: dict[str, Any] | None = None,
) -> Report:
    """Weighted layers `fc0`, `fc1`, … with these signal variances and gradient energies."""
    layers = [
        layer(
            f"fc{i}",
            i,
            act=stats(f),
            grad=stats(b),
            activation=activation,
            weight_rms=weight_rms,
        )
        for i, (f, b) in enumerate(zip(forward, backward))
    ]
    return Report(layers=layers, meta=dict(meta or {"samples": 256}))


def codes(findings: list[Finding], severity: str | None = None) -> list[str]:
    return [f.code for f in findings if severity is None or f.severity == severity]


def only(findings: list[Finding], code: str) -> Finding:
    chosen = [f for f in findings if f.code == code]
    assert len(chosen) == 1, findings
    return chosen[0]


# --------------------------------------------------------------------------------------------
# Thresholds and the entry point
# --------------------------------------------------------------------------------------------


def test_unknown_threshold_is_a_usage_error_listing_valid_names() -> None:
    report = chain([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(UsageError) as e:
        diagnose(report, vanishing_eror=1e-3)
    assert "vanishing_eror" in str(e.value)
    for name in Thresholds.names():
        assert name in str(e.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"vanishing_gradients_error": 1e-3, "vanishing_gradients_warning": 1e-4},
        {"exploding_gradients_warning": 1e9},
        {"dead_error_fraction": 0.4},
        {"saturation_warning": 0.9},
        {"vanishing_activations_error": float("nan")},
        {"dead_min_samples": -1},
        {"gate_param_scale": True},
    ],
)
def test_inconsistent_thresholds_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        Thresholds(**bad)


def test_package_is_the_public_function() -> None:
    import gradprobe

    report = chain([1.0] * 6, [0.5**k for k in range(5, -1, -1)])
    assert gradprobe.diagnose(report, vanishing_gradients_error=0.05, vanishing_gradients_warning=0.1)
    assert gradprobe.diagnose(report) == diagnose(report) == []


def test_thresholds_are_frozen_and_overrides_apply() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Thresholds().vanishing_gradients_error = 1.0  # type: ignore[misc]
    report = chain([1.0] * 6, [0.5**k for k in range(5, -1, -1)])  # 1/32 at the first layer
    assert not diagnose(report)
    found = diagnose(report, vanishing_gradients_error=0.05, vanishing_gradients_warning=0.1)
    assert codes(found) == ["vanishing_gradients"] and found[0].severity == "error"


def test_every_code_is_documented() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "findings.md").read_text()
    for code in CODES:
        assert f"`{code}`" in text, code
    for name in Thresholds.names():
        assert f"`{name}`" in text, name


def test_findings_sorted_errors_first_then_by_position() -> None:
    relu = stats(units=4, unit_max=[0.0, 0.0, 0.0, 0.0], unit_min=[-1.0] * 4)
    tanh = stats(units=4, saturated=4 * 256 // 2)
    report = Report(
        layers=[
            layer("fc0", 0, act=stats(), grad=stats()),
            layer("act0", 1, type="Tanh", act=tanh, weight_rms=None),
            layer("fc1", 2, act=stats(), grad=stats()),
            layer("act1", 3, type="ReLU", act=relu, weight_rms=None),
        ],
        meta={"samples": 256},
    )
    found = diagnose(report)
    assert [(f.code, f.severity, f.layers) for f in found] == [
        ("dead_units", "error", ("act1",)),
        ("saturated_units", "warning", ("act0",)),
    ]


# --------------------------------------------------------------------------------------------
# Depth profile
# --------------------------------------------------------------------------------------------


def test_profile_uses_between_sample_variance_not_the_bias_floor() -> None:
    # The last layer's E[z²] is dominated by a per-unit constant (PyTorch's default bias floor):
    # its between-sample variance is what vanished.
    first = stats(1.0, units=4)
    last = stats(1e-12, mean=[0.05, -0.05, 0.02, -0.02], units=4)
    report = Report(
        layers=[
            layer("fc0", 0, act=first, grad=stats()),
            layer("fc1", 1, act=stats(0.1, units=4), grad=stats()),
            layer("fc2", 2, act=last, grad=stats()),
        ],
        meta={},
    )
    profile = depth_profile(report)
    assert profile.forward_reference == "fc0" and profile.backward_reference == "fc2"
    assert profile.points[-1].forward_ratio == pytest.approx(1e-12)
    assert last.var > 1e-3  # the per-element variance would have hidden it
    f = only(depth_rule(report, THR), "vanishing_activations")
    assert f.severity == "error" and f.layers == ("fc2",) and f.evidence["extreme"] == pytest.approx(1e-12)


def test_profile_compares_energy_and_skips_unweighted_layers() -> None:
    # A max-pool quarters per-element gradient variance but keeps per-sample energy; parameter-free
    # layers are not part of the profile.
    pool_grad = stats(0.25, units=4, eps=16)  # energy 0.25·16 = 4
    report = Report(
        layers=[
            layer("conv", 0, act=stats(1.0, units=4, eps=64), grad=stats(1 / 16, units=4, eps=64)),
            layer(
                "pool", 1, type="MaxPool2d", act=stats(1.0, units=4, eps=16), grad=pool_grad, weight_rms=None
            ),
            layer("head", 2, act=stats(1.0, units=4), grad=stats(1.0, units=4)),
        ],
        meta={},
    )
    profile = depth_profile(report)
    assert [p.name for p in profile.points] == ["conv", "head"]
    assert profile.points[0].backward_ratio == pytest.approx(1.0)  # 4 / 4
    assert not depth_rule(report, THR)


def test_normalization_resets_the_forward_scale() -> None:
    """A tiny embedding before a LayerNorm is no forward gain: the norm's output is the new
    reference. The backward pass keeps its plain energy ratios."""
    report = Report(
        layers=[
            layer("embed", 0, act=stats(1e-10), grad=stats(1.0)),
            layer(
                "ln",
                1,
                type="LayerNorm",
                act=stats(1.0),
                grad=stats(1.0),
                params=[param("weight", (256,), 1.0)],
            ),
            layer("fc", 2, act=stats(0.5), grad=stats(1.0)),
            layer("relu", 3, type="ReLU", act=stats(0.25), weight_rms=None),
            layer("head", 4, act=stats(0.25), grad=stats(1.0)),
        ],
        meta={},
    )
    profile = depth_profile(report)
    assert [p.forward_ratio for p in profile.points] == [1.0, 0.5, 0.25]
    assert not depth_rule(report, THR)
    report.layers[1].type = "Identity"  # no norm: the same numbers are a 2.5e9 forward gain
    assert [p.forward_ratio for p in depth_profile(report).points] == [1.0, 5e9, 2.5e9]
    assert codes(depth_rule(report, THR)) == ["exploding_activations"]


def test_fit_tells_exponential_from_polynomial() -> None:
    names = [f"fc{k}" for k in range(30)]
    exponential = fit_trend(names, [0.5**k for k in range(30)])
    assert exponential.kind == "exponential" and exponential.per_layer_gain == pytest.approx(0.5)
    critical_tanh = fit_trend(names, [1 / (1 + 2 * k) for k in range(30)])
    assert critical_tanh.kind == "polynomial" and critical_tanh.polynomial_exponent == pytest.approx(
        1.0, abs=0.3
    )
    flat = fit_trend(names, [1.0 + 0.1 * (-1) ** k for k in range(30)])
    assert flat.kind == "flat"
    assert fit_trend(["a"], [1.0]).kind == "short"


@pytest.mark.parametrize(
    "last,expected",
    [
        (1e-9, "error"),  # at the threshold: error
        (1.0001e-9, "warning"),  # just above: exponential decay below the warning level
        (1e-7, "warning"),
        (1.0001e-7, None),
    ],
)
def test_vanishing_activations_boundaries(last: float, expected: str | None) -> None:
    n = 10
    forward = [last ** (k / (n - 1)) for k in range(n)]
    forward[-1] = last
    found = depth_rule(chain(forward, [1.0] * n), THR)
    got = [f.severity for f in found if f.code == "vanishing_activations"]
    assert got == ([expected] if expected else [])
    if expected:
        f = found[0]
        assert f.evidence["trend"] == "exponential" and f.evidence["reference"] == "fc0"
        assert f.evidence["extreme"] == last and "fc9" in f.layers


@pytest.mark.parametrize(
    "first,expected",
    [(1e-8, "error"), (1.0001e-8, "warning"), (1e-6, "warning"), (1.0001e-6, None)],
)
def test_vanishing_gradients_boundaries(first: float, expected: str | None) -> None:
    n = 10
    backward = [first ** ((n - 1 - k) / (n - 1)) for k in range(n)]
    backward[0] = first
    found = depth_rule(chain([1.0] * n, backward), THR)
    got = [(f.severity, f.layers[0]) for f in found if f.code == "vanishing_gradients"]
    assert got == ([(expected, "fc0")] if expected else [])
    if expected:
        assert found[0].evidence["reference"] == "fc9"


@pytest.mark.parametrize(
    "top,expected", [(1e8, "error"), (0.9999e8, "warning"), (1e4, "warning"), (0.9999e4, None)]
)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_exploding_boundaries(direction: str, top: float, expected: str | None) -> None:
    n = 10
    growth = [top ** (k / (n - 1)) for k in range(n)]
    growth[-1] = top
    if direction == "forward":
        report, code = chain(growth, [1.0] * n), "exploding_activations"
    else:
        report, code = chain([1.0] * n, growth[::-1]), "exploding_gradients"
    found = depth_rule(report, THR)
    assert [f.severity for f in found if f.code == code] == ([expected] if expected else [])


def test_polynomial_decay_gets_no_warning_but_still_an_error_when_extreme() -> None:
    n = 31
    poly = [(1 + k) ** -5.0 for k in range(n)]  # 31^-5 ≈ 3.5e-8, below the forward warning level
    assert not depth_rule(chain(poly, [1.0] * n), THR)
    poly_extreme = [(1 + k) ** -7.0 for k in range(n)]  # ≈ 3.6e-11
    found = depth_rule(chain(poly_extreme, [1.0] * n), THR)
    assert [(f.code, f.severity, f.evidence["trend"]) for f in found] == [
        ("vanishing_activations", "error", "polynomial")
    ]


def test_warning_needs_enough_layers_for_a_trend() -> None:
    found = depth_rule(chain([1.0, 1e-4, 1e-8], [1.0] * 3), THR)  # 3 < trend_min_layers
    assert not found
    assert depth_rule(chain([1.0, 1e-4, 1e-8], [1.0] * 3), dataclasses.replace(THR, trend_min_layers=3))


def test_relu_xavier_calibration_shape() -> None:
    """The shape of the calibration models: 0.5 per layer over 29 steps is an error both ways,
    over 21 steps (He et al.'s trainable 22-layer Xavier net) the backward is only a warning."""
    deep = chain([0.5**k * (1 / 30) ** (k / 29) for k in range(30)], [0.5 ** (29 - k) for k in range(30)])
    found = diagnose(deep)
    assert sorted((f.code, f.severity) for f in found) == [
        ("vanishing_activations", "error"),
        ("vanishing_gradients", "error"),
    ]
    back = only(found, "vanishing_gradients").evidence
    assert back["per_layer_gain"] == pytest.approx(0.5)
    assert back["profile"]["layers"][:2] == ["fc29", "fc28"] and back["profile"]["gains"][0] is None
    assert back["profile"]["gains"][1:] == pytest.approx([0.5] * 29)
    assert only(found, "vanishing_gradients").evidence["suggested_init"] == "kaiming_normal"
    shallow = chain([0.5**k * (1 / 20) ** (k / 21) for k in range(22)], [0.5 ** (21 - k) for k in range(22)])
    assert sorted((f.code, f.severity) for f in diagnose(shallow)) == [
        ("vanishing_activations", "warning"),
        ("vanishing_gradients", "warning"),
    ]


def test_non_finite_metrics_are_left_out_of_the_profile() -> None:
    report = chain([1.0, 0.5, 0.25], [1.0, 1.0, 1.0])
    report.layers[1].act = stats(float("nan"), nonfinite_units=1, nonfinite=3)
    profile = depth_profile(report)
    assert profile.points[1].forward_ratio is None
    assert not depth_rule(report, THR)


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def zero_head_report(
    *, checked: bool, after_hidden: float | None = 1e-3, head_rms: float = 0.0, hidden: int = 4
) -> Report:
    """Hidden layers `fc0…` with normal weights, a head `head` with weight rms ``head_rms``: the
    hidden layers get zero gradient and the head outputs nothing."""
    layers = []
    for i in range(hidden):
        extra = {"after_steps": {"grad_energy": after_hidden, "signal_var": 1.0}} if checked else {}
        layers.append(layer(f"fc{i}", 2 * i, act=stats(1.0), grad=stats(0.0), activation="relu", extra=extra))
        layers.append(
            layer(f"relu{i}", 2 * i + 1, type="ReLU", act=stats(0.5), grad=stats(0.0), weight_rms=None)
        )
    head_extra = {"after_steps": {"grad_energy": 1.0, "signal_var": 1e-4}} if checked else {}
    head_act = stats(0.0) if head_rms == 0 else stats(head_rms**2 * 256)
    layers.append(
        layer(
            "head",
            2 * hidden,
            act=head_act,
            grad=stats(1.0),
            params=[param("weight", (10, 256), head_rms), param("bias", (10,), 0.0)],
            extra=head_extra,
        )
    )
    meta: dict[str, Any] = {"samples": 256}
    if checked:
        meta["gate_check"] = {"steps": 3, "lr": 1e-3, "optimizer": "adam"}
    return Report(layers=layers, meta=meta)


def test_zero_head_is_a_verified_gate_not_vanishing() -> None:
    report = zero_head_report(checked=True)
    found = diagnose(report)
    assert codes(found) == ["zero_gate"]
    f = found[0]
    assert f.severity == "info" and f.layers == ("head",)
    assert f.evidence["held_back"] == ["fc0", "fc1", "fc2", "fc3", "head"]
    assert f.evidence["gates"]["head"]["directions"] == ["forward", "backward"]
    assert f.evidence["worst_ratio"] == 0.0 and f.evidence["worst_ratio_after_steps"] == pytest.approx(1e-4)
    assert "3 adam steps" in f.message


def test_gate_without_the_step_check_is_an_unverified_warning() -> None:
    found = diagnose(zero_head_report(checked=False))
    assert [(f.code, f.severity, f.layers) for f in found] == [("zero_gate", "warning", ("head",))]


@pytest.mark.parametrize(
    "first_after,gated",
    [
        (2.0**-35, False),  # 2^-10 of the largest layer behind the gate: at the warning level
        (2.0**-34, True),
        (0.0, False),  # still nothing after the steps
    ],
)
def test_gate_needs_a_healthy_profile_behind_it_after_the_steps(first_after: float, gated: bool) -> None:
    """After the steps the hidden layers are still held back by the (barely opened) zero head; what
    makes it a gate is that the profile *behind* the gate is healthy: each layer above the warning
    level relative to the largest layer held back by the same gate (the steps lift plain vanishing,
    so after them the stricter level applies)."""
    thr = {"vanishing_gradients_error": 2.0**-20, "vanishing_gradients_warning": 2.0**-10}
    report = zero_head_report(checked=True, after_hidden=2.0**-25)
    report["fc0"].extra["after_steps"]["grad_energy"] = first_after
    found = diagnose(report, **thr)
    if gated:
        assert codes(found) == ["zero_gate"]
        deficits = find_deficits(report, depth_profile(report), dataclasses.replace(THR, **thr))
        assert {(d.layer, d.how) for d in deficits if d.direction == "backward"} == {
            ("fc0", "steps"),
            ("fc1", "steps"),
            ("fc2", "steps"),
            ("fc3", "steps"),
        }
    else:
        f = only(found, "vanishing_gradients")
        assert f.severity == "error" and f.layers[0] == "fc0"
        assert f.evidence["after_steps_ratio"] == first_after


def test_after_the_steps_a_layer_must_reach_the_warning_level() -> None:
    """After the steps `fc0` gets 1e-7 of the gradient of the others behind the same zero head
    (error level 1e-8 < 1e-7 ≤ warning level 1e-6): a decay the head does not explain."""
    report = zero_head_report(checked=True, after_hidden=1e-2)
    report["fc0"].extra["after_steps"]["grad_energy"] = 1e-9
    found = diagnose(report)
    assert [(f.code, f.severity, f.layers[0]) for f in found] == [
        ("vanishing_gradients", "error", "fc0"),
        ("zero_gate", "info", "head"),  # fc1 … fc3 and the head's own output are gated
    ]
    report["fc0"].extra["after_steps"]["grad_energy"] = 1.0001e-8
    assert codes(diagnose(report)) == ["zero_gate"]


def test_tiny_gate_is_decided_at_init_by_the_profile_behind_it() -> None:
    """LayerScale 1e-6: no step check needed, the layers behind the gate are healthy among themselves
    (gated, how="scale"); a decaying profile behind the same gate is vanishing."""
    report = zero_head_report(checked=False, head_rms=1e-6 / 16)
    for x in report.layers[:-1]:
        x.grad = stats(1e-12)
    assert codes(diagnose(report)) == ["zero_gate"]
    assert diagnose(report)[0].severity == "info"
    assert {d.how for d in find_deficits(report, depth_profile(report), THR)} == {"scale"}
    report["fc0"].grad = stats(1e-21)  # 1e-9 of the others behind the gate
    found = diagnose(report)
    assert [(f.code, f.severity, f.layers) for f in found] == [
        ("vanishing_gradients", "error", ("fc0",)),
        ("zero_gate", "info", ("head",)),  # still the gate of the healthy fc1 … fc3
    ]
    assert found[1].evidence["held_back"] == ["fc1", "fc2", "fc3", "head"]  # head: forward


@pytest.mark.parametrize("scale,is_gate", [(0.01, True), (0.0101, False)])
def test_gate_parameter_scale_boundary(scale: float, is_gate: bool) -> None:
    head_rms = scale / math.sqrt(256)  # rms·√fan_in = scale
    report = zero_head_report(checked=True, head_rms=head_rms)
    for x in report.layers[:-1]:
        x.grad = stats(1e-12) if x.grad is not None else None
    assert gate_scale(report["head"]) == pytest.approx(scale)
    deficits = [d for d in find_deficits(report, depth_profile(report), THR) if d.direction == "backward"]
    assert {d.status for d in deficits} == ({"gated"} if is_gate else {"persistent"})
    assert codes(diagnose(report), "error") == ([] if is_gate else ["vanishing_gradients"])


def test_adam_recovery_without_a_gate_parameter_is_still_vanishing() -> None:
    """A few Adam steps lift plain exponential vanishing too: without a gate parameter the deficit
    stays an error however much it recovered."""
    n = 30
    report = chain([1.0] * n, [0.5 ** (n - 1 - k) for k in range(n)], meta={"samples": 256})
    report.meta["gate_check"] = {"steps": 3, "lr": 1e-3, "optimizer": "adam"}
    for k, x in enumerate(report.layers):
        x.extra["after_steps"] = {"grad_energy": 0.8 ** (n - 1 - k), "signal_var": 1.0}
    found = diagnose(report)
    assert [(f.code, f.severity) for f in found] == [("vanishing_gradients", "error")]
    assert found[0].evidence["gated_layers_left_out"] == []


def test_zero_gamma_gate_is_found_past_a_shared_activation() -> None:
    """A residual block in execution order: conv1, bn1, relu (shared with the post-add ReLU, so its
    merged gradient is healthy), conv2, bn2 (γ = 0). The deficits on both sides of the relu name bn2."""
    checked = {"after_steps": {"grad_energy": 0.1, "signal_var": 1.0}}
    ok = {"after_steps": {"grad_energy": 1.0, "signal_var": 1.0}}
    report = Report(
        layers=[
            layer("stem", 0, act=stats(), grad=stats(), activation="relu", extra=ok),
            layer("conv1", 1, act=stats(), grad=stats(0.0), activation="relu", extra=checked),
            layer(
                "bn1",
                2,
                type="BatchNorm2d",
                act=stats(),
                grad=stats(0.0),
                params=[param("weight", (8,), 1.0)],
            ),
            layer("relu", 3, type="ReLU", act=stats(), grad=stats(0.5), weight_rms=None, calls=2),
            layer("conv2", 4, act=stats(), grad=stats(0.0), extra=checked),
            layer(
                "bn2",
                5,
                type="BatchNorm2d",
                act=stats(0.0),
                grad=stats(),
                params=[param("weight", (8,), 0.0)],
            ),
            layer("head", 6, act=stats(), grad=stats(), extra=ok),
        ],
        meta={"samples": 256, "gate_check": {"steps": 3, "lr": 1e-3, "optimizer": "adam"}},
    )
    found = diagnose(report)
    assert [(f.code, f.severity, f.layers) for f in found] == [("zero_gate", "info", ("bn2",))]
    assert found[0].evidence["gates"]["bn2"]["held_back"] == ["conv1", "conv2"]
    assert zero_gate_rule(report, THR) == [found[0]]
    # Called once, the healthy relu would end the run: conv1 would have no gate behind it.
    report["relu"].calls = 1
    assert codes(diagnose(report), "error") == ["vanishing_gradients"]


def fixup_report(branch_after: float) -> Report:
    """Fixup in miniature: a zero head in front of a residual branch whose last layer is zero. At init
    every gradient below the head is 0; after the steps the head is open and the branch is still
    behind its own zero layer `b2`."""

    def after(grad: float, signal: float = 1.0) -> dict[str, Any]:
        return {"after_steps": {"grad_energy": grad, "signal_var": signal}}

    return Report(
        layers=[
            layer("inp", 0, act=stats(1.0), grad=stats(0.0), activation="relu", extra=after(0.5)),
            layer("b0", 1, act=stats(1.0), grad=stats(0.0), activation="relu", extra=after(branch_after)),
            layer("b1", 2, type="ReLU", act=stats(0.5), grad=stats(0.0), weight_rms=None),
            layer("b2", 3, act=stats(0.0), grad=stats(0.0), weight_rms=0.0, extra=after(0.5, 1e-4)),
            layer(
                "head",
                4,
                act=stats(0.0),
                grad=stats(1.0),
                params=[param("weight", (10, 256), 0.0)],
                extra=after(1.0, 1e-4),
            ),
        ],
        meta={"samples": 256, "gate_check": {"steps": 3, "lr": 1e-3, "optimizer": "adam"}},
    )


def test_nested_gates_after_the_steps() -> None:
    found = diagnose(fixup_report(1e-7))
    assert [(f.code, f.severity, f.layers) for f in found] == [("zero_gate", "info", ("b2", "head"))]
    assert found[0].evidence["gates"]["b2"]["held_back"] == ["b0", "b2"]  # b0 backward, b2 forward
    # The inner gate has not opened within the steps: a warning naming it, not an error.
    found = diagnose(fixup_report(0.0))
    assert [(f.code, f.severity, f.layers) for f in found] == [
        ("zero_gate", "warning", ("b2",)),
        ("zero_gate", "info", ("b2", "head")),
    ]


def test_zero_output_behind_a_gate_is_not_dead() -> None:
    """A ReLU fed by a zero-init layer outputs exactly zero: that is the gate, not dead units."""
    report = zero_head_report(checked=True)
    report.layers.append(
        layer(
            "out_relu",
            99,
            type="ReLU",
            act=stats(0.0, units=10, unit_max=[0.0] * 10, unit_min=[0.0] * 10, zeros=2560),
            weight_rms=None,
        )
    )
    assert codes(diagnose(report)) == ["zero_gate"]


# --------------------------------------------------------------------------------------------
# Symmetry
# --------------------------------------------------------------------------------------------


def symmetry_extra(
    *,
    units: int = 8,
    locked: int = 0,
    broken: int = 0,
    zero: dict[str, int] | None = None,
    largest: int = 8,
) -> dict[str, Any]:
    zero = zero or {}
    z_groups = sum(zero.values())
    return {
        "units": units,
        "distinct": 1,
        "effective_width": 1 / units,
        "groups": locked + broken + z_groups,
        "largest_group": largest,
        "locked": {"groups": locked, "units": locked * largest},
        "broken": {"groups": broken, "units": broken * largest},
        "frozen": {"groups": 0, "units": 0},
        "zero_gradient": {
            "groups": z_groups,
            "units": z_groups * largest,
            **{
                f"outgoing_{k}": {"groups": zero.get(k, 0), "units": zero.get(k, 0) * largest}
                for k in ("identical", "distinct", "unknown")
            },
        },
        "examples": [],
        "rtol": 1e-3,
        "parameters": ["bias", "weight"],
    }


def sym_report(extra: dict[str, Any], *, after_energy: float | None = None) -> Report:
    x = layer("fc0", 0, act=stats(), grad=stats(), activation="tanh", extra={"symmetry": extra})
    meta: dict[str, Any] = {"samples": 256}
    if after_energy is not None:
        x.extra["after_steps"] = {"grad_energy": after_energy}
        meta["gate_check"] = {"steps": 3, "lr": 1e-3}
    return Report(layers=[x, layer("head", 1, act=stats(), grad=stats())], meta=meta)


@pytest.mark.parametrize(
    "extra,after,expected",
    [
        (symmetry_extra(locked=1), None, [("symmetry", "error")]),
        (symmetry_extra(broken=1), None, [("tie_broken_by_gradients", "info")]),
        (symmetry_extra(zero={"identical": 1}), None, [("symmetry", "error")]),
        (symmetry_extra(zero={"distinct": 1}), None, [("tie_broken_by_gradients", "info")]),
        (symmetry_extra(zero={"unknown": 1}), None, [("symmetry", "warning")]),
        (symmetry_extra(zero={"unknown": 1}), 0.0, [("symmetry", "error")]),
        (symmetry_extra(zero={"unknown": 1}), 0.5, [("symmetry", "warning")]),
        (symmetry_extra(zero={"distinct": 1}), 0.0, [("symmetry", "error")]),
        (symmetry_extra(largest=1), None, []),
    ],
)
def test_symmetry_severities(
    extra: dict[str, Any], after: float | None, expected: list[tuple[str, str]]
) -> None:
    found = symmetry_rule(sym_report(extra, after_energy=after), THR)
    assert [(f.code, f.severity) for f in found] == expected
    for f in found:
        assert f.layers == ("fc0",)
    if expected == [("symmetry", "error")]:
        assert found[0].evidence["suggested_init"] == "xavier_normal"  # tanh follows
        assert "effective width 0.12" in found[0].message


# --------------------------------------------------------------------------------------------
# Dead units
# --------------------------------------------------------------------------------------------


def relu_report(dead: int, units: int = 100, samples: int = 256, depth: int = 1) -> Report:
    layers = []
    for i in range(depth - 1):
        layers.append(layer(f"r{i}", i, type="ReLU", act=stats(units=units), weight_rms=None))
    hi = [0.0] * dead + [1.0] * (units - dead)
    layers.append(
        layer(
            "relu",
            depth,
            type="ReLU",
            act=stats(units=units, unit_max=hi, unit_min=[-1.0] * units),
            weight_rms=None,
        )
    )
    return Report(layers=layers, meta={"samples": samples})


@pytest.mark.parametrize(
    "dead,samples,expected",
    [
        (95, 256, "error"),  # 95%: at the error fraction
        (94, 256, "warning"),
        (100, 64, "error"),  # exactly dead_min_samples: enough
        (100, 63, "warning"),  # too few samples to tell
        (50, 256, "warning"),  # at the warning fraction
        (49, 256, None),
    ],
)
def test_dead_unit_boundaries(dead: int, samples: int, expected: str | None) -> None:
    found = dead_units_rule(relu_report(dead, samples=samples), THR)
    assert [f.severity for f in found] == ([expected] if expected else [])
    if found:
        f = found[0]
        assert f.layers == ("relu",) and f.evidence["dead_units"] == dead and f.evidence["samples"] == samples
        assert ("too small to tell" in f.message) == (samples < 64)


def test_dead_units_allow_for_depth() -> None:
    assert expected_dead_fraction(10) == pytest.approx(0.14)
    assert expected_dead_fraction(50) == pytest.approx(0.40)
    assert expected_dead_fraction(1) == 0.0
    # At ReLU depth 100 random init alone leaves ≈ 51% off: 60% is not yet a warning, 62% is.
    assert expected_dead_fraction(100) + THR.dead_margin == pytest.approx(0.612, abs=1e-3)
    assert not dead_units_rule(relu_report(60, depth=100), THR)
    assert [f.severity for f in dead_units_rule(relu_report(62, depth=100), THR)] == ["warning"]


def test_dead_rule_reads_relu_family_only() -> None:
    report = relu_report(100)
    report.layers[-1].type = "Tanh"
    assert not dead_units_rule(report, THR)
    report.layers[-1].type = "LeakyReLU"
    assert codes(dead_units_rule(report, THR)) == ["dead_units"]


# --------------------------------------------------------------------------------------------
# Saturation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "saturated,expected", [(2999, None), (3000, "warning"), (7499, "warning"), (7500, "error")]
)
def test_saturation_boundaries(saturated: int, expected: str | None) -> None:
    act = stats(units=100, rows=100, saturated=saturated)  # 10 000 elements
    report = Report(layers=[layer("tanh", 0, type="Tanh", act=act, weight_rms=None)], meta={})
    found = saturation_rule(report, THR)
    assert [f.severity for f in found] == ([expected] if expected else [])
    if found:
        assert found[0].evidence["saturated_fraction"] == saturated / 10000 and found[0].layers == ("tanh",)


def test_unbounded_activations_have_no_saturation() -> None:
    report = Report(layers=[layer("relu", 0, type="ReLU", act=stats(), weight_rms=None)], meta={})
    assert not saturation_rule(report, THR)


# --------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")


def nan_stats() -> TensorStats:
    return stats(
        [1.0, NAN], units=2, unit_max=[1.0, NAN], unit_min=[-1.0, NAN], nonfinite_units=1, nonfinite=7
    )


def mask_stats() -> TensorStats:
    return stats(
        [1.0, NAN], units=2, mean=[0.0, -INF], unit_max=[1.0, 0.5], unit_min=[-1.0, -INF], nonfinite_units=1
    )


def test_first_module_with_nan_output_and_its_inputs() -> None:
    report = Report(
        layers=[
            layer("fc0", 0, act=stats(), grad=stats(), extra={"inputs_finite": True}),
            layer(
                "log",
                1,
                type="Log",
                act=nan_stats(),
                grad=nan_stats(),
                weight_rms=None,
                extra={"inputs_finite": True},
            ),
            layer("fc1", 2, act=nan_stats(), grad=nan_stats(), extra={"inputs_finite": False}),
        ],
        meta={},
    )
    found = non_finite_rule(report, THR)
    assert len(found) == 1
    f = found[0]
    assert (f.code, f.severity, f.layers) == ("non_finite", "error", ("log",))
    assert (
        f.evidence["inputs_finite"] is True and f.evidence["kind"]["nan"] and f.evidence["kind"]["count"] == 7
    )
    assert "creates them" in f.message and "7 NAN" in f.message
    assert f.evidence["gradients_non_finite_from"] == "fc1"
    report.layers[1].extra["inputs_finite"] = False
    assert "already non-finite" in non_finite_rule(report, THR)[0].message


def test_attention_mask_is_not_an_error_unless_nothing_after_it_is_finite() -> None:
    masked = Report(
        layers=[
            layer("scores", 0, type="Mask", act=mask_stats(), weight_rms=None),
            layer("softmax", 1, type="Softmax", act=stats(units=2), weight_rms=None),
            layer("fc", 2, act=stats(), grad=stats()),
        ],
        meta={},
    )
    assert not non_finite_rule(masked, THR)
    assert not [f for f in diagnose(masked) if f.code == "non_finite"]
    at_the_end = Report(layers=[layer("fc", 0, act=stats(), grad=stats()), masked.layers[0]], meta={})
    found = non_finite_rule(at_the_end, THR)
    assert [(f.code, f.layers) for f in found] == [("non_finite", ("scores",))]
    plus_inf = stats([1.0, NAN], units=2, unit_max=[1.0, INF], unit_min=[-1.0, -INF], nonfinite_units=1)
    masked.layers[0].act = plus_inf
    assert non_finite_rule(masked, THR)[0].layers == ("scores",)


def test_backward_only_non_finite_names_the_first_in_backward_order() -> None:
    report = Report(
        layers=[
            layer("fc0", 0, act=stats(), grad=nan_stats()),
            layer("sqrt", 1, type="Sqrt", act=stats(), grad=nan_stats(), weight_rms=None),
            layer("fc1", 2, act=stats(), grad=stats()),
        ],
        meta={},
    )
    f = only(non_finite_rule(report, THR), "non_finite")
    assert f.layers == ("sqrt",) and f.evidence["direction"] == "backward"


# --------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------


def test_initializer_matched_to_activation() -> None:
    assert init_for_activation("relu")[0] == "kaiming_normal"
    assert init_for_activation("leaky_relu")[0] == "kaiming_normal"
    assert init_for_activation("gelu")[0] == "kaiming_normal"
    assert init_for_activation("tanh")[0] == "xavier_normal"
    assert init_for_activation("sigmoid")[0] == "xavier_normal"
    assert init_for_activation("selu")[0] == "lecun_normal"
    assert init_for_activation(None)[0] == "orthogonal"


def test_init_alone_cannot_fix_batchnorm_or_residual_growth() -> None:
    he = math.sqrt(2 / 256)
    report = chain([1.0] * 4, [1.0] * 4, weight_rms=he)
    assert weight_scale_match(report) == 1.0
    xavier = chain([1.0] * 4, [1.0] * 4, weight_rms=math.sqrt(1 / 256))
    assert weight_scale_match(xavier) == 0.0
    text, init = depth_fix(xavier, "vanishing_gradients")
    assert init == "kaiming_normal" and "He/Kaiming" in text
    report.layers.append(
        layer("bn", 9, type="BatchNorm1d", act=stats(), grad=stats(), params=[param("weight", (256,), 1.0)])
    )
    text, init = depth_fix(report, "exploding_gradients")
    assert init is None and "BatchNorm without skip connections" in text
    text, init = depth_fix(report, "exploding_activations")
    assert init is None and "residual branch" in text


def test_suggested_init_reads_error_findings() -> None:
    n = 30
    report = chain([1.0] * n, [0.5 ** (n - 1 - k) for k in range(n)], meta={"init": "xavier_normal"})
    report.findings = diagnose(report)
    assert suggested_init(report) == "kaiming_normal"
    report.meta["init"] = "kaiming_normal"
    assert suggested_init(report) is None  # already used: init alone does not help
    assert suggested_init(chain([1.0] * 3, [1.0] * 3)) is None  # nothing to fix


# --------------------------------------------------------------------------------------------
# Unit analysis (symmetry facts) on tiny modules with hand-set weights and gradients
# --------------------------------------------------------------------------------------------


def test_group_rows_is_exact() -> None:
    x = torch.randn(64, 16)
    x[10] = x[3]
    x[20] = x[3]
    x[5, 0] = -0.0
    x[6] = x[5]
    x[6, 0] = 0.0  # −0.0 == +0.0
    x[7] = x[8]
    x[7, 1] = x[8, 1] = float("nan")  # NaN never matches
    x[30] = x[31]
    x[30, 15] = torch.nextafter(x[31, 15], torch.tensor(math.inf))  # one ulp apart: distinct
    assert group_rows([x]) == [[3, 10, 20], [5, 6]]
    assert group_rows([x, torch.arange(64.0).reshape(64, 1)]) == []  # the bias differs


def _report_for(model: nn.Module) -> Report:
    layers = [
        layer(name or "model", i, act=stats(), grad=stats())
        for i, (name, m) in enumerate(model.named_modules())
        if any(p is not None and p.dim() >= 2 for p in m._parameters.values())
    ]
    return Report(layers=layers, meta={})


def test_analyse_units_locked_broken_and_zero_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 6))
        model[0].weight[4:] = model[0].weight[0]  # units 0, 4..7 identical incoming
        model[0].bias.zero_()
        model[1].weight.zero_()  # all 8 units identical (zero), zero gradient below
        model[1].bias.zero_()
        model[2].weight.copy_(torch.randn(3, 8))
        model[2].weight[:, 1] = model[2].weight[:, 0]  # outgoing of fc1's units 0 and 1 identical
    grads = {id(p): torch.randn_like(p) for p in model.parameters()}
    g0 = grads[id(model[0].weight)]
    g0[4] = g0[0]  # unit 4 shares unit 0's gradient: locked with it
    g0[5] = g0[0] * (1 + 1e-4)  # within rtol: rounding, still locked
    g0[6] = g0[0] * (1 + 2e-3)  # beyond rtol: a broken tie
    gb = grads[id(model[0].bias)]
    gb[4] = gb[0]
    gb[5] = gb[0] * (1 + 1e-4)
    gb[6] = gb[0] * (1 + 2e-3)
    grads[id(model[1].weight)].zero_()
    grads[id(model[1].bias)].zero_()
    report = _report_for(model)
    analyse_units(report, model, None, grads)
    s0 = report["0"].extra["symmetry"]
    assert s0["units"] == 8 and s0["distinct"] == 4 and s0["groups"] == 1 and s0["largest_group"] == 5
    assert s0["broken"]["groups"] == 1 and s0["locked"]["groups"] == 0
    assert s0["effective_width"] == pytest.approx(0.5)
    assert s0["examples"][0]["units"] == [0, 4, 5, 6, 7]
    s1 = report["1"].extra["symmetry"]
    assert s1["distinct"] == 1 and s1["zero_gradient"]["groups"] == 1
    assert s1["zero_gradient"]["outgoing_distinct"]["groups"] == 1  # the head's columns differ
    s2 = report["2"].extra["symmetry"]
    assert s2["groups"] == 0 and s2["effective_width"] == 1.0
    # Remove unit 6's difference: now the group of 5 is locked.
    g0[6] = g0[0]
    gb[6] = gb[0]
    g0[7] = g0[0]
    gb[7] = gb[0]
    analyse_units(report, model, None, grads)
    assert report["0"].extra["symmetry"]["locked"] == {"groups": 1, "units": 5}
    assert [f.code for f in symmetry_rule(report, THR)] == ["symmetry", "tie_broken_by_gradients"]


def test_group_units_names_the_gradients_the_analysis_reads() -> None:
    """The probe groups units from the weights before its passes and keeps only the gradients of
    layers with identical units and of the layers that can follow them (input width = their units);
    the analysis from those gradients alone equals the analysis from every gradient."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    names = ["0", "1", "2", "3"]
    groups = group_units(model, names, None)
    assert groups.gradients_needed == {"1", "2"}  # "0" has no identical units, "3" reads 5 inputs
    assert set(groups.found) == set(names) and [g for _, g in groups.found["1"]] == [[list(range(8))]]
    grads = {id(p): torch.randn_like(p) for p in model.parameters()}
    grads[id(model[2].weight)][:, 1] = grads[id(model[2].weight)][:, 0]
    full, kept = _report_for(model), _report_for(model)
    analyse_units(full, model, None, grads)
    needed = {id(p) for n in groups.gradients_needed for p in model[int(n)].parameters()}
    analyse_units(kept, model, None, {k: g for k, g in grads.items() if k in needed}, groups=groups)
    assert [x.extra["symmetry"] for x in kept.layers] == [x.extra["symmetry"] for x in full.layers]
    assert full["1"].extra["symmetry"]["zero_gradient"]["groups"] == 0  # random gradients: broken
    # the zero layer's gradients are what decide: without them the layer would read as frozen
    analyse_units(kept, model, None, {}, groups=groups)
    assert kept["1"].extra["symmetry"]["frozen"]["groups"] == 1
    # a layer the early grouping did not cover is grouped by the analysis itself
    partial = group_units(model, ["0", "2"], None)
    analyse_units(kept, model, None, grads, groups=partial)
    assert [x.extra["symmetry"] for x in kept.layers] == [x.extra["symmetry"] for x in full.layers]
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    assert group_units(meta, ["0"], None).found == {}  # nothing to read on meta


def test_analyse_units_uses_the_initialised_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    used = {id(p): nn.Parameter(torch.ones_like(p)) for p in model.parameters()}
    grads = {id(q): torch.ones_like(q) for q in used.values()}
    report = _report_for(model)
    analyse_units(report, model, used, grads)
    assert report["0"].extra["symmetry"]["locked"] == {"groups": 1, "units": 4}
    assert not torch.equal(model[0].weight, torch.ones(4, 4))  # the user's own weights are untouched


def test_unit_layout_of_rnn_attention_and_transposed_conv() -> None:
    lstm = nn.LSTM(3, 5, num_layers=2)
    sets = unit_features(lstm, dict(lstm.named_parameters()))
    assert [s.label for s in sets] == ["l0", "l1"] and all(s.units == 5 for s in sets)
    w = lstm.weight_ih_l0

    def unit_row(parts: list[tuple[str, torch.Tensor]], name: str, unit: int) -> torch.Tensor:
        # one (units, d) view per gate / q-k-v chunk, read side by side
        return torch.cat([t[unit] for n, t in parts if n == name])

    assert torch.equal(unit_row(sets[0].parts, "weight_ih_l0", 2), torch.cat([w[2], w[7], w[12], w[17]]))
    assert all(t._base is not None for _, t in sets[0].parts)  # views, not copies
    mha = nn.MultiheadAttention(6, 2)
    (s,) = unit_features(mha, dict(mha.named_parameters()))
    ipw = mha.in_proj_weight
    assert s.units == 6 and torch.equal(unit_row(s.parts, "in_proj_weight", 1), torch.cat([ipw[1], ipw[7], ipw[13]]))
    convt = nn.ConvTranspose2d(4, 6, 3, groups=2)
    (s,) = unit_features(convt, dict(convt.named_parameters()))
    wt = convt.weight  # (in=4, out/groups=3, 3, 3)
    assert s.units == 6 and torch.equal(dict(s.parts)["weight"][4], wt[2:4, 1].reshape(-1))
    assert unit_features(nn.Embedding(10, 4), {"weight": torch.zeros(10, 4)}) == []


@pytest.mark.parametrize("head_grad_columns_differ,outgoing", [(True, "distinct"), (False, "identical")])
def test_zero_rows_before_a_zero_layer_look_at_its_gradient_columns(
    head_grad_columns_differ: bool, outgoing: str
) -> None:
    """Fixup: a zero layer followed by a zero classifier. The classifier's columns are identical (all
    0) at init, but when its gradient columns differ they separate after one step, and with them
    the units of the zero layer: a broken tie. Identical gradient columns keep them locked."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    for p in model.parameters():
        nn.init.zeros_(p)
    grads = {id(p): torch.zeros_like(p) for p in model.parameters()}
    if head_grad_columns_differ:
        grads[id(model[1].weight)] = torch.randn(3, 8)
    else:
        grads[id(model[1].weight)] = torch.randn(3, 1).expand(3, 8).clone()
    report = _report_for(model)
    analyse_units(report, model, None, grads)
    zero = report["0"].extra["symmetry"]["zero_gradient"]
    assert zero["groups"] == 1 and zero[f"outgoing_{outgoing}"] == {"groups": 1, "units": 8}
    expected = "tie_broken_by_gradients" if outgoing == "distinct" else "symmetry"
    assert [f.code for f in symmetry_rule(report, THR) if "0" in f.layers] == [expected]
