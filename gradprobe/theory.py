"""Mean-field theory of signal propagation at initialization: what a random network *should* do.

Pure numerics (numpy only), independent of the rest of gradprobe except for its error class. The
probe compares what it measures with these predictions.

Three layers:

* An activation registry (:data:`ACTIVATIONS`, :func:`get_activation`): each :class:`Activation`
  carries ``phi``, its derivative ``dphi`` (vectorised numpy functions) and the points where the
  quadrature must split (kinks such as ReLU's, and the centre of smooth but possibly sharp
  transitions such as tanh's).
* Gaussian expectations :func:`gaussian_expectation` ``E_{z~N(0,1)}[f(mean + sqrt(q) z)]``.
* The mean-field maps of Poole et al. (2016) and Schoenholz et al. (2017): :func:`q_map`,
  :func:`chi1`, :func:`fixed_point`, :func:`critical_sigma_w2`, :func:`depth_scale`, and a
  per-layer predictor for a chain of affine layers and pointwise activations,
  :func:`predict_chain`.

Notation: ``sigma_w2 = fan_in · Var[W]`` and ``sigma_b2 = E[b²]`` (the per-element second moment
of the bias); ``q`` is a per-element second moment of pre-activations (a variance, since
pre-activations have mean 0 over the random weights).

>>> round(q_map("relu", 2.0), 12)              # E[relu(sqrt(2) z)^2] = 2/2
1.0
>>> round(chi1("tanh", fixed_point("tanh", (5 / 3) ** 2, 0.0), (5 / 3) ** 2), 2)
1.21
>>> round(critical_sigma_w2("tanh", 0.05), 2)
1.76
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

from gradprobe.errors import UsageError

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "get_activation",
    "gaussian_expectation",
    "activation_gain",
    "second_moment_gain",
    "ActivationMoments",
    "activation_moments",
    "preactivation_variance",
    "q_map",
    "chi1",
    "fixed_point",
    "critical_sigma_w2",
    "depth_scale",
    "ChainLayer",
    "Prediction",
    "predict_chain",
]

ArrayFunction = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """A pointwise activation ``phi`` with its derivative ``dphi``, both vectorised over numpy arrays.

    ``param`` is the activation's one parameter where it has one (leaky_relu's negative slope, elu's
    alpha, softplus's beta), else ``None``. ``breakpoints`` are the points (in the activation's
    input) where ``phi`` or ``dphi`` is not smooth, or where a smooth transition sits that becomes
    arbitrarily sharp once the input variance is large (tanh's and sigmoid's centre): the quadrature
    splits its integration range there. The derivative at a kink is the one torch's autograd uses
    (``relu'(0) = 0``); a single point has no weight under a Gaussian anyway.
    """

    name: str
    phi: ArrayFunction
    dphi: ArrayFunction
    param: float | None = None
    breakpoints: tuple[float, ...] = ()
    # ``phi`` and ``dphi`` in one call where they share work (gelu's erf), with the same values.
    phi_dphi: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (
            f"Activation({self.name!r})"
            if self.param is None
            else f"Activation({self.name!r}, {self.param!r})"
        )


_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# SELU constants (Klambauer et al. 2017), the values torch uses.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_GELU_TANH_COEFF = 0.044715

# numpy has no erf. torch's (a vectorised double-precision erf/erfc, ~1 ulp) is imported on first
# use, so that importing this module stays numpy-only; math.erf per element through np.frompyfunc
# cost ~1 µs per node, most of a prediction's time with PyTorch's uniform biases.
#
# torch hands erf/erfc of ~1000 elements and more to its intra-op thread pool (measured with torch
# 2.x: erfc from ≈ 910 elements, erf from ≈ 1450): a wake-up worth more than the work at these sizes,
# and on a busy machine a wait of a whole scheduler slice (~12 ms per call measured on 2 loaded
# cores, against ~20 µs on one thread). So longer arrays go through in pieces that torch keeps on
# the calling thread (on one thread, one call: each piece costs ~3 µs). Each element's value does not
# depend on the call it is in (SLEEF's vector code for every lane, partial vectors included;
# tests/test_theory_exact.py checks it), so the pieces give the same bits as one call.
_TORCH_PIECE = {"erf": 1024, "erfc": 768}


def _torch_elementwise(name: str, x: np.ndarray) -> np.ndarray:
    import torch

    fn = getattr(torch.special, name)
    values = np.array(x, dtype=np.float64)
    flat = values.reshape(-1)
    piece = _TORCH_PIECE[name]
    if flat.shape[0] <= piece or torch.get_num_threads() == 1:
        return fn(torch.from_numpy(flat)).numpy().reshape(values.shape)
    out = np.empty_like(flat)
    for start in range(0, flat.shape[0], piece):
        fn(torch.from_numpy(flat[start : start + piece]), out=torch.from_numpy(out[start : start + piece]))
    return out.reshape(values.shape)


def _erf(x: np.ndarray) -> np.ndarray:
    return _torch_elementwise("erf", x)


def _erfc(x: np.ndarray) -> np.ndarray:
    return _torch_elementwise("erfc", x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _softplus(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    return np.logaddexp(0.0, beta * x) / beta


def _identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _ones(x: np.ndarray) -> np.ndarray:
    return np.ones_like(x, dtype=float)


def _leaky_relu(x: np.ndarray, slope: float) -> np.ndarray:
    return np.where(x > 0, x, slope * x)


def _leaky_relu_derivative(x: np.ndarray, slope: float) -> np.ndarray:
    return np.where(x > 0, 1.0, slope)


def _elu(x: np.ndarray, alpha: float, scale: float = 1.0) -> np.ndarray:
    return scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def _elu_derivative(x: np.ndarray, alpha: float, scale: float = 1.0) -> np.ndarray:
    return scale * np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0)))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / _SQRT2))


def _gelu_derivative(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / _SQRT2)) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _gelu_both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_gelu` and :func:`_gelu_derivative` with one erf: the same expressions, the same bits."""
    erf = _erf(x / _SQRT2)
    return 0.5 * x * (1.0 + erf), 0.5 * (1.0 + erf) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_COEFF * x**3)))


