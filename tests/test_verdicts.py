"""The known-answer zoo: models that must be flagged (with the right code) and trainable models that
must come out with no error, each probed end to end (initializer → hooks → report → diagnosis).

Known answers come from the literature (REFERENCE.md): He et al. 2015 (ReLU depth, Xavier vs He),
Schoenholz et al. 2017 (critical tanh), Yang et al. 2019 (BatchNorm without skips), residual-stream
laws, Fixup/ReZero/LayerScale/zero-γ gates, ZerO identity inits, symmetry under constant init. The
models are small (widths 64-256, batches 32-256) so the file runs in CI in well under three
minutes; calibration MLPs use width 256, where finite-width fluctuations of the ratios stay within
a factor ≈ 2 (REFERENCE #6), and the He case runs two seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradprobe
from gradprobe import zoo
from gradprobe.diagnose import diagnose, suggested_init
from gradprobe.report import Report


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread per test process: with ``pytest -n 2`` on two cores, two threads per
    worker oversubscribe the CPU and small ops slow down several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def probe(model: nn.Module, inputs: Any, **options: Any) -> Report:
    return gradprobe.probe(model, inputs, **options)


# --------------------------------------------------------------------------------------------
# Small extra models (the rest come from gradprobe.zoo)
# --------------------------------------------------------------------------------------------


class BatchNormMLP(nn.Sequential):
    """Linear → BatchNorm1d → ReLU, ``depth`` times, no skips (Yang et al. 2019)."""

    def __init__(self, depth: int, width: int) -> None:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        super().__init__(*layers, nn.Linear(width, 10))


class Log(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x)


class Sqrt(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt(x)


class MaskScores(nn.Module):
    """Adds a causal −inf mask to (N, T, T) attention scores: intended non-finite values."""

    def forward(self, scores: Tensor) -> Tensor:
        t = scores.shape[-1]
        return scores + torch.full((t, t), float("-inf")).triu(1)


class MaskedMixer(nn.Module):
    """Single-head attention written with modules: q, k, mask, softmax, mix, head."""

    def __init__(self, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.mask = MaskScores()
        self.softmax = nn.Softmax(dim=-1)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        return self.head(self.softmax(self.mask(scores)) @ x).mean(1)


def fixup_residual_mlp(depth: int = 8, width: int = 128) -> nn.Sequential:
    """Residual MLP with the last layer of every branch and the classifier zero (Fixup-style)."""
    model = zoo.residual_mlp(depth=depth, width=width)
    with torch.no_grad():
        for block in model[:-1]:
            last = block.branch[-1]
            last.weight.zero_()
            last.bias.zero_()
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    return model


def duplicated_rows_mlp(width: int = 128) -> nn.Sequential:
    """He MLP whose first hidden layer has units 1…7 copying unit 0's incoming weights (distinct
    outgoing weights, so gradients break the tie)."""
    model = zoo.frozen_mlp(depth=3, width=width)
    model.requires_grad_(True)
    with torch.no_grad():
        model[0].weight[1:8] = model[0].weight[0]
        model[0].bias[1:8] = model[0].bias[0]
    return model


def rectangular_identity_mlp(width: int = 64, wide: int = 128) -> nn.Sequential:
    """width → wide → width with identity-padded weights: the extra units of the wide layer have
    zero incoming *and* zero outgoing weights, so they are locked at zero forever."""
    up, down = nn.Linear(width, wide), nn.Linear(wide, width)
    with torch.no_grad():
        up.weight.copy_(torch.eye(wide, width))
        down.weight.copy_(torch.eye(width, wide))
        up.bias.zero_()
        down.bias.zero_()
    head = nn.Linear(width, 10)
    return nn.Sequential(up, nn.ReLU(), down, nn.ReLU(), head)


def negative_bias_mlp(width: int = 128) -> nn.Sequential:
    """He MLP whose second hidden layer has bias −10: every one of its ReLU units is off."""
    model = zoo.frozen_mlp(depth=4, width=width)
    model.requires_grad_(True)
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    return model


def nan_mlp(width: int = 64) -> nn.Sequential:
    """Linear → Log: about half of the Linear's outputs are negative, so the log makes NaN."""
    return nn.Sequential(nn.Linear(width, width), Log(), nn.Linear(width, 10))


