"""The fix: an initializer matched to the activation that follows, or the architectural change that
init alone cannot replace.

Matching rules (He et al. 2015; Glorot & Bengio 2010; Klambauer et al. 2017; Saxe et al. 2014):

* ReLU family (relu, leaky_relu, relu6, prelu) → He/Kaiming, Var[w] = 2/((1 + a²)·fan_in).
* Smooth ReLU-likes (gelu, silu, mish, elu, softplus) → Kaiming with the activation's own gain.
* tanh, softsign, hardtanh, sigmoid → Xavier/Glorot.
* selu → LeCun normal, Var[w] = 1/fan_in (torch's ``calculate_gain('selu') = 3/4`` misses the
  fixed point, REFERENCE #11).
* no activation (linear layers, attention projections) → orthogonal.

Init alone cannot help when the weights already have the variance-preserving scale for their
activation and signal still vanishes or explodes: BatchNorm without skip connections explodes
gradients ≈ 1.47× per layer whatever the weights (REFERENCE #10), unnormalised residual branches add
their variance to the stream every block (REFERENCE #7), sigmoid's derivative ≤ 1/4 shrinks gradients
at any weight scale (REFERENCE #14). Then the suggestion names normalization or residual scaling and
:func:`suggested_init` returns None.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter

from gradprobe.diagnose.profile import per_report, weighted_layers
from gradprobe.report import LayerRecord, Report

__all__ = [
    "RELU_FAMILY",
    "SMOOTH_RELU_FAMILY",
    "SATURATING",
    "init_for_activation",
    "dominant_activation",
    "weight_scale_match",
    "depth_fix",
    "suggested_init",
]

RELU_FAMILY = frozenset({"relu", "leaky_relu", "relu6", "prelu", "rrelu"})
SMOOTH_RELU_FAMILY = frozenset({"gelu", "silu", "mish", "elu", "celu", "softplus", "hardswish"})
SATURATING = frozenset({"tanh", "softsign", "hardtanh", "sigmoid", "hardsigmoid"})

# 1/E[φ(z)²] for z ~ N(0, 1): the fan_in·Var[w] that preserves the second moment through φ
# (REFERENCE's empirical gains squared). Used only when gradprobe.theory is unavailable.
_FALLBACK_GAIN = {
    "relu": 1.414,
    "tanh": 1.593,
    "gelu": 1.533,
    "silu": 1.676,
    "elu": 1.245,
    "sigmoid": 1.846,
    "selu": 1.0,
}


@functools.lru_cache(maxsize=256)
def _gain(activation: str | None, param: float | None = None) -> float:
    """The activation's variance-preserving gain; a constant of the activation (kept: gelu's and
    silu's take a quadrature, and the weight-scale check asks for every weighted layer)."""
    if activation is None:
        return 1.0
    if activation in ("leaky_relu", "prelu", "rrelu"):
        a = 0.01 if param is None else param
        return math.sqrt(2.0 / (1.0 + a * a))
    try:
        from gradprobe.theory import activation_gain

        g = float(activation_gain(activation, param))
        if math.isfinite(g) and g > 0:
            return g
    except Exception:  # theory unavailable or does not know this activation
        pass
    return _FALLBACK_GAIN.get(activation, _FALLBACK_GAIN["relu"] if activation in RELU_FAMILY else 1.0)


def init_for_activation(activation: str | None) -> tuple[str, str]:
    """(initializer name, how to say it) matched to the activation that follows a layer."""
    if activation in RELU_FAMILY:
        return "kaiming_normal", "He/Kaiming init (`kaiming_normal`, Var[w] = 2/fan_in for ReLU)"
    if activation in SMOOTH_RELU_FAMILY:
        return "kaiming_normal", f"Kaiming init with the {activation} gain (`kaiming_normal`)"
    if activation in SATURATING:
        return "xavier_normal", "Xavier/Glorot init (`xavier_normal`)"
    if activation == "selu":
        return "lecun_normal", "LeCun normal init (`lecun_normal`, Var[w] = 1/fan_in; not gain 3/4)"
    return "orthogonal", "orthogonal init (`orthogonal`)"


