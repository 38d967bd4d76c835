"""The depth profile: how signal and gradient scale along the network, compared like with like.

Two metrics, each chosen to survive the shape changes of real networks (REFERENCE traps):

* **Forward: between-sample signal variance** — the mean over units of each unit's own variance
  (:attr:`TensorStats.signal_var`). Per-unit constants carry no information about the input: PyTorch's
  default bias adds a floor of ≈ 2/(5n) to E[z²] while the part that distinguishes inputs keeps
  shrinking (REFERENCE #2). Being per element, it is preserved by variance-preserving inits whatever
  the widths; it is read at the *output of weighted layers* (pre-activation), where inits set it.
* **Backward: per-sample gradient energy** — ``E[g²] · elements per sample``
  (:attr:`TensorStats.energy`). Max-pool routes each gradient to one input, flatten reshapes, and a
  fan_in-scaled layer keeps ‖Wᵀg‖² ≈ fan_in·Var[w]·‖g‖²: energy is conserved where per-element
  variance drops 4× per pool or jumps at every head.

Both are read at *weighted layers* (modules owning a parameter of dimension ≥ 2), relative to the
first weighted layer (forward) and the last one (backward): the per-layer gain is the ratio to the
neighbouring weighted layer, the cumulative ratio the ratio to the reference. Forward, a
normalization layer's output becomes the new reference (:func:`forward_chain`): BatchNorm and
LayerNorm hide the weight scale in the forward pass, so neither a tiny embedding before a LayerNorm
nor the per-layer loss of between-sample variance in a BatchNorm MLP compounds; the backward pass
still shows what the norms hide. A least-squares fit of
the log ratios against depth tells exponential decay (a constant per-layer gain: ln r ∝ k) from the
slow polynomial decay of critical tanh (ln r ∝ ln(1 + k), REFERENCE #4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from gradprobe.report import LayerRecord, Report

__all__ = [
    "forward_chain",
    "is_normalization",
    "ProfilePoint",
    "DepthProfile",
    "Trend",
    "depth_profile",
    "fit_trend",
    "is_weighted",
    "finite_positive",
]


# --------------------------------------------------------------------------------------------
# What the rules of one diagnosis share
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


class _Scope:
    __slots__ = ("report", "values")

    def __init__(self, report: Report) -> None:
        self.report = report
        self.values: dict[Hashable, Any] = {}


_SCOPE: ContextVar[_Scope | None] = ContextVar("gradprobe_diagnosis_scope", default=None)


@contextmanager
def analysis_scope(report: Report) -> Iterator[None]:
    """Within this block, what the rules compute from ``report`` alone (its depth profile, its
    deficits, the weight-scale verdicts…) is computed once and shared through :func:`per_report`
    instead of once per rule. :func:`gradprobe.diagnose.diagnose` runs its rules inside one; the
    report must not change inside it. Outside it (a rule called on its own) nothing is kept."""
    token = _SCOPE.set(_Scope(report))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def per_report(report: Report, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, computed once per ``key`` inside the :func:`analysis_scope` of ``report`` (always
    computed outside one). Callers must not modify what it returns."""
    scope = _SCOPE.get()
    if scope is None or scope.report is not report:
        return compute()
    try:
        return scope.values[key]  # type: ignore[no-any-return]
    except KeyError:
        value = scope.values[key] = compute()
        return value


# --------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------


def is_weighted(layer: LayerRecord) -> bool:
    """A layer owning a parameter of dimension ≥ 2 (Linear, ConvNd, Embedding, RNNs, attention…)."""
    for p in layer.params:
        if len(p.shape) >= 2:
            return True
    return False


def weighted_layers(report: Report) -> list[LayerRecord]:
    """The weighted layers (:func:`is_weighted`) in execution order (a new list; shared within an
    :func:`analysis_scope`, so callers must not modify it)."""
    return per_report(report, "weighted", lambda: [x for x in report.layers if is_weighted(x)])


def is_normalization(layer: LayerRecord) -> bool:
    """BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm … (by class name)."""
    return "Norm" in layer.type


