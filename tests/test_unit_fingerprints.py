"""The symmetry grouping's fast path: the weights' row sums, taken in the probe's one read of the
weights (gradprobe.stats.sums_and_row_sums), prove most layers free of identical units without
reading their rows again; every other layer is grouped from its rows, with the same result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe.diagnose.units as units_module
import gradprobe.probing as probing
from gradprobe import probe
from gradprobe.diagnose.grouping import sums_all_distinct
from gradprobe.diagnose.units import _part_row_sums, group_units, unit_features
from gradprobe.stats import KERNEL, Scratch, sums_and_row_sums

needs_kernel = pytest.mark.skipif(KERNEL is None, reason="row sums come from the C kernel")


def _row_sums(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(parameter) → row sums, as the probe takes them (every parameter of dim ≥ 2, by dim 0)."""
    params = [p for p in model.parameters()]
    lengths = [p.numel() // p.shape[0] if p.dim() >= 2 and p.shape[0] else 0 for p in params]
    _, rows = sums_and_row_sums(params, lengths, Scratch())
    return {id(p): r for p, r in zip(params, rows) if r is not None}


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(5, 3))
    lstm = nn.LSTM(3, 5, num_layers=2)
    attention = nn.MultiheadAttention(8, 2)
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ConvTranspose2d(6, 4, 3), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        mlp[1].weight.zero_()  # every unit identical
        mlp[1].bias.zero_()
        mlp[2].weight[3] = mlp[2].weight[1]  # two identical units
        mlp[2].bias[3] = mlp[2].bias[1]
        mlp[3].weight[2] = mlp[3].weight[0]  # identical weights, different biases: no group
        w = lstm.weight_ih_l0.view(4, 5, 3)
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            gates = getattr(lstm, name).view(4, 5, -1)
            gates[:, 4] = gates[:, 2]  # units 2 and 4 identical in every gate
        assert torch.equal(w[:, 4], w[:, 2])
        attention.in_proj_weight.view(3, 8, 8)[:, 6] = attention.in_proj_weight.view(3, 8, 8)[:, 1]
        attention.in_proj_bias.view(3, 8)[:, 6] = attention.in_proj_bias.view(3, 8)[:, 1]
        conv[0].weight[5] = conv[0].weight[0]
        conv[0].bias[5] = conv[0].bias[0]
        conv[1].weight[:, 3] = conv[1].weight[:, 1]  # a transposed conv's units are its dim 1
        conv[1].bias[3] = conv[1].bias[1]
    return [mlp, lstm, attention, conv]


def _groups(found: dict[str, list]) -> dict[str, list]:
    return {name: [(s.label, groups) for s, groups in sets] for name, sets in found.items()}


@needs_kernel
def test_row_sums_give_the_same_groups() -> None:
    """Linear (zero, duplicated, weights-only duplicate), LSTM gates, attention's q/k/v rows, Conv and
    ConvTranspose (not row blocks: grouped from the rows): the same groups with and without row sums."""
    for model in _models():
        names = [n or "model" for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        plain = group_units(model, names, None)
        fast = group_units(model, names, None, row_sums=_row_sums(model))
        assert _groups(fast.found) == _groups(plain.found), type(model).__name__
        assert fast.gradients_needed == plain.gradients_needed
        assert any(groups for sets in plain.found.values() for _, groups in sets)  # the cases have groups


@needs_kernel
def test_layers_with_distinct_row_sums_are_not_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights: every row sum differs, and no layer is grouped from its rows; a layer with
    identical rows, or rows whose sums merely coincide, is (and the coincidence is no group)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.LSTM(32, 16))
    names = ["0", "2", "3"]
    read: list[int] = []
    real = units_module.group_rows
    monkeypatch.setattr(units_module, "group_rows", lambda features: read.append(len(features)) or real(features))
    found = group_units(model, names, None, row_sums=_row_sums(model)).found
    assert read == [] and all(groups == [] for sets in found.values() for _, groups in sets)
    with torch.no_grad():
        model[2].weight[5] = model[2].weight[7].flip(0)  # the same sum, other rows: not identical
    found = group_units(model, names, None, row_sums=_row_sums(model)).found
    assert len(read) == 1 and found["2"][0][1] == []
    # without row sums every layer is read
    group_units(model, names, None)
    assert len(read) == 4