def sqrt_mlp(width: int = 64) -> nn.Sequential:
    """Linear → ReLU → Sqrt: finite forward (√0 = 0), but d√x/dx = ∞ at the ReLU's zeros and
    ∞ · 0 = NaN in the backward pass."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), Sqrt(), nn.Linear(width, 10))


def zero_head_xavier_mlp(depth: int = 30, width: int = 256) -> nn.Sequential:
    """A vanishing ReLU MLP (Xavier applied by the probe) whose head is zero: the zero head is a gate,
    but the signal behind it still vanishes."""
    return zoo.mlp(depth=depth, width=width, bias=False)


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


def gaussian(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def tokens(batch: int, length: int, vocab: int = 100) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Case:
    """One known answer: ``errors`` is the exact set of error codes expected (empty: trainable),
    ``infos`` codes that must also be present, ``check`` further assertions on the report."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    options: dict[str, Any] = field(default_factory=dict)
    errors: frozenset[str] = frozenset()
    present: frozenset[str] = frozenset()
    absent: frozenset[str] = frozenset()
    check: Callable[[Report], None] | None = None


def codes_at(report: Report, code: str, severity: str | None = None) -> list[tuple[str, ...]]:
    return [
        f.layers for f in report.findings if f.code == code and (severity is None or f.severity == severity)
    ]


def evidence(report: Report, code: str) -> dict[str, Any]:
    (found,) = [f for f in report.findings if f.code == code and f.severity == "error"]
    return found.evidence


# Checks on specific cases (layer names, numbers)


def check_xavier_30(report: Report) -> None:
    back = evidence(report, "vanishing_gradients")
    fwd = evidence(report, "vanishing_activations")
    # He et al.: 0.5 per layer; 2^-29 ≈ 1.9e-9 over the 29 steps from the head to the first layer.
    assert 2e-10 < back["extreme"] < 1e-8 and back["at"] == "0"
    assert back["per_layer_gain"] == pytest.approx(0.5, abs=0.05) and back["trend"] == "exponential"
    assert 1e-12 < fwd["extreme"] < 1e-9 and fwd["trend"] == "exponential"
    assert back["suggested_init"] == "kaiming_normal"
    assert suggested_init(report) == "kaiming_normal"


def check_default_20(report: Report) -> None:
    back = evidence(report, "vanishing_gradients")
    assert back["extreme"] < 1e-8 and back["per_layer_gain"] < 0.4  # n·Var[w] = 1/3
    assert back["suggested_init"] in ("kaiming_normal", "xavier_normal")


def check_no_findings_but_info(report: Report) -> None:
    assert all(f.severity == "info" for f in report.findings), [str(f) for f in report.findings]


def check_zero_head(report: Report) -> None:
    (gate,) = [f for f in report.findings if f.code == "zero_gate"]
    assert gate.severity == "info" and gate.layers == ("12",)  # the head of zoo.zero_head_mlp
    assert set(gate.evidence["held_back"]) >= {"0", "2", "4", "6", "8", "10"}


def check_rezero(report: Report) -> None:
    (gate,) = [f for f in report.findings if f.code == "zero_gate"]
    assert set(gate.layers) == {str(i) for i in range(8)}  # each ReZeroBlock owns its α


def check_layerscale(report: Report) -> None:
    (gate,) = [f for f in report.findings if f.code == "zero_gate"]
    assert set(gate.layers) == {f"blocks.{i}.ls{j}" for i in range(2) for j in (1, 2)}


def check_zero_gamma(report: Report) -> None:
    (gate,) = [f for f in report.findings if f.code == "zero_gate"]
    assert set(gate.layers) == {f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in (0, 1)}


def check_fixup(report: Report) -> None:
    (gate,) = [f for f in report.findings if f.code == "zero_gate"]
    assert "8" in gate.layers  # the zero classifier
    assert codes_at(report, "tie_broken_by_gradients")  # zero rows, distinct outgoing weights


def check_identity(report: Report) -> None:
    for layer in report.layers:
        sym = layer.extra.get("symmetry")
        if sym is not None and layer.name != "14":
            assert sym["groups"] == 0 and sym["effective_width"] == 1.0, layer.name


