"""Mean-field predictions beside the measurements: what theory says each layer of a plain chain should do.

:func:`attach_predictions` sets ``layer.predicted_act_var`` and ``layer.predicted_grad_var`` on the
layers of a :class:`~gradprobe.report.Report` that belong to a *plain chain*: consecutive
Linear/Conv layers and pointwise activations, identified from the report alone (execution order,
layer types, output shapes, the activation the probe traced after each weighted layer). Everything
else (normalization, attention, pooling, dropout, residual adds, embeddings, recurrent layers,
modules called more than once) ends a chain and gets None. The math is
:func:`gradprobe.theory.predict_chain` (Poole et al. 2016; Schoenholz et al. 2017): the q-map
forward, ``fan_out·Var[W]`` and ``E[φ'(z)²]`` backward, with the weight and bias second moments the
probe measured on the parameters it actually used.

Anchors (docs/theory.md explains each choice):

* **forward**, from the chain's input: the probe does not record the model input, so the input
  second moment is derived from the first affine layer's measured output,
  ``E[x²] = (E[y²] − E[b²]) / (fan_in·Var[W])``; its own prediction then equals the measurement by
  construction. When ``report.meta["input_stats"]`` (``{"shape": [...], "second_moment": float}``,
  see :data:`INPUT_STATS_KEY`) is present and the chain starts at the model's first layer, the
  measured input is used instead, and the first layer's prediction is a real one.
* **backward**, from the measured gradient at the chain's last *affine* layer (equal there by
  construction); activations after it get no gradient prediction, because the gradient arriving
  from outside the chain can be correlated with their input (a max-pool feeds only active units).

A link is accepted only when the structure fits (shapes; an activation module must be the one the
tracer saw applied to the affine output) *and* one step of theory from the measured layer before
agrees with the measurement: an affine layer's output variance and the gradient it sends back within
:data:`LINK_TOLERANCE` (wider for narrow layers, at most :data:`NARROW_LINK_TOLERANCE`), an
activation's output likewise. A residual add, an unseen dropout or structured weights (identity
init) thus end the chain instead of producing a confident wrong prediction. A functional activation
(``F.relu``) between two Linear layers is taken from the traced ``layer.activation``.

Predicted variances are per element, pooled over samples and units like ``act.var`` and ``grad.var``;
they are the expectation over random weights, so a single finite network wanders around them: at
width n, each ReLU layer adds a relative spread of about √(2.5/n) once the batch has collapsed onto
a few directions (Hanin & Rolnick 2018, REFERENCE #6).

>>> import torch
>>> from gradprobe.probing import probe
>>> net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(256, 256), torch.nn.Tanh())])
>>> x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
>>> report = probe(net, x, init="xavier_normal", diagnose=False)
>>> last = report.layers[-1]   # tanh at σ_w = 1: q ≈ 1/(2l), REFERENCE #4
>>> round(last.predicted_act_var, 3), round(last.act.var, 3)
(0.087, 0.085)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gradprobe import theory
from gradprobe.errors import GradprobeError
from gradprobe.report import LayerRecord, ParamRecord, Report
from gradprobe.theory import ChainLayer, Prediction, activation_moments, get_activation, predict_chain

__all__ = [
    "AFFINE_TYPES",
    "ACTIVATION_TYPES",
    "PASS_THROUGH_TYPES",
    "LINK_TOLERANCE",
    "NARROW_LINK_TOLERANCE",
    "INPUT_STATS_KEY",
    "ChainElement",
    "find_chains",
    "attach_predictions",
]

#: Module types that are affine maps ``W x + b`` whose fans the probe records.
AFFINE_TYPES = frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d"})

#: Activation module type → :mod:`gradprobe.theory` activation name. Modules with a parameter the
#: report does not record (Hardtanh bounds, Softplus beta, CELU alpha, PReLU slopes) are left out.
ACTIVATION_TYPES: dict[str, str] = {
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "GELU": "gelu",
    "SiLU": "silu",
    "SELU": "selu",
    "ELU": "elu",
    "Softsign": "softsign",
    "ReLU6": "relu6",
    "Mish": "mish",
}

#: Modules that pass their input through unchanged as a set of numbers (same variance).
PASS_THROUGH_TYPES = frozenset({"Identity", "Flatten", "Unflatten"})

#: Activations whose parameter must come from the tracer (the module type alone does not say it).
_PARAMETERISED = frozenset({"leaky_relu", "elu"})

#: A link into an affine layer holds when its output, predicted one step from the hypothesised
#: input, and the gradient it sends back, predicted from its own, are within a factor 1 + this of the
#: measurements. One step of a true chain at width ≥ 288 is within ≈ 3·√(2/n) ≤ 0.25 of them; a
#: residual add of a same-scale branch is off by ≈ 2×, an unseen dropout(p) by 1/(1 − p).
LINK_TOLERANCE = 0.25

#: The forward check's widest tolerance, for narrow layers (a 10-class head): wide enough for the
#: finite-width spread of a few units, narrow enough to refuse a residual stream (2× the branch).
NARROW_LINK_TOLERANCE = 0.5

#: Optional ``report.meta`` entry with the model input's ``shape`` and per-element ``second_moment``
#: (first floating input, first batch's shape); used as the first chain's input when present.
INPUT_STATS_KEY = "input_stats"

# PyTorch's default Linear/Conv bias U(±1/√fan_in) has E[b²] = 1/(3 fan_in); a bias within this
# relative distance of it, in a module kept as built, is modelled as uniform.
_DEFAULT_BIAS_MATCH = 0.05

Kind = Literal["affine", "activation", "pass"]


@dataclass
class ChainElement:
    """One element of a plain chain: a recorded layer, or an activation applied functionally.

    ``layer`` is None for a functional activation (``F.relu`` inside ``forward``) that the report
    saw only as the ``activation`` traced after the affine layer before it. ``chain_layer`` is the
    theory's description (None for a pass-through module); ``forward_fraction`` and
    ``backward_fraction`` are the share of a convolution's kernel taps that fall inside the (zero
    padded, strided) input, averaged over output and input positions: 1 for Linear layers.
    """

    kind: Kind
    layer: LayerRecord | None
    chain_layer: ChainLayer | None = None
    activation: str | None = None
    forward_fraction: float = 1.0
    backward_fraction: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.layer.name if self.layer is not None else f"{self.activation}(functional)"


# --------------------------------------------------------------------------------------------
# Reading a layer record
# --------------------------------------------------------------------------------------------


def _second_moment(layer: LayerRecord, which: Literal["act", "grad"]) -> float | None:
    stats = layer.act if which == "act" else layer.grad
    if stats is None:
        return None
    value = stats.var + stats.mean * stats.mean
    return value if math.isfinite(value) and value >= 0 else None


def _weight(layer: LayerRecord) -> ParamRecord | None:
    w = layer.param("weight")
    if w is None or len(w.shape) < 2 or not w.fan_in or not w.fan_out:
        return None
    if not (math.isfinite(w.var) and math.isfinite(w.mean)):
        return None
    return w


def _weight_second_moment_var(w: ParamRecord) -> float:
    """The weights' variance about 0: mean-field theory takes zero-mean weights, and a common
    offset ``m`` adds ``m²`` per weight to every output's second moment just like variance does."""
    return w.var + w.mean * w.mean