def _gelu_tanh_derivative(x: np.ndarray) -> np.ndarray:
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_COEFF * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _GELU_TANH_COEFF * x * x
    )


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def _silu_derivative(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _tanh_derivative(x: np.ndarray) -> np.ndarray:
    t = np.tanh(x)
    return 1.0 - t * t


def _sigmoid_derivative(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1.0 - s)


def _softplus_derivative(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    return _sigmoid(beta * x)


def _softsign(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.abs(x))


def _softsign_derivative(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.abs(x)) ** 2


def _hardtanh(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -1.0, 1.0)


def _hardtanh_derivative(x: np.ndarray) -> np.ndarray:
    return np.where((x > -1.0) & (x < 1.0), 1.0, 0.0)


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def _relu6_derivative(x: np.ndarray) -> np.ndarray:
    return np.where((x > 0.0) & (x < 6.0), 1.0, 0.0)


def _mish(x: np.ndarray) -> np.ndarray:
    return x * np.tanh(_softplus(x))


def _mish_derivative(x: np.ndarray) -> np.ndarray:
    t = np.tanh(_softplus(x))
    return t + x * (1.0 - t * t) * _sigmoid(x)


def _make_leaky_relu(slope: float) -> Activation:
    return Activation(
        "leaky_relu",
        partial(_leaky_relu, slope=slope),
        partial(_leaky_relu_derivative, slope=slope),
        slope,
        (0.0,),
    )


def _make_elu(alpha: float) -> Activation:
    return Activation("elu", partial(_elu, alpha=alpha), partial(_elu_derivative, alpha=alpha), alpha, (0.0,))


def _make_softplus(beta: float) -> Activation:
    if not beta > 0:
        raise UsageError(f"softplus beta must be > 0, got {beta!r}")
    return Activation(
        "softplus", partial(_softplus, beta=beta), partial(_softplus_derivative, beta=beta), beta, (0.0,)
    )


# Parameterised activations: factory and default parameter (torch's defaults).
_FACTORIES: dict[str, tuple[Callable[[float], Activation], float]] = {
    "leaky_relu": (_make_leaky_relu, 0.01),
    "elu": (_make_elu, 1.0),
    "softplus": (_make_softplus, 1.0),
}

_IDENTITY = Activation("identity", _identity, _ones)

#: Every named activation with its default parameter; ``"linear"`` is an alias of ``"identity"``.
ACTIVATIONS: dict[str, Activation] = {
    "identity": _IDENTITY,
    "linear": _IDENTITY,
    "relu": Activation(
        "relu", partial(_leaky_relu, slope=0.0), partial(_leaky_relu_derivative, slope=0.0), None, (0.0,)
    ),
    "leaky_relu": _make_leaky_relu(0.01),
    "tanh": Activation("tanh", np.tanh, _tanh_derivative, None, (0.0,)),
    "sigmoid": Activation("sigmoid", _sigmoid, _sigmoid_derivative, None, (0.0,)),
    "gelu": Activation("gelu", _gelu, _gelu_derivative, None, (0.0,), _gelu_both),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_derivative, None, (0.0,)),
    "silu": Activation("silu", _silu, _silu_derivative, None, (0.0,)),
    "selu": Activation(
        "selu",
        partial(_elu, alpha=_SELU_ALPHA, scale=_SELU_SCALE),
        partial(_elu_derivative, alpha=_SELU_ALPHA, scale=_SELU_SCALE),
        None,
        (0.0,),
    ),
    "elu": _make_elu(1.0),
    "softplus": _make_softplus(1.0),
    "softsign": Activation("softsign", _softsign, _softsign_derivative, None, (0.0,)),
    "hardtanh": Activation("hardtanh", _hardtanh, _hardtanh_derivative, None, (-1.0, 1.0)),
    "relu6": Activation("relu6", _relu6, _relu6_derivative, None, (0.0, 6.0)),
    "mish": Activation("mish", _mish, _mish_derivative, None, (0.0,)),
}


def get_activation(name: str, param: float | None = None) -> Activation:
    """The activation called ``name`` (case-insensitive), with ``param`` if it takes one.

    ``param`` is leaky_relu's negative slope (default 0.01), elu's alpha (1.0) or softplus's beta
    (1.0); other activations take none. Raises :class:`~gradprobe.errors.UsageError` naming the
    valid choices.

    >>> get_activation("leaky_relu", 0.2).param
    0.2
    """
    key = str(name).strip().lower()
    if key not in ACTIVATIONS:
        raise UsageError(f"unknown activation {name!r}; valid choices: {', '.join(sorted(ACTIVATIONS))}")
    if param is None:
        return ACTIVATIONS[key]
    if key not in _FACTORIES:
        raise UsageError(
            f"activation {key!r} takes no parameter (got {param!r}); parameterised: {', '.join(sorted(_FACTORIES))}"
        )
    value = float(param)
    if not math.isfinite(value):
        raise UsageError(f"activation {key!r} parameter must be finite, got {param!r}")
    return _FACTORIES[key][0](value)


def _resolve(act: Activation | str) -> Activation:
    return act if isinstance(act, Activation) else get_activation(act)


# --------------------------------------------------------------------------------------------
# Gaussian expectations
# --------------------------------------------------------------------------------------------

# Probabilists' Gauss–Hermite rule for smooth integrands: exact for polynomials of degree < 200, and
# hermegauss is still accurate at this size (it overflows beyond ~300 nodes).
_HERMITE_NODES, _HERMITE_WEIGHTS = hermegauss(100)
_HERMITE_WEIGHTS = _HERMITE_WEIGHTS / math.sqrt(2.0 * math.pi)
# Gauss–Legendre panel rule for the composite quadrature used when the integrand has breakpoints.
_PANEL_NODES, _PANEL_WEIGHTS = leggauss(16)
# N(0,1) mass beyond ±12 is 3.6e-33: the composite rule integrates over [-12, 12] only.
_Z_MAX = 12.0
# Limit used for "variance 0": the mean-field maps want q → 0⁺ (relu'(0) = 0, but E[relu'(√q z)²] = 1/2).
_TINY_VARIANCE = 1e-300


def _composite_rule(
    lo: float, hi: float, breakpoints: Sequence[float], finest: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a composite Gauss–Legendre rule for ``∫_lo^hi g(u) du``.

    Panels of width at most 1 cover ``[lo, hi]``; every breakpoint inside is a panel edge, with
    panels shrinking geometrically towards it (widths 1, 1/2, 1/4, … down to ``finest``), so that a
    kink is integrated exactly piecewise and a transition of width ~``finest`` next to a breakpoint
    is resolved with a fixed 16 nodes per panel (hp-refinement).
    """
    inside = [c for c in breakpoints if lo < c < hi]
    edges = np.linspace(lo, hi, max(1, math.ceil(hi - lo)) + 1)
    finest = min(max(finest, 1e-12 * (hi - lo)), 1.0)
    levels = max(0, math.ceil(math.log2(1.0 / finest)))
    if inside:
        # every breakpoint's refined edges c, c ∓ 2^-k at once (one row per breakpoint)
        centres = np.array(inside)[:, None]
        offsets = _refinement_offsets(levels)
        refined = np.concatenate((centres, centres - offsets, centres + offsets), axis=1)
        edges = np.concatenate((edges, np.clip(refined.ravel(), lo, hi)))
    edge = np.unique(edges)
    left, right = edge[:-1], edge[1:]
    width = right - left
    if not (width > 0).all():  # only NaN edges: np.unique leaves no zero-width panel
        keep = width > 0
        left, right, width = left[keep], right[keep], width[keep]
    half = 0.5 * width
    mid = 0.5 * (right + left)
    nodes = (mid[:, None] + half[:, None] * _PANEL_NODES[None, :]).ravel()
    weights = (half[:, None] * _PANEL_WEIGHTS[None, :]).ravel()
    return nodes, weights


_OFFSETS: dict[int, np.ndarray] = {}


def _refinement_offsets(levels: int) -> np.ndarray:
    """``2^-k`` for k = 0 … levels (none when ``levels`` is 0), one row; kept per ``levels``."""
    offsets = _OFFSETS.get(levels)
    if offsets is None:
        offsets = (2.0 ** -np.arange(levels + 1) if levels else np.zeros(0))[None, :]
        offsets.setflags(write=False)
        _OFFSETS[levels] = offsets
    return offsets


def _gaussian_rule(
    variance: float, mean: float, breakpoints: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Points ``x`` and weights ``w`` with ``Σ w f(x) ≈ E[f(X)]``, ``X ~ N(mean, variance)``."""
    if variance == 0.0:
        return np.array([float(mean)]), np.array([1.0])
    sd = math.sqrt(variance)
    if not breakpoints:
        return mean + sd * _HERMITE_NODES, _HERMITE_WEIGHTS
    z_breaks = [(b - mean) / sd for b in breakpoints]
    z, w = _composite_rule(-_Z_MAX, _Z_MAX, z_breaks, finest=0.25 / sd)
    return mean + sd * z, w * _INV_SQRT_2PI * np.exp(-0.5 * z * z)


def _check_variance(q: float, what: str = "q") -> float:
    q = float(q)
    if not (math.isfinite(q) and q >= 0.0):
        raise UsageError(f"{what} must be a finite second moment >= 0, got {q!r}")
    return q


def gaussian_expectation(
    f: ArrayFunction, q: float, mean: float = 0.0, *, breakpoints: Sequence[float] = ()
) -> float:
    """``E_{z~N(0,1)}[f(mean + sqrt(q) z)]`` by quadrature; ``f`` must be vectorised over numpy arrays.

    Without ``breakpoints`` this is the probabilists' Gauss–Hermite rule with 100 nodes
    (``numpy.polynomial.hermite_e.hermegauss``), exact for polynomials of degree < 200 and
    accurate to ~1e-15 for smooth ``f`` whose features are wide compared with ``sqrt(q)``. Gauss–Hermite
    converges only algebraically across a kink: for ``E[relu(0.3 + z)²]`` its error is 5e-5 with
    100 nodes, and for a step (``relu'``) 6e-3. So when ``breakpoints`` (points where ``f`` is not
    smooth, in ``f``'s argument) are given, the range ``|z| <= 12`` is split there and integrated
    with 16-point Gauss–Legendre panels refined geometrically towards each breakpoint down to a
    quarter of a unit of ``f``'s argument (``0.25/sqrt(q)`` in ``z``), which resolves unit-width
    transitions (tanh, sigmoid) however large ``q`` is: ~1e-14 across kinks and steps, ~1e-11 for
    ``tanh`` up to ``q = 1e6``. ``q = 0`` gives ``f(mean)``.

    >>> round(gaussian_expectation(lambda x: np.maximum(x, 0.0) ** 2, 3.0, breakpoints=(0.0,)), 12)
    1.5
    """
    q = _check_variance(q)
    x, w = _gaussian_rule(q, float(mean), tuple(breakpoints))
    return float(np.dot(w, f(x)))


# --------------------------------------------------------------------------------------------
# Gains
# --------------------------------------------------------------------------------------------

# torch.nn.init.calculate_gain values used as they are; selu deliberately not (see activation_gain).
_TORCH_GAINS: dict[str, float] = {
    "identity": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
}


def second_moment_gain(act: Activation | str, param: float | None = None) -> float:
    """``1 / sqrt(E[phi(z)²])`` for ``z ~ N(0,1)``: the gain that makes ``q = 1`` a fixed point.

    With ``sigma_w2 = gain²`` and no bias, a unit-variance pre-activation gives a post-activation
    second moment ``1/gain²`` and the next pre-activation variance ``gain² · 1/gain² = 1``
    (REFERENCE: relu 1.414, tanh 1.593, gelu 1.533, silu 1.676, elu 1.245, sigmoid 1.846, selu 1.0).
    """
    activation = get_activation(act, param) if isinstance(act, str) else act
    return 1.0 / math.sqrt(
        gaussian_expectation(lambda x: activation.phi(x) ** 2, 1.0, breakpoints=activation.breakpoints)
    )


def activation_gain(name: str, param: float | None = None) -> float:
    """The gain a variance-preserving (Kaiming-style) init should use: ``Var[W] = gain² / fan``.

    * identity/linear 1, sigmoid 1, tanh 5/3, relu √2, leaky_relu √(2 / (1 + slope²)): the values of
      ``torch.nn.init.calculate_gain``, so that gradprobe's initializers agree with PyTorch's.
      (For tanh and sigmoid these are not the second-moment gain — 1.593 and 1.846 — but they are
      PyTorch's convention and what users compare against.)
    * selu 1.0, not PyTorch's 3/4: LeCun normal (``Var = 1/fan_in``) is what gives the self-normalising
      fixed point ``q* = 1`` (Klambauer et al. 2017); with gain 3/4 the fixed point is ``q* ≈ 0.023``
      instead, and torch's own docs advise ``'linear'`` for self-normalising networks.
    * every other activation (gelu, gelu_tanh, silu, elu, softplus, softsign, hardtanh, relu6, mish):
      PyTorch defines no gain, so the second-moment gain ``1 / sqrt(E[phi(z)²])``, ``z ~ N(0,1)``,
      of :func:`second_moment_gain` (gelu 1.533, silu 1.676, elu 1.245).
    """
    activation = get_activation(name, param)
    if activation.name == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + float(activation.param or 0.0) ** 2))
    if activation.name == "selu":
        return 1.0
    if activation.name in _TORCH_GAINS:
        return _TORCH_GAINS[activation.name]
    return second_moment_gain(activation)


