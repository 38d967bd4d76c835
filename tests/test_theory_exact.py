"""The quadrature's shortcuts give the bits of the straightforward computation they replace.

Predictions must not move when the code computing them gets quicker: each shortcut in
:mod:`gradprobe.theory` is checked here, bit for bit, against the plain version (written out below
as it was before the shortcut).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradprobe import theory
from gradprobe.theory import ACTIVATIONS, ChainLayer, get_activation, predict_chain


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -1e-310, 26.5, -26.5, 1e300]
    return np.concatenate(
        [rng.uniform(-30, 30, n), rng.normal(0, 2, n), 10.0 ** rng.uniform(-300, 2, n), special]
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["erf", "erfc"])
def test_erf_in_pieces_has_the_bits_of_one_call(
    name: str, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several intra-op threads, arrays longer than a piece go through torch in pieces (kept off
    its thread pool); every element's value is the one a single call over the whole array gives."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(0)
    x = _values(rng, 2500)
    whole = getattr(torch.special, name)(torch.from_numpy(x.copy())).numpy()
    piece = theory._TORCH_PIECE[name]
    for n in (0, 1, 3, 7, 8, piece - 1, piece, piece + 1, 2 * piece + 5, len(x)):
        got = theory._torch_elementwise(name, x[:n])
        assert got.shape == (n,)
        assert np.array_equal(_bits(got), _bits(whole[:n]))
    matrix = x[: 4 * piece].reshape(4, piece)
    assert np.array_equal(
        _bits(theory._torch_elementwise(name, matrix)), _bits(whole[: 4 * piece]).reshape(4, piece)
    )
    scalar = theory._torch_elementwise(name, np.float64(0.5))
    assert scalar.shape == ()
    assert float(scalar) == float(getattr(torch.special, name)(torch.tensor(0.5, dtype=torch.float64)))


def test_gelu_phi_and_derivative_in_one_call_have_their_bits() -> None:
    x = _values(np.random.default_rng(1), 700)
    gelu = ACTIVATIONS["gelu"]
    assert gelu.phi_dphi is not None
    with np.errstate(all="ignore"):  # ±inf and 1e300 among the values
        phi, dphi = gelu.phi_dphi(x)
        assert np.array_equal(_bits(phi), _bits(gelu.phi(x)))
        assert np.array_equal(_bits(dphi), _bits(gelu.dphi(x)))


def _composite_rule_plain(
    lo: float, hi: float, breakpoints: list[float], finest: float
) -> tuple[np.ndarray, np.ndarray]:
    inside = [c for c in breakpoints if lo < c < hi]
    edges = [np.linspace(lo, hi, max(1, math.ceil(hi - lo)) + 1)]
    finest = min(max(finest, 1e-12 * (hi - lo)), 1.0)
    levels = max(0, math.ceil(math.log2(1.0 / finest)))
    offsets = 2.0 ** -np.arange(levels + 1) if levels else np.zeros(0)
    for c in inside:
        edges.append(np.clip(np.concatenate(([c], c - offsets, c + offsets)), lo, hi))
    edge = np.unique(np.concatenate(edges))
    left, right = edge[:-1], edge[1:]
    keep = right - left > 0
    half = 0.5 * (right[keep] - left[keep])
    mid = 0.5 * (right[keep] + left[keep])
    nodes = (mid[:, None] + half[:, None] * theory._PANEL_NODES[None, :]).ravel()
    weights = (half[:, None] * theory._PANEL_WEIGHTS[None, :]).ravel()
    return nodes, weights


def test_composite_rule_has_the_bits_of_the_plain_rule() -> None:
    rng = np.random.default_rng(2)
    cases: list[tuple[float, float, list[float], float]] = [
        (-12.0, 12.0, [0.0], 0.25),
        (-12.0, 12.0, [], 1.0),
        (-1.0, 1.0, [0.0, 0.0, 5.0], 2.0),  # a repeated breakpoint, one outside, no refinement
        (-12.0, 12.0, [-11.9999, 11.9999, 0.3], 1e-9),  # edges clipped at the ends, deep refinement
        (0.0, 0.5, [0.25], 0.01),
    ]
    for _ in range(300):
        lo = float(rng.uniform(-30, 0))
        hi = lo + float(10.0 ** rng.uniform(-2, 1.7))
        k = int(rng.integers(0, 5))
        breaks = [float(v) for v in rng.uniform(lo - 1, hi + 1, k)]
        cases.append((lo, hi, breaks, float(10.0 ** rng.uniform(-8, 1))))
    for lo, hi, breaks, finest in cases:
        nodes, weights = theory._composite_rule(lo, hi, breaks, finest)
        want_nodes, want_weights = _composite_rule_plain(lo, hi, breaks, finest)
        assert np.array_equal(_bits(nodes), _bits(want_nodes)), (lo, hi, breaks, finest)
        assert np.array_equal(_bits(weights), _bits(want_weights)), (lo, hi, breaks, finest)


def _input_rule_plain(
    act: theory.Activation, mean: float, gaussian_variance: float, a: float
) -> tuple[np.ndarray, np.ndarray]:
    """The uniform-plus-Gaussian branch of ``_input_rule`` with all four erfc tails evaluated."""
    sigma = math.sqrt(gaussian_variance)
    scale = math.sqrt(a * a / 3.0 + gaussian_variance)
    reach = (a + theory._Z_MAX * sigma) / scale
    breaks = [(b - mean) / scale for b in act.breakpoints] + [-a / scale, a / scale]
    y, w = _composite_rule_plain(-reach, reach, breaks, finest=0.25 * min(1.0, sigma) / scale)
    offset = scale * y
    hi, lo = (offset + a) / (sigma * math.sqrt(2.0)), (offset - a) / (sigma * math.sqrt(2.0))
    right = offset > 0
    e = torch.special.erfc(torch.from_numpy(np.concatenate((lo, hi, -hi, -lo)))).numpy()
    e_lo, e_hi, e_mhi, e_mlo = np.split(e, 4)
    mass = np.where(right, e_lo - e_hi, e_mhi - e_mlo) * 0.5
    return mean + offset, w * scale * mass / (2.0 * a)


def test_uniform_plus_gaussian_input_rule_has_the_bits_of_the_plain_rule() -> None:
    """Only the pair of erfc tails each node uses is evaluated now: the same numbers."""
    rng = np.random.default_rng(3)
    for name in ("gelu", "tanh", "relu6", "hardtanh", "silu"):
        act = get_activation(name)
        for _ in range(20):
            variance = float(10.0 ** rng.uniform(-6, 3))
            a = math.sqrt(variance) * float(10.0 ** rng.uniform(-2.9, 2))
            mean = float(rng.normal(0, 1)) if rng.random() < 0.5 else 0.0
            x, w = theory._input_rule(act, mean, variance, a)
            want_x, want_w = _input_rule_plain(act, mean, variance, a)
            assert np.array_equal(_bits(x), _bits(want_x))
            assert np.array_equal(_bits(w), _bits(want_w))


def test_chain_forward_is_predict_chains_forward_pass() -> None:
    layers = [
        ChainLayer.affine(300, 200, 2.0 / 300, 1.0 / 900, "uniform"),
        ChainLayer.activation_layer("gelu"),
        ChainLayer.affine(200, 100, 1.0 / 200, 0.01),
        ChainLayer.activation_layer("leaky_relu", 0.2),
        ChainLayer.activation_layer("tanh"),
        ChainLayer.affine(100, 10, 1.0 / 100),
    ]
    for source, mean in ((1.3, 0.0), (0.7, 0.4), (0.0, 0.0)):
        forward, _ = theory._chain_forward(layers, source, mean)
        predicted = predict_chain(layers, source, 1.0, input_mean=mean)
        assert [s for s, _ in forward] == [p.act_second_moment for p in predicted]
        assert [m for _, m in forward] == [p.act_mean for p in predicted]