def _bias(layer: LayerRecord, fan_in: int) -> tuple[float, Literal["normal", "uniform"]]:
    b = layer.param("bias")
    if b is None or not (math.isfinite(b.var) and math.isfinite(b.mean)):
        return 0.0, "normal"
    second = b.var + b.mean * b.mean
    default = 1.0 / (3.0 * fan_in)
    built = layer.initializer in (None, "default", "keep", "kept as built")
    looks_default = second > 0 and abs(second / default - 1.0) <= _DEFAULT_BIAS_MATCH
    return second, "uniform" if built and looks_default else "normal"


def _classify(layer: LayerRecord) -> ChainElement | None:
    """The chain element a recorded layer can be, or None (it ends any chain)."""
    if layer.calls != 1 or layer.act is None or layer.outputs_skipped:
        return None
    if layer.type in AFFINE_TYPES:
        w = _weight(layer)
        if w is None or set(p.name for p in layer.params) - {"weight", "bias"}:
            return None
        assert w.fan_in is not None and w.fan_out is not None
        bias, shape = _bias(layer, w.fan_in)
        return ChainElement(
            "affine",
            layer,
            ChainLayer.affine(w.fan_in, w.fan_out, _weight_second_moment_var(w), bias, shape),
        )
    if layer.type in ACTIVATION_TYPES and not layer.params:
        return ChainElement("activation", layer, activation=ACTIVATION_TYPES[layer.type])
    if layer.type in PASS_THROUGH_TYPES and not layer.params:
        return ChainElement("pass", layer)
    return None