# --------------------------------------------------------------------------------------------
# Mean-field maps (Poole et al. 2016; Schoenholz et al. 2017)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationMoments:
    """Moments of ``phi(X)`` and ``phi'(X)`` for one input distribution ``X``."""

    mean: float  # E[phi(X)]
    second_moment: float  # E[phi(X)²]
    derivative_second_moment: float  # E[phi'(X)²], the backward factor
    derivative_mean: float  # E[phi'(X)], the saturation measure (REFERENCE #12)

    @property
    def variance(self) -> float:
        """``E[phi²] − E[phi]²``."""
        return self.second_moment - self.mean**2


def _input_rule(
    act: Activation, mean: float, gaussian_variance: float, uniform_halfwidth: float
) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature points for ``X = mean + U + G``, ``U ~ Uniform(±halfwidth)``, ``G ~ N(0, variance)``.

    The law of ``U + G`` has the density ``(Φ((x + a)/σ) − Φ((x − a)/σ)) / (2a)``: smooth, but with
    shoulders of width ``σ`` at ``±a``, which are breakpoints of the composite rule next to the
    activation's own.
    """
    a = float(uniform_halfwidth)
    sigma = math.sqrt(gaussian_variance)
    if a <= 1e-3 * sigma:
        # Matching the variance leaves an error O((a/σ)⁴) below 1e-12.
        return _gaussian_rule(max(gaussian_variance + a * a / 3.0, _TINY_VARIANCE), mean, act.breakpoints)
    if sigma == 0.0:
        u, w = _composite_rule(-1.0, 1.0, [(b - mean) / a for b in act.breakpoints], finest=0.25 / a)
        return mean + a * u, 0.5 * w
    scale = math.sqrt(a * a / 3.0 + gaussian_variance)
    reach = (a + _Z_MAX * sigma) / scale
    breaks = [(b - mean) / scale for b in act.breakpoints] + [-a / scale, a / scale]
    y, w = _composite_rule(-reach, reach, breaks, finest=0.25 * min(1.0, sigma) / scale)
    offset = scale * y
    # Φ(hi) − Φ(lo) from the tail on the far side, so that neither tail loses its digits: right of 0
    # erfc(lo) − erfc(hi), left of it erfc(−hi) − erfc(−lo); only the pair each node uses is evaluated.
    hi, lo = (offset + a) / (sigma * _SQRT2), (offset - a) / (sigma * _SQRT2)
    right = offset > 0
    tails = _erfc(np.concatenate((np.where(right, lo, -hi), np.where(right, hi, -lo))))  # one call
    n = offset.shape[0]
    mass = (tails[:n] - tails[n:]) * 0.5
    return mean + offset, w * scale * mass / (2.0 * a)


def _moments(act: Activation, x: np.ndarray, w: np.ndarray) -> ActivationMoments:
    if act.phi_dphi is not None:
        phi, dphi = act.phi_dphi(x)
    else:
        phi, dphi = act.phi(x), act.dphi(x)
    return ActivationMoments(
        mean=float(np.dot(w, phi)),
        second_moment=float(np.dot(w, phi * phi)),
        derivative_second_moment=float(np.dot(w, dphi * dphi)),
        derivative_mean=float(np.dot(w, dphi)),
    )


def _closed_form_moments(
    act: Activation, mean: float, gaussian_variance: float, uniform_halfwidth: float
) -> ActivationMoments | None:
    """Exact moments for the piecewise-linear activations through 0 (identity, relu, leaky_relu)
    when ``X = U + G`` is centred (``mean == 0``: every affine output), else None (quadrature).

    ``X`` is then symmetric, so ``relu(X)² `` and ``relu(−X)²`` share ``E[X²]`` equally and
    ``P(X > 0) = 1/2``: ``E[relu(X)²] = E[X²]/2``, ``E[relu'(X)] = E[relu'(X)²] = 1/2``. The one
    integral left is ``E[relu(X)] = E|X|/2``; with ``t = a/σ`` (``a`` the uniform half-width, ``σ``
    the Gaussian's standard deviation),
    ``E[relu(U + G)] = σ·((t² + 1)·erf(t/√2)/2 + t·φ(t)) / (2t)`` (integrating
    ``E[relu(u + G)] = uΦ(u/σ) + σφ(u/σ)`` over ``u ∈ [−a, a]``), which is ``σ/√(2π)`` at ``a = 0``
    and ``a/4`` at ``σ = 0``. leaky_relu with slope ``α``: ``relu(x) − α·relu(−x)``. The same numbers
    as the quadrature (to ~1e-15; ``tests/test_theory.py``), in microseconds instead of ~0.4 ms.
    """
    if mean != 0.0 or act.name not in ("identity", "relu", "leaky_relu"):
        return None
    a = float(uniform_halfwidth)
    second = gaussian_variance + a * a / 3.0
    sigma = math.sqrt(gaussian_variance)
    if second <= _TINY_VARIANCE:  # the limit q → 0⁺, as the quadrature takes it
        second, a, sigma = _TINY_VARIANCE, 0.0, math.sqrt(_TINY_VARIANCE)
    if act.name == "identity":
        return ActivationMoments(0.0, second, 1.0, 1.0)
    slope = float(act.param or 0.0) if act.name == "leaky_relu" else 0.0
    if a == 0.0:
        half_abs = sigma * _INV_SQRT_2PI
    elif sigma == 0.0:
        half_abs = a / 4.0
    else:
        t = a / sigma
        half_abs = sigma * ((t * t + 1.0) * math.erf(t / _SQRT2) / 2.0 + t * _INV_SQRT_2PI * math.exp(-0.5 * t * t)) / (2.0 * t)
    return ActivationMoments(
        mean=(1.0 - slope) * half_abs,
        second_moment=(1.0 + slope * slope) * second / 2.0,
        derivative_second_moment=(1.0 + slope * slope) / 2.0,
        derivative_mean=(1.0 + slope) / 2.0,
    )


# Quadrature results kept while one report's predictions are made (gradprobe.predict sets a dict, then
# None): a chain's first activation is computed from the same derived input twice, once to link it and
# once to predict. Not kept across calls, so every probe pays for its own numbers.
_memo: dict[tuple[Activation, float, float, float], ActivationMoments] | None = None


def _law_moments(
    act: Activation, mean: float, gaussian_variance: float, uniform_halfwidth: float
) -> ActivationMoments:
    """Moments of ``phi(mean + U + G)``: in closed form where there is one, else by quadrature."""
    exact = _closed_form_moments(act, mean, gaussian_variance, uniform_halfwidth)
    if exact is not None:
        return exact
    memo = _memo
    key = (act, mean, gaussian_variance, uniform_halfwidth)
    if memo is not None and key in memo:
        return memo[key]
    moments = _moments(act, *_input_rule(act, mean, gaussian_variance, uniform_halfwidth))
    if memo is not None:
        memo[key] = moments
    return moments


def activation_moments(act: Activation | str, q_z: float, mean: float = 0.0) -> ActivationMoments:
    """``E[phi(X)]``, ``E[phi(X)²]``, ``E[phi'(X)²]`` and ``E[phi'(X)]`` for ``X ~ N(mean, q_z)``.

    ``q_z`` is the variance of ``X`` (for a pre-activation of mean 0, its second moment). At
    ``q_z = 0`` the limit ``q_z → 0⁺`` is returned (so relu gives ``E[relu'²] = 1/2``, the
    mean-field value, not ``relu'(0)² = 0``).
    """
    activation = _resolve(act)
    q_z = _check_variance(q_z, "q_z")
    return _law_moments(activation, float(mean), q_z, 0.0)


def preactivation_variance(q_in_second_moment: float, sigma_w2: float, sigma_b2: float) -> float:
    """``q_z = sigma_w2 · q_in + sigma_b2`` (Poole et al. 2016, eq. 3).

    ``q_in_second_moment`` is the per-element second moment ``E[x²]`` of the layer's input (not its
    variance: the weights have mean 0, so ``E[(w·x)²] = fan_in · Var[W] · E[x²]`` whatever the mean of
    ``x``), ``sigma_w2 = fan_in · Var[W]`` and ``sigma_b2 = E[b²]``.
    """
    return float(sigma_w2) * float(q_in_second_moment) + float(sigma_b2)


def q_map(act: Activation | str, q_z: float) -> float:
    """The post-activation second moment ``E[phi(sqrt(q_z) z)²]``, ``z ~ N(0,1)``.

    Composed with :func:`preactivation_variance` this is Poole et al.'s length map
    ``q^l = sigma_w2 · E[phi(sqrt(q^{l-1}) z)²] + sigma_b2``. The post-activation mean ``E[phi]`` and
    variance ``E[phi²] − E[phi]²`` are in :func:`activation_moments`.
    """
    return activation_moments(act, q_z).second_moment


def chi1(act: Activation | str, q_z: float, sigma_w2: float) -> float:
    """``chi_1 = sigma_w2 · E[phi'(sqrt(q_z) z)²]`` (Poole et al. 2016; Schoenholz et al. 2017, eq. 5).

    Evaluated at the fixed point ``q*``, it is the per-layer factor of the back-propagated gradient
    second moment in a network of equal widths (and the slope of the correlation map at ``c = 1``):
    ``< 1`` ordered (gradients vanish), ``> 1`` chaotic (gradients explode), ``= 1`` critical.
    """
    return float(sigma_w2) * activation_moments(act, q_z).derivative_second_moment


def _length_map(act: Activation, sigma_w2: float, sigma_b2: float, q: float) -> float:
    return preactivation_variance(q_map(act, q), sigma_w2, sigma_b2)


def fixed_point(
    act: Activation | str, sigma_w2: float, sigma_b2: float, q0: float = 1.0, *, rtol: float = 1e-12
) -> float:
    """The pre-activation variance ``q*`` that iterating ``q ← sigma_w2 · E[phi(sqrt(q) z)²] + sigma_b2``
    from ``q0`` converges to (Poole et al. 2016).

    The map ``M`` is increasing in ``q`` for every registered activation, so the iteration moves
    monotonically from ``q0`` to the nearest fixed point in the direction of ``M(q0) − q0``. That
    limit is found here directly: step geometrically (×2) from ``q0`` in that direction until
    ``M(q) − q`` changes sign, then bisect (in log scale) to relative accuracy ``rtol``. This gives
    the iteration's limit without its slow convergence near criticality (at tanh's critical point
    the iterates decay like ``1/(2l)``). Returns ``0.0`` when the iterates go to 0 (no fixed point
    above ``1e-14 · q0``), ``inf`` when they diverge (none below ``1e14 · q0``), and ``q0`` itself where
    every ``q`` is fixed (relu at ``sigma_w2 = 2``, ``sigma_b2 = 0``).
    """
    activation = _resolve(act)
    sigma_w2, sigma_b2, q = float(sigma_w2), float(sigma_b2), float(q0)
    if sigma_w2 < 0 or sigma_b2 < 0 or not q > 0:
        raise UsageError(
            f"need sigma_w2 >= 0, sigma_b2 >= 0 and q0 > 0; got {sigma_w2!r}, {sigma_b2!r}, {q0!r}"
        )

    def excess(x: float) -> float:
        return _length_map(activation, sigma_w2, sigma_b2, x) - x

    start = excess(q)
    if abs(start) <= rtol * q:
        return q

    def before_fixed_point(x: float) -> bool:  # M(x) − x has the sign it has at q0
        return excess(x) * start > 0

    step = 2.0 if start > 0 else 0.5
    limit = q * (1e14 if start > 0 else 1e-14)
    inner, outer = q, q * step
    while before_fixed_point(outer):
        if (start > 0 and outer > limit) or (start < 0 and outer < limit):
            return math.inf if start > 0 else 0.0
        inner, outer = outer, outer * step
    # A fixed point lies between inner and outer: bisect geometrically.
    while abs(outer - inner) > rtol * max(inner, outer):
        middle = math.sqrt(inner * outer)
        if before_fixed_point(middle):
            inner = middle
        else:
            outer = middle
    return 0.5 * (inner + outer)


# Stands for q* = inf: chi_1 there is set by the activation's asymptotic slopes (relu: 1/2 at any q).
_DIVERGED_VARIANCE = 1e30


def _chi1_at_fixed_point(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    q_star = fixed_point(act, sigma_w2, sigma_b2)
    return chi1(act, _DIVERGED_VARIANCE if math.isinf(q_star) else q_star, sigma_w2)


def critical_sigma_w2(act: Activation | str, sigma_b2: float, *, rtol: float = 1e-10) -> float:
    """The ``sigma_w2`` at which ``chi_1(q*) = 1``: the order-to-chaos transition (Schoenholz et al. 2017).

    Bisection (in log scale) on ``chi_1(q*(sigma_w2), sigma_w2) − 1``, with ``q*`` from
    :func:`fixed_point` (where ``q*`` diverges, ``chi_1`` in the limit ``q → ∞``). tanh: 1 at ``sigma_b2 = 0``,
    ≈ 1.76 at ``sigma_b2 = 0.05``; relu: 2 for every ``sigma_b2``.
    """
    activation = _resolve(act)
    sigma_b2 = float(sigma_b2)
    lo, hi = 1.0, 1.0
    while _chi1_at_fixed_point(activation, lo, sigma_b2) >= 1.0:
        lo /= 2.0
        if lo < 1e-6:
            raise UsageError(f"{activation.name}: chi_1 >= 1 even at sigma_w2 = {lo!r}; no critical point")
    while _chi1_at_fixed_point(activation, hi, sigma_b2) < 1.0:
        hi *= 2.0
        if hi > 1e6:
            raise UsageError(f"{activation.name}: chi_1 < 1 even at sigma_w2 = {hi!r}; no critical point")
    while hi - lo > rtol * hi:
        middle = math.sqrt(lo * hi)
        if _chi1_at_fixed_point(activation, middle, sigma_b2) < 1.0:
            lo = middle
        else:
            hi = middle
    return 0.5 * (lo + hi)


def depth_scale(act: Activation | str, sigma_w2: float, sigma_b2: float) -> float:
    """The gradient depth scale ``xi_grad = −1 / ln chi_1(q*)`` of Schoenholz et al. (2017, eq. 16).

    Back-propagated gradient second moments scale as ``exp(−(L − l) / xi_grad)`` across equal-width
    layers: a positive value is the number of layers over which they shrink by a factor e (ordered
    phase), a negative one the number over which they grow by e (chaotic phase), and ``inf`` is the
    critical point. In the ordered phase (correlation fixed point ``c* = 1``) this is also the
    correlation depth scale ``xi_c``; in the chaotic phase ``xi_c`` (which needs ``c* < 1``) differs
    and is not computed here. Where ``q*`` diverges (relu with ``sigma_w2 > 2``) ``chi_1`` is taken in
    the limit ``q → ∞``: relu at ``sigma_w2 = 2.5`` gives ``−1/ln 1.25 ≈ −4.5``.
    """
    activation = _resolve(act)
    value = _chi1_at_fixed_point(activation, float(sigma_w2), float(sigma_b2))
    if value == 1.0:
        return math.inf
    if value == 0.0:
        return 0.0
    return -1.0 / math.log(value)


# --------------------------------------------------------------------------------------------
# Chains of affine layers and activations
# --------------------------------------------------------------------------------------------

BiasDistribution = Literal["normal", "uniform"]


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: an affine layer ``x ↦ W x + b`` or a pointwise activation.

    Use :meth:`affine` and :meth:`activation_layer` to build them. For an affine layer ``W`` has i.i.d.
    zero-mean entries of variance ``weight_var`` (any distribution: ``W x`` is Gaussian by the
    central limit theorem) and the bias i.i.d. zero-mean entries of second moment
    ``bias_second_moment`` drawn from ``bias_distribution``: ``"normal"`` (also right for a zero
    bias) or ``"uniform"`` (PyTorch's default ``U(±1/sqrt(fan_in))``). The bias is the same for
    every sample, so it is not averaged away; once it dominates (PyTorch's default init, deep)
    pre-activations are far from Gaussian and post-activation means depend on its shape.
    """

    kind: Literal["affine", "activation"]
    fan_in: int = 0
    fan_out: int = 0
    weight_var: float = 0.0
    bias_second_moment: float = 0.0
    bias_distribution: BiasDistribution = "normal"
    activation: str = ""
    param: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "affine":
            if not (self.fan_in >= 1 and self.fan_out >= 1):
                raise UsageError(
                    f"affine layer needs fan_in, fan_out >= 1; got {self.fan_in!r}, {self.fan_out!r}"
                )
            if not (self.weight_var >= 0 and self.bias_second_moment >= 0):
                raise UsageError(
                    f"affine layer needs weight_var, bias_second_moment >= 0; got {self.weight_var!r}, "
                    f"{self.bias_second_moment!r}"
                )
            if self.bias_distribution not in ("normal", "uniform"):
                raise UsageError(
                    f"unknown bias_distribution {self.bias_distribution!r}; valid: normal, uniform"
                )
        elif self.kind == "activation":
            get_activation(self.activation, self.param)  # fail now on a bad name or parameter
        else:
            raise UsageError(f"unknown layer kind {self.kind!r}; valid: affine, activation")

    @classmethod
    def affine(
        cls,
        fan_in: int,
        fan_out: int,
        weight_var: float,
        bias_second_moment: float = 0.0,
        bias_distribution: BiasDistribution = "normal",
    ) -> ChainLayer:
        """An affine layer with ``Var[W] = weight_var`` and ``E[b²] = bias_second_moment``."""
        return cls("affine", fan_in, fan_out, float(weight_var), float(bias_second_moment), bias_distribution)

    @classmethod
    def activation_layer(cls, name: str, param: float | None = None) -> ChainLayer:
        """A pointwise activation, by registry name."""
        return cls("activation", activation=name, param=param)


@dataclass(frozen=True)
class Prediction:
    """Predicted per-element statistics of one layer's output and of the gradient there.

    Moments are over samples, units and the random init together, which is what pooling a layer's
    output over batch and units estimates at large width.
    """

    act_second_moment: float  # E[y²]
    act_mean: float  # E[y]; 0 for affine outputs (zero-mean weights and bias)
    act_var: float  # E[y²] − E[y]²
    grad_second_moment: float  # E[(dL/dy)²]


def predict_chain(
    layers: Sequence[ChainLayer],
    input_second_moment: float,
    output_grad_second_moment: float,
    *,
    input_mean: float = 0.0,
) -> list[Prediction]:
    """Mean-field prediction, layer by layer, of activation and gradient moments in a chain.

    Forward (Poole et al. 2016; He et al. 2015; REFERENCE #1, #2, #4):

    * affine: ``E[y²] = fan_in · Var[W] · E[x²] + E[b²]``, ``E[y] = 0``;
    * activation: ``E[phi(X)]`` and ``E[phi(X)²]`` with ``X`` the layer's input, modelled as
      ``N(0, fan_in · Var[W] · E[x²])`` plus the bias (normal or uniform) after an affine layer,
      and as ``N(E[x], Var[x])`` otherwise (the chain's input, an activation after an activation).

    Backward, for the gradient ``dL/dy`` of a scalar loss w.r.t. each layer's output, with
    ``E[(dL/dy)²] = output_grad_second_moment`` at the last layer (Glorot & Bengio 2010;
    Schoenholz et al. 2017):

    * through an activation: multiply by ``E[phi'(X)²]`` (same ``X`` as forward);
    * through an affine layer: multiply by ``fan_out · Var[W]``.

    Assumptions: large width (pre-activations Gaussian by the central limit theorem, units
    independent); weights and biases i.i.d. with mean 0, so affine outputs have mean 0; the
    back-propagated gradient independent of the forward weights and pre-activations (the standard
    "gradient independence" assumption, exact for the second moment of a random, independent
    cotangent at infinite width; Yang 2020). The gradient of the chain's input is the
    ``grad_second_moment`` of a leading ``identity`` activation layer, if you add one.

    >>> relu_net = [ChainLayer.affine(512, 512, 2 / 512), ChainLayer.activation_layer("relu")] * 3
    >>> [round(p.act_second_moment, 6) for p in predict_chain(relu_net, 1.0, 1.0)]
    [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    """
    input_second_moment = _check_variance(input_second_moment, "input_second_moment")
    output_grad_second_moment = _check_variance(output_grad_second_moment, "output_grad_second_moment")
    forward, backward_factors = _chain_forward(layers, input_second_moment, float(input_mean))
    grads = [0.0] * len(forward)
    grad = output_grad_second_moment
    for i in range(len(forward) - 1, -1, -1):
        grads[i] = grad
        grad *= backward_factors[i]
    return [
        Prediction(act_second_moment=s, act_mean=m, act_var=max(s - m * m, 0.0), grad_second_moment=g)
        for (s, m), g in zip(forward, grads)
    ]


def _chain_forward(
    layers: Sequence[ChainLayer], input_second_moment: float, input_mean: float
) -> tuple[list[tuple[float, float]], list[float]]:
    """:func:`predict_chain`'s forward pass from a checked input: ``(E[y²], E[y])`` of every layer and
    its backward factor ``E[(dL/dx)²] / E[(dL/dy)²]``.

    Each layer's input is modelled as ``mean + U + G``: uniform ``U ~ U(±halfwidth)`` (PyTorch's
    default bias) plus ``G ~ N(0, gaussian_var)``.
    """
    forward: list[tuple[float, float]] = []
    backward_factors: list[float] = []
    mean, gaussian_var, halfwidth = input_mean, max(input_second_moment - input_mean**2, 0.0), 0.0
    second_moment = input_second_moment
    for layer in layers:
        if layer.kind == "affine":
            weight_part = layer.fan_in * layer.weight_var * second_moment
            second_moment = weight_part + layer.bias_second_moment
            if layer.bias_distribution == "uniform":
                mean, gaussian_var, halfwidth = 0.0, weight_part, math.sqrt(3.0 * layer.bias_second_moment)
            else:
                mean, gaussian_var, halfwidth = 0.0, second_moment, 0.0
            forward.append((second_moment, 0.0))
            backward_factors.append(layer.fan_out * layer.weight_var)
        else:
            activation = get_activation(layer.activation, layer.param)
            moments = _law_moments(activation, mean, gaussian_var, halfwidth)
            second_moment = moments.second_moment
            mean, gaussian_var, halfwidth = moments.mean, max(moments.variance, 0.0), 0.0
            forward.append((second_moment, moments.mean))
            backward_factors.append(moments.derivative_second_moment)
    return forward, backward_factors