def forward_chain(report: Report, values: Mapping[str, float], reference: str) -> dict[str, float]:
    """Forward ratios of every layer with a value, relative to ``reference``.

    A normalization layer rescales its output whatever its input, so forward scale does not
    compound across it: its output becomes the new reference (ratio 1), and what follows is measured
    against it (a weight matrix after a LayerNorm gets the gain of its own weights, a BatchNorm MLP
    never compounds its per-layer loss of between-sample variance). A norm whose output is exactly
    zero (zero-γ) is a gate, not a reset. Layers before the reference get their plain ratio to it;
    without normalization layers every ratio is the plain ratio ``value / values[reference]``.
    """
    base = values[reference]
    ratios: dict[str, float] = {}
    started = False
    for layer in report.layers:
        v = values.get(layer.name)
        if v is None:
            continue
        if started and is_normalization(layer) and v > 0:
            base = v
        ratios[layer.name] = v / base
        started = started or layer.name == reference
    return ratios


def finite_positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass(frozen=True)
class ProfilePoint:
    """One weighted layer's place in the profile. Ratios are None where the metric is missing or
    not finite (a non-finite value is the non-finite rule's business)."""

    name: str
    index: int
    activation: str | None
    signal_var: float | None
    grad_energy: float | None
    forward_ratio: float | None
    backward_ratio: float | None


@dataclass(frozen=True)
class Trend:
    """How a sequence of cumulative ratios r_0 = 1, r_1, …, r_K behaves along depth.

    ``kind`` is ``"exponential"`` when ln r is fitted better by c·k than by c·ln(1 + k),
    ``"polynomial"`` otherwise (``"flat"`` when every ratio is within 10× of 1, ``"short"`` below
    two points). ``per_layer_gain`` is exp of the exponential fit's slope; ``extreme`` the smallest
    (vanishing) or largest (exploding) ratio and ``at`` where it occurs.
    """

    kind: str
    per_layer_gain: float
    polynomial_exponent: float
    layers: int
    cumulative: float
    smallest: float
    smallest_at: str
    largest: float
    largest_at: str

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "per_layer_gain": self.per_layer_gain,
            "polynomial_exponent": self.polynomial_exponent,
            "layers": self.layers,
            "cumulative": self.cumulative,
            "smallest": self.smallest,
            "smallest_at": self.smallest_at,
            "largest": self.largest,
            "largest_at": self.largest_at,
        }


def fit_trend(names: Sequence[str], ratios: Sequence[float]) -> Trend:
    """Fit the cumulative ratios (in depth order, the reference first with ratio 1).

    Both models pass through the reference (ln r_0 = 0), so each has one parameter:
    exponential ln r_k = k·ln g, polynomial ln r_k = −α·ln(1 + k). Zero ratios are clipped to the
    smallest positive float so that the fit stays finite (a zero is far below every threshold).
    """
    if len(names) != len(ratios) or not names:
        raise ValueError("fit_trend needs one name per ratio and at least one point")
    logs = [math.log(max(r, 1e-300)) for r in ratios]
    k = list(range(len(logs)))
    lk = [math.log1p(i) for i in k]
    sxx = sum(i * i for i in k)
    slope = sum(i * y for i, y in zip(k, logs)) / sxx if sxx else 0.0
    spp = sum(p * p for p in lk)
    alpha = -sum(p * y for p, y in zip(lk, logs)) / spp if spp else 0.0
    sse_exp = sum((y - slope * i) ** 2 for i, y in zip(k, logs))
    sse_poly = sum((y + alpha * p) ** 2 for p, y in zip(lk, logs))
    lo = min(range(len(ratios)), key=lambda i: ratios[i])
    hi = max(range(len(ratios)), key=lambda i: ratios[i])
    if len(ratios) < 2:
        kind = "short"
    elif all(abs(y) <= math.log(10) for y in logs):
        kind = "flat"
    else:
        kind = "exponential" if sse_exp <= sse_poly else "polynomial"
    return Trend(
        kind=kind,
        per_layer_gain=math.exp(slope),
        polynomial_exponent=alpha,
        layers=len(ratios),
        cumulative=ratios[-1],
        smallest=ratios[lo],
        smallest_at=names[lo],
        largest=ratios[hi],
        largest_at=names[hi],
    )