# --------------------------------------------------------------------------------------------
# Convolution geometry: which kernel taps land on the zero padding
# --------------------------------------------------------------------------------------------

_MAX_STRIDE = 4


def _axis_coverage(n_in: int, n_out: int, kernel: int) -> tuple[float, float] | None:
    """(forward, backward) tap fractions along one axis, for the (stride, padding) that maps
    ``n_in`` to ``n_out`` with this kernel (dilation 1, zero padding ≤ kernel // 2; the smallest
    stride, then the padding nearest to "same"). None when no such pair exists (dilation, odd
    padding modes): the caller then makes no prediction.

    An output position sums ``count`` in-range taps out of ``kernel``; the forward fraction is the
    mean of ``count/kernel`` over outputs, the backward one the taps per input position over
    ``kernel`` (with stride s, each input feeds about kernel/s outputs).
    """
    if n_in < 1 or n_out < 1 or kernel < 1:
        return None
    for stride in range(1, _MAX_STRIDE + 1):
        paddings = [
            p
            for p in range(kernel // 2 + 1)
            if (n_in + 2 * p - kernel) // stride + 1 == n_out and n_in + 2 * p >= kernel
        ]
        if not paddings:
            continue
        padding = min(paddings, key=lambda p: (abs(p - (kernel - 1) / 2), p))
        taps = 0
        for o in range(n_out):
            start = o * stride - padding
            taps += max(0, min(start + kernel, n_in) - max(start, 0))
        return taps / (n_out * kernel), taps / (n_in * kernel)
    return None


def _conv_fractions(
    in_shape: Sequence[int], out_shape: Sequence[int], weight_shape: Sequence[int]
) -> tuple[float, float] | None:
    spatial_in, spatial_out, kernel = in_shape[2:], out_shape[2:], weight_shape[2:]
    if not (len(spatial_in) == len(spatial_out) == len(kernel)):
        return None
    forward = backward = 1.0
    for n_in, n_out, k in zip(spatial_in, spatial_out, kernel):
        axis = _axis_coverage(int(n_in), int(n_out), int(k))
        if axis is None:
            return None
        forward *= axis[0]
        backward *= axis[1]
    return forward, backward


def _fits(element: ChainElement, in_shape: Sequence[int]) -> bool:
    """Can the affine ``element`` read a tensor of ``in_shape``? Sets its conv tap fractions."""
    layer = element.layer
    assert layer is not None
    w = layer.param("weight")
    assert w is not None
    out = layer.output_shape
    if not in_shape or not out or in_shape[0] != out[0]:
        return False
    if layer.type == "Linear":
        return (
            len(in_shape) == len(out) and in_shape[-1] == w.shape[1] and list(in_shape[:-1]) == list(out[:-1])
        )
    if len(in_shape) != len(out) or len(out) != len(w.shape) or len(out) < 3:
        return False
    channels = int(in_shape[1])
    if channels % w.shape[1] or out[1] % (channels // w.shape[1]):
        return False
    fractions = _conv_fractions(in_shape, out, w.shape)
    if fractions is None:
        return False
    element.forward_fraction, element.backward_fraction = fractions
    return True


def _effective(element: ChainElement) -> ChainLayer:
    """The element's chain layer with its conv tap fractions folded in.

    Forward a conv output sums ``forward_fraction·fan_in`` in-range inputs, backward an input gets
    gradient from ``backward_fraction·fan_out`` outputs: ``weight_var·forward_fraction`` carries the
    first, and ``fan_out`` is rescaled (rounded: fans of convolutions are ≥ 9·channels, so the
    rounding is below 1%) so that ``fan_out·weight_var`` carries the second.
    """
    layer = element.chain_layer
    assert layer is not None
    if layer.kind != "affine" or (element.forward_fraction == 1.0 and element.backward_fraction == 1.0):
        return layer
    f, b = element.forward_fraction, element.backward_fraction
    fan_out = max(1, round(layer.fan_out * b / f)) if f > 0 else layer.fan_out
    return ChainLayer.affine(
        layer.fan_in, fan_out, layer.weight_var * f, layer.bias_second_moment, layer.bias_distribution
    )


# --------------------------------------------------------------------------------------------
# Finding the chains
# --------------------------------------------------------------------------------------------


def _affine_output(element: ChainElement, input_second_moment: float) -> float:
    layer = _effective(element)
    return layer.fan_in * layer.weight_var * input_second_moment + layer.bias_second_moment


def _forward_tolerance(element: ChainElement, unit_spread: float = math.sqrt(2.0)) -> float:
    """The forward link check's tolerance: :data:`LINK_TOLERANCE`, widened for narrow layers up to
    :data:`NARROW_LINK_TOLERANCE`.

    A pooled second moment over ``n`` units is a mean of ``n`` per-unit terms, and once the batch
    has collapsed onto a few directions each unit is nearly one number: an affine unit's ``w_iᵀ Σ w_i``
    has relative spread up to √2 (χ² with one degree of freedom), a ReLU unit's ``relu(μ_i)²`` √5.
    Hence 3·spread/√n; the cap still refuses a residual stream (2× the branch) and identity weights
    before a ReLU (2× the theory).
    """
    assert element.layer is not None
    units = (
        element.layer.output_shape[1] if element.layer.type != "Linear" else element.layer.output_shape[-1]
    )
    return min(NARROW_LINK_TOLERANCE, max(LINK_TOLERANCE, 3.0 * unit_spread / math.sqrt(max(1, int(units)))))


def _close(predicted: float, measured: float, tolerance: float) -> bool:
    """Within a factor ``1 + tolerance`` of each other, either way."""
    if measured == 0.0 or predicted == 0.0:
        return predicted == measured
    if not (math.isfinite(predicted) and math.isfinite(measured)) or predicted < 0 or measured < 0:
        return False
    return abs(math.log(predicted / measured)) <= math.log1p(tolerance)


def _links_into_affine(
    element: ChainElement, hypothesis: float, gradient_factor: float | None = None
) -> bool:
    """Does the affine layer read what the chain hands it?

    Forward: its measured output *variance* agrees with the second moment theory predicts from an
    input of second moment ``hypothesis`` (random zero-mean weights give outputs of mean ≈ 0, so the
    two coincide; weights that pass a mean through, such as identity weights after a ReLU, do not
    form a mean-field chain). Backward,
    where ``gradient_factor`` is given (the previous element's measured output gradient second
    moment, divided by the backward factor of whatever sits between the two: ``E[φ'²]`` for a
    functional activation, else 1): the gradient it sends back, ``fan_out·Var[W]·E[g²]``, agrees
    with what arrived there. The backward check stays sharp at narrow layers (a 10-class head):
    its average runs over the wide input side.
    """
    assert element.layer is not None and element.layer.act is not None
    measured = element.layer.act.var
    if not _close(_affine_output(element, hypothesis), measured, _forward_tolerance(element)):
        return False
    gradient = _second_moment(element.layer, "grad")
    if gradient_factor is None or gradient is None:
        return True
    layer = _effective(element)
    return _close(layer.fan_out * layer.weight_var * gradient, gradient_factor, LINK_TOLERANCE)


def _derived_input(affine: ChainElement) -> float | None:
    """The input second moment that reproduces an affine layer's measured output:
    ``(E[y²] − E[b²]) / (fan_in·E[w²])`` (tap fractions included)."""
    assert affine.layer is not None
    measured = _second_moment(affine.layer, "act")
    layer = _effective(affine)
    weight_part = layer.fan_in * layer.weight_var
    if measured is None or weight_part <= 0:
        return None
    signal = measured - layer.bias_second_moment
    return signal / weight_part if signal > 0 else None


def _activation_agrees(affine: ChainElement, activation: ChainElement) -> bool:
    """Does the activation's measured output match the theory one step from the measured
    pre-activation? Mean-field theory takes pre-activations Gaussian (random weights): structured
    weights break that — identity weights (ZerO) feed a ReLU only non-negative inputs, so it keeps
    all of the variance instead of half — and the chain then stops instead of compounding 2× per layer."""
    assert activation.layer is not None and activation.chain_layer is not None
    measured = _second_moment(activation.layer, "act")
    source = _derived_input(affine)
    if measured is None:
        return False
    if source is None:  # zero weights: the pre-activation is the bias alone
        source = 0.0
    # predict_chain's forward pass alone (its check of the input included): the second element's E[y²]
    source = theory._check_variance(source, "input_second_moment")
    predicted = theory._chain_forward([_effective(affine), activation.chain_layer], source, 0.0)[0][1][0]
    return _close(predicted, measured, _forward_tolerance(affine, unit_spread=math.sqrt(5.0)))


def _last_real(chain: list[ChainElement]) -> ChainElement:
    return next(e for e in reversed(chain) if e.kind != "pass")


def _functional_activation(affine: ChainElement) -> ChainElement | None:
    """The activation the tracer saw applied (as a function) to an affine layer's output."""
    assert affine.layer is not None
    name = affine.layer.activation
    if name is None:
        return ChainElement(
            "activation", None, ChainLayer.activation_layer("identity"), activation="identity"
        )
    try:
        layer = ChainLayer.activation_layer(name, affine.layer.activation_param)
    except Exception:  # an activation the theory does not know
        return None
    return ChainElement("activation", None, layer, activation=name)


def _try_link(chain: list[ChainElement], element: ChainElement) -> list[ChainElement] | None:
    """The elements to append to ``chain`` for ``element`` (an implicit functional activation may
    come first), or None when ``element`` does not continue the chain."""
    last = chain[-1]
    assert last.layer is not None and element.layer is not None
    previous_out = last.layer.output_shape
    if element.kind == "pass":
        if last.kind == "activation" and last.layer is None:
            return None
        same_numbers = _numel_per_sample(previous_out) == _numel_per_sample(element.layer.output_shape)
        a, b = _second_moment(last.layer, "act"), _second_moment(element.layer, "act")
        same_values = a is not None and b is not None and abs(a - b) <= 1e-4 * max(a, b, 1e-300)
        return [element] if same_numbers and same_values else None
    if element.kind == "activation":
        real = _last_real(chain)
        assert real.layer is not None
        if real.kind != "affine" or element.layer.output_shape != previous_out:
            return None
        if real.layer.activation != element.activation:
            return None  # the tracer saw something else applied to the affine output first
        param = real.layer.activation_param if element.activation in _PARAMETERISED else None
        try:
            element.chain_layer = ChainLayer.activation_layer(element.activation or "", param)
        except Exception:
            return None
        return [element] if _activation_agrees(real, element) else None
    # an affine layer
    if not _fits(element, previous_out):
        return None
    measured = _second_moment(last.layer, "act")
    if measured is None:
        return None
    arrived = _second_moment(last.layer, "grad")
    if last.kind in ("activation", "pass"):
        return [element] if _links_into_affine(element, measured, arrived) else None
    implicit = _functional_activation(last)
    if implicit is None or implicit.chain_layer is None:
        return None
    activation = get_activation(implicit.chain_layer.activation, implicit.chain_layer.param)
    # One step from the measured pre-activation, modelled as N(0, E[y²]).
    moments = activation_moments(activation, measured)
    backward = (
        None
        if arrived is None or moments.derivative_second_moment <= 0
        else arrived / moments.derivative_second_moment
    )
    if not _links_into_affine(element, moments.second_moment, backward):
        return None
    return [element] if implicit.activation == "identity" else [implicit, element]


def _numel_per_sample(shape: Sequence[int]) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def find_chains(report: Report) -> list[list[ChainElement]]:
    """The plain chains of a report, each starting with an affine layer, in execution order.

    Only chains of at least two elements are returned (one affine layer alone has nothing to
    predict: both its anchors would be its own measurements).
    """
    chains: list[list[ChainElement]] = []
    current: list[ChainElement] = []

    def close() -> None:
        nonlocal current
        if len(current) >= 2:
            chains.append(current)
        current = []

    for layer in report.layers:
        element = _classify(layer)
        if element is None:
            close()
            continue
        extension = _try_link(current, element) if current else None
        if extension is not None:
            current.extend(extension)
            continue
        close()
        if element.kind == "affine":
            current = [element]
    close()
    return chains


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _chain_input(report: Report, chain: list[ChainElement]) -> tuple[float, bool] | None:
    """The second moment of the chain's input and whether it was measured: the model input when
    recorded and read directly by the chain's first layer, else derived from that layer's output."""
    first = chain[0]
    assert first.layer is not None and first.chain_layer is not None
    stats = report.meta.get(INPUT_STATS_KEY)
    if isinstance(stats, dict) and report.layers and report.layers[0] is first.layer:
        shape, second = stats.get("shape"), stats.get("second_moment")
        if (
            isinstance(second, (int, float))
            and math.isfinite(second)
            and second >= 0
            and isinstance(shape, list)
        ):
            if _fits(first, shape) and _links_into_affine(first, float(second)):
                return float(second), True
    # Derived through the first layer itself, so its tap fractions cancel.
    first.forward_fraction = first.backward_fraction = 1.0
    derived = _derived_input(first)
    return None if derived is None else (derived, False)


def _predict(report: Report, chain: list[ChainElement]) -> tuple[list[Prediction | None], bool] | None:
    """One prediction per element of ``chain`` (a pass-through element shares its input's), and
    whether the chain's input was measured rather than derived.

    The backward pass is anchored at the chain's *last affine layer*: the gradient arriving at a
    trailing activation from outside the chain may be correlated with that activation's input (a
    max-pool sends gradient only to the largest, hence active, units: ReLU then passes about all of
    it, not half), which breaks the independence the theory assumes. Elements after the anchor get
    no gradient prediction (``grad_second_moment`` NaN).
    """
    source = _chain_input(report, chain)
    if source is None:
        return None
    layers: list[ChainLayer] = []
    index: list[int] = []  # element → position in `layers`
    for element in chain:
        if element.kind != "pass":
            layers.append(_effective(element))
        index.append(len(layers) - 1)
    forward = predict_chain(layers, source[0], 1.0)
    anchor = max(i for i, e in enumerate(chain) if e.kind == "affine")
    anchor_layer = chain[anchor].layer
    assert anchor_layer is not None
    anchor_grad = _second_moment(anchor_layer, "grad")
    grads = [math.nan] * len(layers)
    if anchor_grad is not None and anchor > 0:
        # The forward run's gradients are products of per-layer factors from the chain's end, so
        # rescaling them to the anchor equals a second run anchored there (which would compute
        # every activation's moments again); that run only when the anchor's product is 0 or ∞.
        at_anchor = forward[index[anchor]].grad_second_moment
        if 0.0 < at_anchor < math.inf:
            scale = anchor_grad / at_anchor
            grads[: index[anchor] + 1] = [p.grad_second_moment * scale for p in forward[: index[anchor] + 1]]
            grads[index[anchor]] = anchor_grad  # exactly the measurement it is anchored to
        else:
            backward = predict_chain(layers[: index[anchor] + 1], source[0], anchor_grad)
            grads[: len(backward)] = [p.grad_second_moment for p in backward]
    predictions: list[Prediction | None] = []
    for position, i in enumerate(index):
        p = forward[i]
        g = grads[i] if position <= anchor else math.nan
        predictions.append(Prediction(p.act_second_moment, p.act_mean, p.act_var, g))
    return predictions, source[1]


def attach_predictions(report: Report) -> Report:
    """Set ``predicted_act_var`` and ``predicted_grad_var`` on every layer of every plain chain.

    Layers outside a chain keep None (a stale value is cleared). ``predicted_grad_var`` is the
    predicted gradient second moment (the theory's gradients have mean 0); it stays None where the
    layer recorded no gradient. ``layer.extra["prediction"]`` names the chain's first and last layer
    and whether its input was ``"measured"`` (the model input) or ``"derived"``. Returns the report.
    """
    for layer in report.layers:
        layer.predicted_act_var = None
        layer.predicted_grad_var = None
        layer.extra.pop("prediction", None)
    theory._memo = {}  # quadratures shared between linking and predicting, for this report only
    try:
        return _attach(report)
    finally:
        theory._memo = None


def _attach(report: Report) -> Report:
    try:
        chains = find_chains(report)
    except (GradprobeError, ArithmeticError, ValueError, IndexError):
        return report  # a report this module cannot read: no predictions rather than no report
    for chain in chains:
        try:
            result = _predict(report, chain)
        except (GradprobeError, ArithmeticError, ValueError):
            # Statistics the theory cannot take (overflowing, degenerate): no prediction for this
            # chain, and the probe that called us still returns its report.
            continue
        if result is None:
            continue
        predictions, measured_input = result
        first, last = chain[0].layer, chain[-1].layer
        assert first is not None and last is not None
        info = {"chain": [first.name, last.name], "input": "measured" if measured_input else "derived"}
        for element, p in zip(chain, predictions):
            if element.layer is None or p is None:
                continue
            element.layer.predicted_act_var = _finite(p.act_var)
            if element.layer.grad is not None:
                element.layer.predicted_grad_var = _finite(p.grad_second_moment)
            element.layer.extra["prediction"] = info
    return report


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