def check_duplicated(report: Report) -> None:
    (tie,) = [f for f in report.findings if f.code == "tie_broken_by_gradients"]
    assert tie.layers == ("0",)
    sym = report["0"].extra["symmetry"]
    assert sym["largest_group"] == 8 and sym["effective_width"] == pytest.approx(121 / 128)


def check_symmetry_everywhere(names: set[str]) -> Callable[[Report], None]:
    def check(report: Report) -> None:
        (sym,) = [f for f in report.findings if f.code == "symmetry" and f.severity == "error"]
        assert names <= set(sym.layers), sym.layers
        first = sym.evidence["layers"][sym.layers[0]]
        # one distinct unit per unit set (an LSTM layer per set)
        assert first["distinct"] <= 2 and first["effective_width"] <= 2 / first["units"]

    return check


def check_rectangular_identity(report: Report) -> None:
    (sym,) = [f for f in report.findings if f.code == "symmetry" and f.severity == "error"]
    assert sym.layers == ("0",)
    s = report["0"].extra["symmetry"]
    assert s["units"] == 128 and s["distinct"] == 65 and s["largest_group"] == 64


def check_dead(report: Report) -> None:
    (layers,) = codes_at(report, "dead_units", "error")
    assert layers[0] == "3"  # the first dead layer; the ReLUs after it get exactly zero input
    e = evidence(report, "dead_units")["layers"]["3"]
    assert e["dead_units"] == e["units"] == 128 and e["expected_at_init"] < 0.05


def check_saturated(report: Report) -> None:
    (sat,) = [f for f in report.findings if f.code == "saturated_units" and f.severity == "error"]
    assert set(sat.layers) == {"1", "3", "5", "7"} and sat.evidence["saturated_fraction"] > 0.75


def check_nan(report: Report) -> None:
    (f,) = [f for f in report.findings if f.code == "non_finite"]
    assert f.layers == ("1",) and f.evidence["inputs_finite"] is True and f.evidence["kind"]["nan"]


def check_backward_nan(report: Report) -> None:
    (f,) = [f for f in report.findings if f.code == "non_finite"]
    # ∞ appears in the gradient of the ReLU's output (the Sqrt's input), the first in backward order.
    assert f.layers == ("1",) and f.evidence["direction"] == "backward"


def check_residual_growth(report: Report) -> None:
    e = evidence(report, "exploding_activations")
    assert e["per_layer_gain"] > 1.2 and e["suggested_init"] is None  # He already: init cannot help


def check_batchnorm_explosion(report: Report) -> None:
    (f,) = [f for f in report.findings if f.code == "exploding_gradients"]
    assert f.evidence["per_layer_gain"] == pytest.approx(1.47, abs=0.1)  # Yang et al. 2019
    assert "BatchNorm without skip connections" in f.suggestion and f.evidence["suggested_init"] is None


def check_sigmoid(report: Report) -> None:
    e = evidence(report, "vanishing_gradients")
    assert e["extreme"] < 1e-10  # REFERENCE #14: ≈ 1e-13 over 10 layers
    assert e["suggested_init"] is None  # Xavier already: the derivative ≤ 1/4 is the problem


def check_he(report: Report) -> None:
    assert not report.findings, [str(f) for f in report.findings]


MLP_INPUT = gaussian(256, 256)
IMAGES = gaussian(32, 3, 32, 32)
X128 = gaussian(128, 128)