@needs_kernel
def test_rows_with_both_infinities_are_still_grouped() -> None:
    """A row holding +inf and -inf sums to NaN, which proves nothing: two such identical rows are
    still found (and a row with a NaN never is)."""
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight[1] = torch.tensor([float("inf"), 1.0, float("-inf"), 2.0])
        layer.weight[4] = layer.weight[1]
        layer.bias[4] = layer.bias[1]
        layer.weight[2] = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
        layer.weight[3] = layer.weight[2]
        layer.bias[3] = layer.bias[2]
    sums = _row_sums(layer)[id(layer.weight)]
    assert torch.isnan(sums[1]) and not sums_all_distinct(sums)
    found = group_units(layer, ["model"], None, row_sums=_row_sums(layer)).found
    assert found["model"][0][1] == [[1, 4]]


@needs_kernel
def test_part_row_sums_are_the_rows_of_that_part() -> None:
    """The sums a unit set is checked with are exactly its first part's rows: an LSTM's first gate,
    attention's q rows, a Linear's rows; none for a transposed conv (its units are columns)."""
    torch.manual_seed(2)
    lstm, attention, deconv = nn.LSTM(3, 5, num_layers=2), nn.MultiheadAttention(8, 2), nn.ConvTranspose2d(6, 4, 3)
    for module in (lstm, attention, nn.Linear(7, 9), deconv):
        tensors = {n: p.detach() for n, p in module.named_parameters()}
        sums = {n: r for n, r in ((n, _row_sums(module).get(id(p))) for n, p in module.named_parameters()) if r is not None}
        for s in unit_features(module, tensors):
            got = _part_row_sums(s, tensors, sums)
            if module is deconv:
                assert got is None
                continue
            assert got is not None
            torch.testing.assert_close(got, s.parts[0][1].double().sum(dim=1), rtol=1e-13, atol=1e-12)


def test_sums_all_distinct() -> None:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert sums_all_distinct(t(1.0, 2.0, 3.0)) and sums_all_distinct(t(5.0)) and sums_all_distinct(t())
    assert not sums_all_distinct(t(1.0, 2.0, 1.0))
    assert not sums_all_distinct(t(0.0, -0.0))
    assert not sums_all_distinct(t(1.0, float("nan")))
    assert sums_all_distinct(t(float("inf"), float("-inf"), 0.0))


def test_a_probe_groups_the_same_with_and_without_row_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the symmetry results of probes (zero, constant and random inits, an LSTM) are the
    same when the probe's row sums are withheld; the probe takes them (when the kernel is here)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 12)
    cases = [(net, x, "zeros"), (net, x, "constant:value=0.1"), (net, x, "kaiming_normal"), (net, x, "keep")]
    cases.append((nn.LSTM(5, 6, num_layers=2), torch.randn(7, 3, 5), "orthogonal"))
    cases.append((nn.LSTM(5, 6), torch.randn(7, 3, 5), "zeros"))
    seen: list[int] = []
    real = probing._Session._weight_sums

    def spy(self: probing._Session, params: object) -> object:
        out = real(self, params)  # type: ignore[arg-type]
        seen.append(0 if out is None else len(out.rows))
        return out

    def symmetry(model: nn.Module, inputs: torch.Tensor, init: str) -> list[object]:
        report = probe(model, inputs, init=init, diagnose=False, gate_check=False)
        return [layer.extra.get("symmetry") for layer in report.layers]

    with monkeypatch.context() as m:
        m.setattr(probing._Session, "_weight_sums", spy)
        with_sums = [symmetry(*c) for c in cases]
    if KERNEL is not None:
        assert seen and all(n > 0 for n in seen)

    def without_rows(self: probing._Session, params: object) -> object:
        out = real(self, params)  # type: ignore[arg-type]
        if out is not None:
            out.rows = {}
        return out

    monkeypatch.setattr(probing._Session, "_weight_sums", without_rows)
    assert [symmetry(*c) for c in cases] == with_sums
    assert with_sums[0][0]["groups"] == 1 and with_sums[2][0]["groups"] == 0
