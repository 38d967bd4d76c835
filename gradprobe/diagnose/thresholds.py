"""The diagnosis thresholds: one frozen dataclass, each default with the reason it has that value.

Ratios are *cumulative* along depth and relative to the network's own reference points (the first
weighted layer's between-sample signal variance forward, the last weighted layer's per-sample gradient
energy backward), so they do not depend on the input scale, the loss reduction or the batch size.
Fractions are per layer. ``docs/findings.md`` explains every default at length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UsageError

__all__ = ["Thresholds", "resolve_thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """Every number the diagnosis compares against. Override any of them by name:
    ``diagnose(report, vanishing_gradients_error=1e-10)`` or ``probe(..., thresholds={...})``.

    >>> Thresholds().vanishing_gradients_error
    1e-08
    >>> Thresholds(vanishing_gradients_error=1e-10).vanishing_gradients_error
    1e-10
    """

    # Backward: cumulative per-sample gradient-energy ratio (first weighted layer ÷ last) at or below
    # which the gradient has vanished. He et al. (2015) trained a 22-layer ReLU net with Xavier init
    # (2^-21; measured 2.5e-7 … 6.3e-7 at width 256) but not a 30-layer one (2^-29; measured 1.0e-9 …
    # 2.9e-9): 1e-8 lies between, ≥ 3× from the 30-layer side and ≥ 25× from the 22-layer side.
    vanishing_gradients_error: float = 1e-8
    # Below this, and decaying exponentially (a constant gain per layer), the gradient is on its way
    # out: ReLU/Xavier from depth ≈ 21, a 10-layer ReLU MLP with PyTorch's default init (1.6e-8 …
    # 2.4e-8). A VGG-style net with max-pools and PyTorch's default init reaches 1.4e-5 and trains
    # fine: 1e-6 leaves it a factor 14. Critical tanh decays only polynomially (q_l ≈ 1/2l).
    vanishing_gradients_warning: float = 1e-6
    # Forward: cumulative ratio of between-sample signal variance (last weighted layer ÷ first; a
    # normalization layer's output starts a new reference). It falls faster than E[z²] because deep
    # ReLU nets also decorrelate their inputs into one direction (inputs become indistinguishable):
    # ×1/20 … 1/30 on top of 2^-L at depth 20-30. Measured: ReLU/Xavier depth 22 1.7e-8 … 7.2e-8
    # (trains), depth 30 4.2e-11 … 2.4e-10 (does not): one decade below the backward threshold sits in
    # the same place between them, ≥ 4× from the failing side and ≥ 17× from the trainable one.
    vanishing_activations_error: float = 1e-9
    # One decade below the backward warning for the same reason (the VGG-style net above: 3.1e-6).
    vanishing_activations_warning: float = 1e-7
    # Errors are symmetric to the backward vanishing error, the same number of decades upwards.
    # Unnormalised He residual branches double the variance per block (the between-sample part
    # reaches 7e7 at 30 blocks, 3.6e9 at 36); BatchNorm without skips explodes gradients ≈ 1.45× per
    # layer (4e4 at 30 layers, 6.5e9 at 60). Warnings need exponential growth; no trainable
    # architecture is known to grow 1e4 at init (chaotic tanh, gain 5/3: ≈ 1.5e2 over 30 layers).
    exploding_activations_error: float = 1e8
    exploding_activations_warning: float = 1e4
    exploding_gradients_error: float = 1e8
    exploding_gradients_warning: float = 1e4
    # A multiplicative parameter this small relative to its natural scale (1 for a 1-D scale such as
    # γ, α or LayerScale; 1/√fan_in for a weight matrix, i.e. rms·√fan_in) is a gate: ReZero α = 0,
    # zero-γ, zero-init head, LayerScale 1e-6 … 1e-4. A deficit is called gated only with such a
    # parameter where it ends *and* a healthy profile behind the gate (after the probe's optimizer
    # steps when the gate is exactly zero): a few Adam steps alone also lift plain exponential
    # vanishing (ReLU/Xavier depth 30 goes from 1e-9 to 1e-7 in three steps at lr 1e-3). Standard
    # inits have rms·√fan_in between ≈ 0.15 (N(0, 0.02²) at width 64) and 2: 1e-2 is below all of them.
    gate_param_scale: float = 1e-2
    # Fraction of a ReLU-family layer's units that are ≤ 0 for every sample, above which a warning
    # is given. Random He init with centred inputs already leaves ≈ 14% of units off for the whole
    # batch at layer 10 and ≈ 40% at layer 50 (input correlation, not death); the depth allowance
    # below raises this floor for deeper layers.
    dead_warning_fraction: float = 0.5
    # How far above the random-init expectation at this depth a layer may be before a warning.
    dead_margin: float = 0.1
    # A layer this dead passes (almost) no signal and receives (almost) no gradient: an error.
    dead_error_fraction: float = 0.95
    # With fewer samples a unit that fires for 5% of inputs is missed with probability ≥ 4%
    # (0.95^64): the batch is too small to tell dead from rarely active, so only a warning is given.
    dead_min_samples: int = 64
    # Fraction of a bounded activation's outputs with φ′(z)/φ′(0) < 0.1 (the probe's
    # ``saturation_derivative``). 0.3 ↔ tanh inputs with std ≈ 1.8 (weights ≈ 1.8× too large; the
    # chaotic but trainable torch gain 5/3 stays below it); 0.75 ↔ std ≈ 5.7, where E[tanh′] ≈ 0.14:
    # most units pass almost no gradient and barely move.
    saturation_warning: float = 0.3
    saturation_error: float = 0.75
    # Weighted layers needed before a depth trend (exponential vs polynomial) is fitted and a warning
    # is given on it; errors need only two.
    trend_min_layers: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"threshold {f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise UsageError(f"threshold {f.name} must be ≥ 0, got {value!r}")
        for kind in ("activations", "gradients"):
            err, warn = getattr(self, f"vanishing_{kind}_error"), getattr(self, f"vanishing_{kind}_warning")
            if not 0 < err <= warn <= 1:
                raise UsageError(
                    f"need 0 < vanishing_{kind}_error ≤ vanishing_{kind}_warning ≤ 1, got {err!r} and {warn!r}"
                )
            err, warn = getattr(self, f"exploding_{kind}_error"), getattr(self, f"exploding_{kind}_warning")
            if not 1 <= warn <= err:
                raise UsageError(
                    f"need 1 ≤ exploding_{kind}_warning ≤ exploding_{kind}_error, got {warn!r} and {err!r}"
                )
        for lo, hi in (
            ("dead_warning_fraction", "dead_error_fraction"),
            ("saturation_warning", "saturation_error"),
        ):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0 <= a <= b <= 1:
                raise UsageError(f"need 0 ≤ {lo} ≤ {hi} ≤ 1, got {a!r} and {b!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def resolve_thresholds(
    base: Thresholds | None = None, overrides: Mapping[str, Any] | None = None
) -> Thresholds:
    """``base`` (default: the defaults) with ``overrides`` applied; unknown names raise UsageError."""
    base = base or _defaults()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(Thresholds.names()))
    if unknown:
        raise UsageError(
            f"unknown threshold{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(Thresholds.names())}"
        )
    return dataclasses.replace(base, **overrides) if overrides else base


@functools.lru_cache(maxsize=1)
def _defaults() -> Thresholds:
    """The default thresholds, validated once (frozen, so one instance serves every diagnosis)."""
    return Thresholds()
