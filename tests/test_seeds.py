"""seeds=N: gains as a distribution, errors by majority of seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.diagnose.finding import Finding
from gradprobe.report import Report
from gradprobe.seeds import combine_seeds


def _report(seed: int, codes: list[tuple[str, str]]) -> Report:
    findings = [Finding(code=c, severity=s, layers=("0",), message="m.") for c, s in codes]  # type: ignore[arg-type]
    verdict = "unstable" if any(s == "error" for _, s in codes) else "stable"
    return Report(layers=[], meta={"seed": seed}, findings=findings, verdict=verdict)


def test_error_in_a_minority_of_seeds_becomes_a_warning() -> None:
    reports = [_report(0, [("dead_units", "error")]), _report(1, []), _report(2, [])]
    combined = combine_seeds(reports)
    assert combined.verdict == "stable" and combined.meta["seed_verdicts"] == ["unstable", "stable", "stable"]
    (f,) = combined.findings
    assert f.severity == "warning" and f.evidence["seeds_with_error"] == 1 and "(in 1 of 3 seeds)" in f.message


def test_error_in_half_the_seeds_stays_an_error() -> None:
    reports = [_report(0, [("symmetry", "error")]), _report(1, [("symmetry", "error")]), _report(2, []), _report(3, [])]
    combined = combine_seeds(reports)
    assert combined.verdict == "unstable" and combined.findings[0].severity == "error"
    assert combined.meta["seeds"] == [0, 1, 2, 3]


def test_seeds_option_reports_gain_mean_and_spread() -> None:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    report = gradprobe.probe(model, x, init="xavier_normal", seeds=4)
    assert report.meta["seeds"] == [0, 1, 2, 3] and len(report.meta["seed_verdicts"]) == 4
    spread = report["14"].extra["seeds"]["act_gain_log10"]  # the last hidden Linear
    singles = [gradprobe.probe(model, x, init="xavier_normal", seed=s, diagnose=False) for s in range(4)]
    import math

    values = [math.log10(r["14"].act.signal_var / r["0"].act.signal_var) for r in singles]
    assert spread["mean"] == pytest.approx(sum(values) / 4, rel=1e-9)
    assert spread["min"] == pytest.approx(min(values)) and spread["max"] == pytest.approx(max(values))
    assert spread["std"] > 0  # seeds differ
    # Xavier at least halves the ReLU signal per layer (7 halvings ≈ −2.1 decades from layer 0 to 14;
    # the between-sample part falls faster as ReLU correlates the samples)
    assert -4.0 < spread["mean"] < 7 * math.log10(0.5)
    with pytest.raises(gradprobe.UsageError):
        gradprobe.probe(model, x, seeds=0)