def dominant_activation(report: Report, names: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The activation following most weighted layers (of ``names`` if given); None if none has one."""
    chosen = set(names) if names else None
    counts = Counter(
        x.activation
        for x in weighted_layers(report)
        if x.activation is not None and (chosen is None or x.name in chosen)
    )
    if not counts and chosen is not None:
        return dominant_activation(report)
    return counts.most_common(1)[0][0] if counts else None


def _variance_factor(layer: LayerRecord) -> float | None:
    w = layer.param("weight")
    if w is None or len(w.shape) < 2 or not w.fan_in or not math.isfinite(w.var) or w.rms == 0:
        return None
    return w.fan_in * w.var


def _matched(activation: str | None, param: float | None, factor: float) -> bool:
    """Is fan_in·Var[w] variance-preserving for this activation (within 25%)?

    Bounded activations are matched anywhere from the edge of chaos (σ_w² = 1, critical tanh) to
    torch's gain (5/3)²; the others within 25% of 1/E[φ(z)²].
    """
    if activation in SATURATING:
        g = 5 / 3 if activation != "sigmoid" else _gain("sigmoid")
        return 0.9 <= factor <= 1.1 * g * g
    target = _gain(activation, param) ** 2
    return 0.75 * target <= factor <= 1.33 * target


def weight_scale_match(report: Report) -> float | None:
    """Fraction of weighted layers (with a ``weight`` matrix) whose fan_in·Var[w] is
    variance-preserving for the activation that follows them; None when none can be judged.
    The last weighted layer (usually the head, often deliberately scaled) is left out."""
    return per_report(report, "weight_scale_match", lambda: _weight_scale_match(report))


def _weight_scale_match(report: Report) -> float | None:
    weighted = weighted_layers(report)[:-1]
    verdicts = []
    for layer in weighted:
        f = _variance_factor(layer)
        if f is not None:
            verdicts.append(_matched(layer.activation, layer.activation_param, f))
    return sum(verdicts) / len(verdicts) if verdicts else None


def _median_factor(report: Report) -> float | None:
    return per_report(report, "median_factor", lambda: _compute_median_factor(report))


def _compute_median_factor(report: Report) -> float | None:
    factors = [f for x in weighted_layers(report) for f in [_variance_factor(x)] if f is not None]
    return statistics.median(factors) if factors else None


def _current_init(report: Report) -> str:
    return str(report.meta.get("init", "") or "")


def depth_fix(report: Report, code: str, layers: tuple[str, ...] | list[str] = ()) -> tuple[str, str | None]:
    """(suggestion text, initializer name or None when init alone cannot help) for a depth finding."""
    activation = dominant_activation(report, tuple(layers))
    name, said = init_for_activation(activation)
    matched = weight_scale_match(report)
    has_batchnorm = per_report(
        report, "has_batchnorm", lambda: any("BatchNorm" in x.type for x in report.layers)
    )
    already = _current_init(report).startswith(name)
    weights_ok = matched is not None and matched >= 0.5
    if code == "exploding_gradients" and has_batchnorm and (weights_ok or already):
        return (
            "BatchNorm without skip connections makes gradients explode ≈ 1.47× per layer whatever the "
            "init (Yang et al. 2019): add residual connections, use fewer layers, or normalise with "
            "LayerNorm/GroupNorm instead.",
            None,
        )
    if code == "exploding_activations" and (weights_ok or already):
        return (
            "the weights are already variance-preserving, so the growth comes from summing branches: "
            "scale each residual branch (zero-init its last layer or last norm's γ, ReZero α = 0, "
            "LayerScale, Fixup's L^(-1/2(m-1))) or normalise the stream (pre-LN/BatchNorm in each branch).",
            None,
        )
    if code.startswith("vanishing") and (weights_ok or already):
        if activation == "sigmoid":
            return (
                "sigmoid's derivative ≤ 1/4 shrinks gradients at any weight scale: use tanh or a ReLU-family "
                "activation, add normalization (BatchNorm/LayerNorm) or residual connections.",
                None,
            )
        return (
            "the weights are already variance-preserving for the activation: add normalization "
            "(BatchNorm/LayerNorm) or residual connections, or reduce depth.",
            None,
        )
    if code.startswith("exploding") and (weights_ok or already):
        return (
            "the weights are already variance-preserving: add normalization (BatchNorm/LayerNorm) or "
            "scale the residual branches.",
            None,
        )
    factor = _median_factor(report)
    scale = f" (now fan_in·Var[w] ≈ {factor:.2g})" if factor is not None else ""
    follows = f"the {activation} that follows" if activation else "these linear layers"
    return f"initialise with {said}, matched to {follows}{scale}.", name


def suggested_init(report: Report) -> str | None:
    """The initializer to re-run with (``probe(..., suggest=True)``), or None when no error finding
    can be fixed by init alone (or when the model already uses it)."""
    findings = report.findings
    if not findings:
        from gradprobe.diagnose import diagnose

        findings = diagnose(report)
    for f in findings:
        if f.severity != "error":
            continue
        name = f.evidence.get("suggested_init") if isinstance(f.evidence, dict) else None
        if isinstance(name, str) and not _current_init(report).startswith(name):
            return name
    return None
