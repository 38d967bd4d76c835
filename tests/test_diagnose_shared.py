"""One diagnosis computes what its rules share once, and finds exactly what the rules find alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import zoo
from gradprobe.diagnose import Thresholds, diagnose, profile
from gradprobe.diagnose.finding import SEVERITIES, Finding
from gradprobe.diagnose.gates import find_deficits, report_deficits
from gradprobe.diagnose.profile import analysis_scope, depth_profile, per_report
from gradprobe.diagnose.rules import RULES, _finite_extremes, _nonfinite
from gradprobe.probing import probe
from gradprobe.report import Report


def _rules_one_by_one(report: Report, thr: Thresholds) -> list[dict[str, Any]]:
    """Every rule on its own, outside any analysis scope, sorted as diagnose() sorts."""
    findings = [f for rule in RULES.values() for f in rule(report, thr)]
    position = {layer.name: i for i, layer in enumerate(report.layers)}

    def key(f: Finding) -> tuple[int, int]:
        first = min((position.get(n, len(position)) for n in f.layers), default=len(position))
        return SEVERITIES.index(f.severity), first

    return [f.to_dict() for f in sorted(findings, key=key)]


def _nan_input_report() -> Report:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(32, 16)
    x[2, 3] = math.nan
    return probe(net, x, diagnose=False)


def _zoo_report(name: str, **options: Any) -> Report:
    model, inputs = zoo.example(name, batch=16)
    return probe(model, inputs, diagnose=False, **options)


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    return {
        "mlp": _zoo_report("mlp"),  # vanishing: depth findings and their suggestions
        "zero_head": _zoo_report("zero_head_mlp", gate_check=True),  # gates after optimizer steps
        "rezero_unchecked": _zoo_report("rezero_mlp", gate_check=False),
        "transformer": _zoo_report("transformer"),  # −inf attention mask, GELU
        "symmetric": _zoo_report("mlp", init="zeros"),
        "nan": _nan_input_report(),
    }


STRICT = Thresholds(
    trend_min_layers=2,
    vanishing_gradients_warning=1e-2,
    vanishing_activations_warning=1e-2,
    exploding_gradients_warning=2.0,
    exploding_activations_warning=2.0,
    dead_warning_fraction=0.05,
    dead_margin=0.0,
    saturation_warning=0.01,
)


@pytest.mark.parametrize("thr", [Thresholds(), STRICT], ids=["defaults", "strict"])
def test_diagnose_finds_what_the_rules_find_one_by_one(reports: dict[str, Report], thr: Thresholds) -> None:
    for name, report in reports.items():
        together = [f.to_dict() for f in diagnose(report, thr)]
        assert together == _rules_one_by_one(report, thr), name
    codes = {f["code"] for r in reports.values() for f in (x.to_dict() for x in diagnose(r, thr))}
    assert {"vanishing_gradients", "symmetry", "non_finite", "zero_gate"} <= codes


def test_one_diagnosis_computes_the_profile_and_the_deficits_once(
    reports: dict[str, Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    report = reports["zero_head"]
    calls = {"profile": 0, "deficits": 0}
    original_profile, original_deficits = profile._depth_profile, find_deficits

    def counted_profile(r: Report) -> Any:
        calls["profile"] += 1
        return original_profile(r)

    def counted_deficits(*args: Any) -> Any:
        calls["deficits"] += 1
        return original_deficits(*args)

    monkeypatch.setattr(profile, "_depth_profile", counted_profile)
    monkeypatch.setattr("gradprobe.diagnose.gates.find_deficits", counted_deficits)
    diagnose(report)
    assert calls == {"profile": 1, "deficits": 1}
    diagnose(report, vanishing_gradients_error=1e-7)  # a new diagnosis computes its own
    assert calls == {"profile": 2, "deficits": 2}
    depth_profile(report)  # outside a diagnosis nothing is kept
    depth_profile(report)
    assert calls["profile"] == 4


def test_analysis_scope_keeps_values_for_its_report_only(reports: dict[str, Report]) -> None:
    report, other = reports["mlp"], reports["nan"]
    computed: list[str] = []

    def compute(tag: str) -> str:
        computed.append(tag)
        return tag

    with analysis_scope(report):
        assert per_report(report, "k", lambda: compute("a")) == "a"
        assert per_report(report, "k", lambda: compute("b")) == "a"
        assert per_report(other, "k", lambda: compute("c")) == "c"  # another report: not kept
        assert depth_profile(report) is depth_profile(report)
        assert report_deficits(report, Thresholds()) is report_deficits(report, Thresholds())
        assert report_deficits(report, STRICT) is not report_deficits(report, Thresholds())
    assert per_report(report, "k", lambda: compute("d")) == "d"
    assert computed == ["a", "c", "d"]
    assert profile._SCOPE.get() is None


def test_analysis_scope_is_left_when_a_rule_fails(
    reports: dict[str, Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(report: Report, thr: Thresholds) -> list[Finding]:
        raise RuntimeError("boom")

    monkeypatch.setitem(RULES, "broken", broken)
    with pytest.raises(RuntimeError, match="boom"):
        diagnose(reports["mlp"])
    assert profile._SCOPE.get() is None


class _Moments:
    def __init__(self, hi: Any, lo: Any) -> None:
        self.unit_max, self.unit_min = hi, lo


class _Stream:
    def __init__(self, hi: Any, lo: Any) -> None:
        self.moments = _Moments(hi, lo)


def test_finite_extremes_is_the_per_stream_check() -> None:
    rng = np.random.default_rng(0)
    special = [math.nan, math.inf, -math.inf]
    for _ in range(2000):
        streams = []
        for _ in range(int(rng.integers(0, 10))):
            pair = []
            for _ in range(2):
                a = rng.normal(size=int(rng.integers(0, 6)))
                a[rng.random(a.shape) < 0.08] = special[int(rng.integers(0, 3))]
                pair.append(a)
            streams.append(_Stream(*pair))
        want = [
            bool(np.isfinite(s.moments.unit_max).all() and np.isfinite(s.moments.unit_min).all())
            for s in streams
        ]
        assert _finite_extremes(streams) == want  # type: ignore[arg-type]
    # arrays that cannot be concatenated are checked one by one
    odd = [_Stream(np.array(1.0), np.array([2.0])), _Stream(np.array([math.inf]), np.zeros(2))]
    assert _finite_extremes(odd) == [True, False]  # type: ignore[arg-type]


def test_nonfinite_with_a_known_verdict_is_the_plain_check(reports: dict[str, Report]) -> None:
    for report in reports.values():
        for layer in report.layers:
            for stats in (layer.act, layer.grad):
                if stats is None:
                    continue
                m = stats.moments
                finite = bool(np.isfinite(m.unit_max).all() and np.isfinite(m.unit_min).all())
                assert _nonfinite(stats, finite) == _nonfinite(stats)