CASES = [
    # ---- trainable: no error ------------------------------------------------------------
    Case("relu_he_30_seed0", lambda: zoo.mlp(30, 256), MLP_INPUT, {"init": "kaiming_normal", "seed": 0}, check=check_he),
    Case("relu_he_30_seed1", lambda: zoo.mlp(30, 256), MLP_INPUT, {"init": "kaiming_normal", "seed": 1}, check=check_he),
    Case("relu_xavier_10", lambda: zoo.mlp(10, 256), MLP_INPUT, {"init": "xavier_normal"}, check=check_he),
    Case("tanh_xavier_30_critical", lambda: zoo.mlp(30, 256, activation="tanh"), MLP_INPUT, {"init": "xavier_normal"}, check=check_he),
    Case("tanh_gain_5_3_30_chaotic", lambda: zoo.mlp(30, 256, activation="tanh"), MLP_INPUT, {"init": "xavier_normal:gain=auto"}),
    Case("selu_lecun_20", lambda: zoo.mlp(20, 128, activation="selu"), X128, {"init": "lecun_normal"}, check=check_he),
    Case("resnet_bn_maxpool_inplace", lambda: zoo.ResNet(zoo.BasicBlock, (1, 1, 1), 8, 10, True, False), IMAGES),
    Case("resnet_style_he", lambda: zoo.resnet_style(width=8), IMAGES, {"init": "kaiming_normal"}),
    Case("vgg_style_pytorch_init", lambda: zoo.vgg_style(), IMAGES),
    Case("vgg_style_he", lambda: zoo.vgg_style(), IMAGES, {"init": "kaiming_normal"}),
    Case("transformer_pre_ln", lambda: zoo.transformer(), tokens(16, 32)),
    Case("lstm", lambda: zoo.lstm_classifier(), tokens(64, 12)),
    Case("gru", lambda: zoo.gru_classifier(), tokens(64, 12)),
    Case("zero_init_residual", lambda: zoo.resnet_style(width=8, zero_init_residual=True), IMAGES, present=frozenset({"zero_gate"}), check=check_zero_gamma),
    Case("rezero", lambda: zoo.rezero_mlp(), X128, present=frozenset({"zero_gate"}), check=check_rezero),
    Case("zero_head", lambda: zoo.zero_head_mlp(), X128, present=frozenset({"zero_gate"}), check=check_zero_head),
    Case("layerscale_1e-6", lambda: zoo.transformer(layer_scale=1e-6), tokens(16, 32), present=frozenset({"zero_gate"}), check=check_layerscale),
    Case("fixup_style", fixup_residual_mlp, X128, present=frozenset({"zero_gate"}), check=check_fixup),
    Case("identity_init", lambda: zoo.identity_mlp(), X128, absent=frozenset({"symmetry", "tie_broken_by_gradients"}), check=check_identity),
    Case("shared_weights", lambda: zoo.shared_mlp(), gaussian(128, 64), check=check_no_findings_but_info),
    Case("residual_mlp_batchnorm", lambda: zoo.residual_mlp(norm="batch"), X128),
    Case("duplicated_rows_tie_breaks", duplicated_rows_mlp, X128, present=frozenset({"tie_broken_by_gradients"}), check=check_duplicated),
    Case("frozen_layers", lambda: zoo.frozen_mlp(), X128, check=check_he),
    Case("attention_mask_minus_inf", MaskedMixer, gaussian(64, 8, 32), absent=frozenset({"non_finite"})),
    # ---- must be flagged ------------------------------------------------------------------
    Case("relu_xavier_30", lambda: zoo.mlp(30, 256), MLP_INPUT, {"init": "xavier_normal"}, frozenset({"vanishing_gradients", "vanishing_activations"}), check=check_xavier_30),
    Case("relu_default_20", lambda: zoo.mlp(20, 256), MLP_INPUT, {"init": "default"}, frozenset({"vanishing_gradients", "vanishing_activations"}), check=check_default_20),
    Case("tanh_default_20", lambda: zoo.mlp(20, 256, activation="tanh"), MLP_INPUT, {"init": "default"}, frozenset({"vanishing_gradients", "vanishing_activations"}), check=check_default_20),
    Case("sigmoid_xavier_10", lambda: zoo.mlp(10, 128, activation="sigmoid"), X128, {"init": "xavier_normal"}, frozenset({"vanishing_gradients", "vanishing_activations"}), check=check_sigmoid),
    Case("zero_head_over_vanishing", zero_head_xavier_mlp, MLP_INPUT, {"init": "xavier_normal", "overrides": {"60": "zeros"}}, present=frozenset({"zero_gate"}), check=lambda r: None),
    Case("residual_mlp_unnormalised_36", lambda: zoo.residual_mlp(depth=36), X128, errors=frozenset({"exploding_activations", "exploding_gradients"}), check=check_residual_growth),
    Case("batchnorm_no_skips_60", lambda: BatchNormMLP(60, 64), gaussian(128, 64), {"init": "kaiming_normal"}, frozenset({"exploding_gradients"}), check=check_batchnorm_explosion),
    Case("mlp_zeros", lambda: zoo.mlp(4, 64), gaussian(128, 64), {"init": "zeros"}, present=frozenset({"symmetry"}), check=check_symmetry_everywhere({"0", "2", "4", "6"})),
    Case("mlp_constant_tanh", lambda: zoo.mlp(4, 64, activation="tanh"), gaussian(128, 64), {"init": "constant:value=0.05"}, present=frozenset({"symmetry"}), check=check_symmetry_everywhere({"0", "2", "4", "6"})),
    Case("cnn_constant", lambda: zoo.vgg_style(channels=(8, 16)), IMAGES, {"init": "constant:value=0.05"}, present=frozenset({"symmetry"}), check=check_symmetry_everywhere({"features.0", "features.2", "features.5", "features.7"})),
    Case("lstm_constant", lambda: zoo.lstm_classifier(), tokens(64, 12), {"init": "constant:value=0.05"}, present=frozenset({"symmetry"}), check=check_symmetry_everywhere({"rnn"})),
    Case("rectangular_identity", rectangular_identity_mlp, gaussian(128, 64), present=frozenset({"symmetry"}), check=check_rectangular_identity),
    Case("dead_negative_bias", negative_bias_mlp, X128, present=frozenset({"dead_units"}), check=check_dead),
    Case("tanh_saturated", lambda: zoo.mlp(4, 128, activation="tanh"), X128, {"init": "normal:std=1"}, present=frozenset({"saturated_units"}), check=check_saturated),
    Case("nan_forward", nan_mlp, gaussian(64, 64), errors=frozenset({"non_finite"}), check=check_nan),
    Case("nan_backward", sqrt_mlp, gaussian(64, 64), errors=frozenset({"non_finite"}), check=check_backward_nan),
]  # fmt: skip