@dataclass(frozen=True)
class DepthProfile:
    """The weighted layers in execution order with both metrics and their ratios."""

    points: tuple[ProfilePoint, ...]
    forward_reference: str | None
    backward_reference: str | None

    def forward(self, exclude: Iterable[str] = ()) -> tuple[list[str], list[float]]:
        """Names and forward ratios, depth order, from the reference on, without ``exclude``."""
        skip = set(exclude)
        names: list[str] = []
        ratios: list[float] = []
        started = False
        for p in self.points:
            started = started or p.name == self.forward_reference
            if started and p.name not in skip and p.forward_ratio is not None:
                names.append(p.name)
                ratios.append(p.forward_ratio)
        return names, ratios

    def backward(self, exclude: Iterable[str] = ()) -> tuple[list[str], list[float]]:
        """Names and backward ratios in *backward* depth order (reference first), without ``exclude``."""
        skip = set(exclude)
        names: list[str] = []
        ratios: list[float] = []
        # A reference outside the weighted layers (everything behind a zero gate at the output):
        # the ratios are already relative to it, start from the last weighted layer.
        started = self.backward_reference not in {p.name for p in self.points}
        for p in reversed(self.points):
            started = started or p.name == self.backward_reference
            if started and p.name not in skip and p.backward_ratio is not None:
                names.append(p.name)
                ratios.append(p.backward_ratio)
        return names, ratios

    def to_dict(self) -> dict[str, object]:
        return {
            "forward_reference": self.forward_reference,
            "backward_reference": self.backward_reference,
            "layers": [p.name for p in self.points],
            "forward_ratio": [p.forward_ratio for p in self.points],
            "backward_ratio": [p.backward_ratio for p in self.points],
        }


def _signal(layer: LayerRecord) -> float | None:
    if layer.act is None:
        return None
    v = layer.act.signal_var
    return v if _finite(v) else None


def _energy(layer: LayerRecord) -> float | None:
    if layer.grad is None:
        return None
    e = layer.grad.energy
    return e if _finite(e) else None


def backward_reference(report: Report) -> LayerRecord | None:
    """The last weighted layer with a positive finite gradient energy; failing that (everything
    behind a zero gate at the very output), the layer with the largest gradient energy."""
    for layer in reversed(weighted_layers(report)):
        e = _energy(layer)
        if e is not None:
            if e > 0:
                return layer
            break
    best: LayerRecord | None = None
    for layer in report.layers:
        e = _energy(layer)
        if finite_positive(e) and (best is None or e > (_energy(best) or 0.0)):  # type: ignore[operator]
            best = layer
    return best


def depth_profile(report: Report) -> DepthProfile:
    """The depth profile of a report (see the module docstring for the metrics). Computed once per
    :func:`analysis_scope`."""
    return per_report(report, "depth_profile", lambda: _depth_profile(report))


def _depth_profile(report: Report) -> DepthProfile:
    weighted = weighted_layers(report)
    fwd_ref = next((x for x in weighted if finite_positive(_signal(x))), None)
    bwd_ref = backward_reference(report)
    signals = {x.name: v for x in report.layers for v in [_signal(x)] if v is not None}
    forward = forward_chain(report, signals, fwd_ref.name) if fwd_ref is not None else {}
    b0 = _energy(bwd_ref) if bwd_ref is not None else None
    points = []
    for layer in weighted:
        s, e = _signal(layer), _energy(layer)
        points.append(
            ProfilePoint(
                name=layer.name,
                index=layer.index,
                activation=layer.activation,
                signal_var=s,
                grad_energy=e,
                forward_ratio=forward.get(layer.name),
                backward_ratio=None if e is None or not b0 else e / b0,
            )
        )
    return DepthProfile(
        points=tuple(points),
        forward_reference=None if fwd_ref is None else fwd_ref.name,
        backward_reference=None if bwd_ref is None else bwd_ref.name,
    )