TRAINABLE = {c.name for c in CASES[: CASES.index(next(c for c in CASES if c.name == "relu_xavier_30"))]}


def probe_case(case: Case) -> Report:
    torch.manual_seed(0)
    model = case.build()
    return probe(model, case.inputs(), **case.options)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_known_answer(case: Case) -> None:
    report = probe_case(case)
    errors = {f.code for f in report.findings if f.severity == "error"}
    summary = [str(f) for f in report.findings]
    if case.name in TRAINABLE:
        assert not errors, summary
        assert report.verdict == "stable"
    else:
        assert report.verdict == "unstable", summary
    if case.errors:
        assert errors == set(case.errors), summary
    codes = {f.code for f in report.findings}
    assert case.present <= codes, summary
    assert not (case.absent & codes), summary
    if case.check is not None:
        case.check(report)
    # Rules read only the report: a JSON round trip gives the same findings.
    again = Report.from_json(report.to_json())
    assert [f.to_dict() for f in again.findings] == [f.to_dict() for f in report.findings]
    assert [f.to_dict() for f in diagnose(again)] == [f.to_dict() for f in report.findings]


def test_zoo_covers_every_code_both_ways() -> None:
    """Each code has a case that must show it; the trainable half covers the trap list."""
    flagged = set().union(*(c.errors | c.present for c in CASES if c.name not in TRAINABLE))
    for code in ("vanishing_activations", "vanishing_gradients", "exploding_activations", "exploding_gradients",
                 "symmetry", "dead_units", "saturated_units", "non_finite"):  # fmt: skip
        assert code in flagged, code
    assert len(CASES) >= 25 and len(TRAINABLE) >= 12


def test_zero_head_over_vanishing_net_is_still_unstable() -> None:
    """A zero head gates a net that vanishes anyway: the gate is named, and the vanishing underneath
    (forward, where no gate explains it) is still an error."""
    case = next(c for c in CASES if c.name == "zero_head_over_vanishing")
    report = probe_case(case)
    assert "vanishing_activations" in {f.code for f in report.errors}
    assert any(f.code == "zero_gate" and "60" in f.layers for f in report.findings)


def test_suggest_rerun_fixes_xavier_relu() -> None:
    report = probe(zoo.mlp(30, 256), MLP_INPUT(), init="xavier_normal", suggest=True, gate_check=False)
    assert report.verdict == "unstable"
    assert report.meta["suggestion"] == {"init": "kaiming_normal", "verdict": "stable", "errors": []}
