"""Named initializers, in the style of ``torch/nn/init.py``, and the registry that names them.

Three layers, from the tensor up:

* **Tensor functions** (``zeros_``, ``normal_``, ``xavier_normal_``, ``orthogonal_``, …): in place,
  trailing underscore, return the tensor. Each random one takes an explicit CPU
  ``torch.Generator``, draws on the CPU in float32 (float64 for the QR of ``orthogonal_``) and
  ``copy_``\\ s the draw into the tensor, so the values are the same on every device and dtype: a
  bf16 parameter gets exactly the float32 draw rounded to bf16. The fan-based functions take
  ``fan_in`` and ``fan_out`` as arguments instead of guessing them from the shape.
* **fans(module, param_name)**: what fan_in and fan_out mean for each layer type (see its docstring).
  The shape alone gets grouped convolutions, transposed convolutions, packed attention projections
  and RNN gates wrong.
* **Initializer** objects (``kaiming_normal:mode=fan_out``) that initialise one module's *own*
  parameters: weights by the rule, packed weights chunk by chunk (q/k/v, RNN gates), biases 0,
  normalization layers' weight 1 and bias 0. Strings become objects at the edge,
  in :func:`resolve_initializer`, so a bad name fails at once with the valid ones listed.

:class:`InitPlan` picks an initializer per module: one default plus module-name globs.

>>> import torch
>>> layer = torch.nn.Linear(256, 128)
>>> init = resolve_initializer("kaiming_normal:nonlinearity=relu")
>>> init.init_module_(layer, gain=1.0, generator=torch.Generator().manual_seed(0))
True
>>> round(layer.weight.var().item() * 256, 1), layer.bias.abs().max().item()
(2.0, 0.0)
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from gradprobe.errors import UsageError

__all__ = [
    # tensor functions
    "zeros_",
    "constant_",
    "uniform_",
    "normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "lecun_normal_",
    "orthogonal_",
    "sparse_",
    "set_norm_scale_",
    # layer semantics
    "fans",
    # initializers and the registry
    "Initializer",
    "Keep",
    "Default",
    "Zeros",
    "Constant",
    "Uniform",
    "Normal",
    "XavierUniform",
    "XavierNormal",
    "KaimingUniform",
    "KaimingNormal",
    "LecunNormal",
    "Orthogonal",
    "Sparse",
    "INITIALIZERS",
    "ALIASES",
    "register_initializer",
    "resolve_initializer",
    "InitPlan",
]


# ============================================================================================
# Tensor functions
# ============================================================================================


def _write_(tensor: Tensor, values: Tensor) -> Tensor:
    """Copy a CPU draw into ``tensor`` (any device, any dtype) without recording a gradient."""
    with torch.no_grad():
        tensor.copy_(values.reshape(tensor.shape))
    return tensor


def _draw_normal(shape: torch.Size, mean: float, std: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=generator)


def _draw_uniform(shape: torch.Size, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(low, high, generator=generator)


def _check_fans(fan_in: int, fan_out: int) -> None:
    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"fans must be positive, got fan_in={fan_in}, fan_out={fan_out}")


def zeros_(tensor: Tensor) -> Tensor:
    r"""Fill ``tensor`` with 0.

    A zero weight matrix passes no signal forward and gives every unit of the layer below the same
    (zero) gradient: the extreme case of the symmetry that random init exists to break.
    """
    with torch.no_grad():
        return tensor.zero_()


def constant_(tensor: Tensor, value: float) -> Tensor:
    r"""Fill ``tensor`` with ``value``.

    With constant weights every unit of a layer computes the same function of its input and gets the
    same gradient, so gradient descent can never make them differ (the symmetry problem).
    """
    with torch.no_grad():
        return tensor.fill_(value)


def uniform_(tensor: Tensor, a: float, b: float, *, generator: torch.Generator) -> Tensor:
    r"""Fill ``tensor`` with draws from :math:`\mathcal{U}(a, b)`; :math:`\mathrm{Var} = (b-a)^2/12`.

    >>> w = uniform_(torch.empty(2, 3), -0.05, 0.05, generator=torch.Generator().manual_seed(0))
    >>> bool(w.abs().max() <= 0.05)
    True
    """
    if a > b:
        raise ValueError(f"uniform_ needs a <= b, got a={a}, b={b}")
    if tensor.numel() == 0:
        return tensor
    return _write_(tensor, _draw_uniform(tensor.shape, a, b, generator))


def normal_(tensor: Tensor, mean: float, std: float, *, generator: torch.Generator) -> Tensor:
    r"""Fill ``tensor`` with draws from :math:`\mathcal{N}(\text{mean}, \text{std}^2)`."""
    if std < 0:
        raise ValueError(f"normal_ needs std >= 0, got {std}")
    if tensor.numel() == 0:
        return tensor
    return _write_(tensor, _draw_normal(tensor.shape, mean, std, generator))


def xavier_uniform_(
    tensor: Tensor, fan_in: int, fan_out: int, gain: float = 1.0, *, generator: torch.Generator
) -> Tensor:
    r"""Glorot/Xavier uniform: :math:`W \sim \mathcal{U}(-c, c)`, :math:`c = \text{gain}\sqrt{6/(\text{fan\_in}+\text{fan\_out})}`,
    so :math:`\mathrm{Var}[W] = \text{gain}^2 \cdot 2/(\text{fan\_in}+\text{fan\_out})`.

    The compromise between keeping the forward variance (:math:`\text{fan\_in}\,\mathrm{Var}[W] = 1`)
    and the backward variance (:math:`\text{fan\_out}\,\mathrm{Var}[W] = 1`) for activations that are
    linear near 0. Glorot & Bengio, "Understanding the difficulty of training deep feedforward
    neural networks", AISTATS 2010.
    """
    _check_fans(fan_in, fan_out)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator=generator)


def xavier_normal_(
    tensor: Tensor, fan_in: int, fan_out: int, gain: float = 1.0, *, generator: torch.Generator
) -> Tensor:
    r"""Glorot/Xavier normal: :math:`W \sim \mathcal{N}(0, \text{gain}^2 \cdot 2/(\text{fan\_in}+\text{fan\_out}))`.

    Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks",
    AISTATS 2010.
    """
    _check_fans(fan_in, fan_out)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)


def _kaiming_fan(fan_in: int, fan_out: int, mode: str) -> int:
    _check_fans(fan_in, fan_out)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"unknown mode {mode!r}; valid: fan_in, fan_out")


def kaiming_uniform_(
    tensor: Tensor,
    fan_in: int,
    fan_out: int,
    gain: float = math.sqrt(2.0),
    *,
    mode: str = "fan_in",
    generator: torch.Generator,
) -> Tensor:
    r"""He/Kaiming uniform: :math:`W \sim \mathcal{U}(-c, c)`, :math:`c = \text{gain}\sqrt{3/\text{fan}}`,
    so :math:`\mathrm{Var}[W] = \text{gain}^2/\text{fan}`, with fan = fan_in (``mode="fan_in"``,
    keeps the forward variance) or fan_out (``mode="fan_out"``, keeps the backward variance).
    ``gain`` = √2 for ReLU.

    He, Zhang, Ren & Sun, "Delving Deep into Rectifiers", ICCV 2015.
    """
    fan = _kaiming_fan(fan_in, fan_out, mode)
    bound = gain * math.sqrt(3.0 / fan)
    return uniform_(tensor, -bound, bound, generator=generator)


def kaiming_normal_(
    tensor: Tensor,
    fan_in: int,
    fan_out: int,
    gain: float = math.sqrt(2.0),
    *,
    mode: str = "fan_in",
    generator: torch.Generator,
) -> Tensor:
    r"""He/Kaiming normal: :math:`W \sim \mathcal{N}(0, \text{gain}^2/\text{fan})`, fan = fan_in or
    fan_out by ``mode``; ``gain`` = √2 for ReLU.

    He, Zhang, Ren & Sun, "Delving Deep into Rectifiers", ICCV 2015.

    >>> w = kaiming_normal_(torch.empty(512, 512), 512, 512, generator=torch.Generator().manual_seed(0))
    >>> round(w.var().item() * 512, 1)
    2.0
    """
    fan = _kaiming_fan(fan_in, fan_out, mode)
    return normal_(tensor, 0.0, gain / math.sqrt(fan), generator=generator)


def lecun_normal_(tensor: Tensor, fan_in: int, gain: float = 1.0, *, generator: torch.Generator) -> Tensor:
    r"""LeCun normal: :math:`W \sim \mathcal{N}(0, \text{gain}^2/\text{fan\_in})`.

    With gain 1 this is the init under which SELU networks self-normalise (fixed point
    :math:`q^* = 1`); ``calculate_gain('selu')`` = 3/4 does not give it. LeCun, Bottou, Orr & Müller,
    "Efficient BackProp", 1998; Klambauer, Unterthiner, Mayr & Hochreiter, "Self-Normalizing Neural
    Networks", NeurIPS 2017.
    """
    _check_fans(fan_in, 1)
    return normal_(tensor, 0.0, gain / math.sqrt(fan_in), generator=generator)


def orthogonal_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator) -> Tensor:
    r"""A (semi-)orthogonal matrix scaled by ``gain``, drawn uniformly (Haar measure).

    ``tensor`` is viewed as a matrix (rows, rest) with rows = ``tensor.shape[0]``. For a tall matrix
    :math:`W^\top W = \text{gain}^2 I`, for a wide one :math:`W W^\top = \text{gain}^2 I`. Drawn as the
    Q of the QR decomposition of a Gaussian matrix (in float64), with each column of Q multiplied by
    the sign of the matching diagonal entry of R: without that correction Q is orthogonal but not
    Haar-distributed (Mezzadri, "How to generate random matrices from the classical compact groups",
    2007). Saxe, McClelland & Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep
    linear neural networks", ICLR 2014.
    """
    if tensor.dim() < 2:
        raise ValueError(
            f"orthogonal_ needs a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}"
        )
    if tensor.numel() == 0:
        return tensor
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    gaussian = torch.empty((rows, cols), dtype=torch.float64).normal_(0.0, 1.0, generator=generator)
    wide = rows < cols
    if wide:
        gaussian = gaussian.T
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs
    if wide:
        q = q.T
    return _write_(tensor, gain * q)


def _zeros_per_column(sparsity: float, rows: int) -> int:
    # round first: 0.07 * 100 is 7.000000000000001 in floating point, and its ceiling is 8, not 7
    return min(rows, math.ceil(round(sparsity * rows, 9)))


def sparse_(tensor: Tensor, sparsity: float, std: float = 0.01, *, generator: torch.Generator) -> Tensor:
    r"""Sparse init: in each column, ⌈sparsity · rows⌉ entries are 0, the others :math:`\mathcal{N}(0, \text{std}^2)`.

    ``tensor`` is viewed as a matrix (rows, rest) with rows = ``tensor.shape[0]`` (the output units),
    so it works for N-D weights (convolutions) too, unlike ``torch.nn.init.sparse_``; a column holds
    the weights that one input feeds to all outputs. Martens, "Deep learning via Hessian-free
    optimization", ICML 2010.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparse_ needs 0 <= sparsity <= 1, got {sparsity}")
    if std < 0:
        raise ValueError(f"sparse_ needs std >= 0, got {std}")
    if tensor.dim() < 1 or tensor.numel() == 0:
        return tensor
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    values = _draw_normal(torch.Size((rows, cols)), 0.0, std, generator)
    zeros = _zeros_per_column(sparsity, rows)
    if zeros:
        # a random permutation of the rows of each column; its first `zeros` entries become 0
        order = torch.rand((rows, cols), generator=generator).argsort(dim=0)
        values.scatter_(0, order[:zeros], 0.0)
    return _write_(tensor, values)


# ============================================================================================
# What fan_in and fan_out mean, layer by layer
# ============================================================================================


@dataclass(frozen=True)
class _Role:
    """What an initializer does with one of a module's own parameters."""

    kind: Literal["weight", "zero", "one"]  # weight: by the rule; zero/one: fixed, under every rule
    fan_in: int = 0  # per chunk
    fan_out: int = 0  # per chunk
    chunks: int = 1  # packed weights (q/k/v, RNN gates) split along dim 0 into this many blocks


_ZERO = _Role("zero")
_ONE = _Role("one")

_Layout = dict[str, _Role]


def _linear_layout(m: nn.Module) -> _Layout:
    assert isinstance(m, nn.Linear)
    return {"weight": _Role("weight", m.in_features, m.out_features), "bias": _ZERO}


def _bilinear_layout(m: nn.Module) -> _Layout:
    # y_k = Σ_ij x1_i W_kij x2_j is a Linear map from the outer product x1 ⊗ x2 (in1·in2 inputs)
    assert isinstance(m, nn.Bilinear)
    return {"weight": _Role("weight", m.in1_features * m.in2_features, m.out_features), "bias": _ZERO}


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _conv_layout(m: nn.Module) -> _Layout:
    # Conv weight (out, in/groups, *k) and ConvTranspose weight (in, out/groups, *k) have the same
    # fans in channel terms: each output sums (in/groups)·prod(k) inputs, each input feeds
    # (out/groups)·prod(k) outputs. Transposed: stride ignored (see `fans`).
    assert isinstance(m, _CONVS)
    taps = math.prod(m.kernel_size)
    fan_in = m.in_channels // m.groups * taps
    fan_out = m.out_channels // m.groups * taps
    return {"weight": _Role("weight", fan_in, fan_out), "bias": _ZERO}


def _embedding_layout(m: nn.Module) -> _Layout:
    # one active input per lookup (a one-hot row): fan_in = fan_out = 1, so gain 1 gives Var 1
    return {"weight": _Role("weight", 1, 1)}


def _attention_layout(m: nn.Module) -> _Layout:
    assert isinstance(m, nn.MultiheadAttention)
    e = m.embed_dim
    return {
        "in_proj_weight": _Role("weight", e, e, chunks=3),  # packed (3E, E): q, k, v
        "q_proj_weight": _Role("weight", e, e),
        "k_proj_weight": _Role("weight", m.kdim, e),
        "v_proj_weight": _Role("weight", m.vdim, e),
        "in_proj_bias": _ZERO,
        "bias_k": _ZERO,
        "bias_v": _ZERO,
    }


_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_RNN_PARAM = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?")


def _rnn_layout(m: nn.Module) -> _Layout:
    assert isinstance(m, nn.RNNBase)
    gates = _RNN_GATES[m.mode]
    hidden = m.hidden_size
    state = m.proj_size or hidden  # width of h: what weight_hh reads and the next layer receives
    directions = 2 if m.bidirectional else 1
    layout: _Layout = {}
    for name, _ in m.named_parameters(recurse=False):
        match = _RNN_PARAM.fullmatch(name)
        if match is None:
            continue
        kind, which, layer = match.group(1), match.group(2), int(match.group(3))
        if kind == "bias":
            layout[name] = _ZERO
        elif which == "ih":
            width = m.input_size if layer == 0 else state * directions
            layout[name] = _Role("weight", width, hidden, chunks=gates)
        elif which == "hh":
            layout[name] = _Role("weight", state, hidden, chunks=gates)
        else:  # hr: the LSTM projection (proj_size, hidden)
            layout[name] = _Role("weight", hidden, m.proj_size)
    return layout


def _cell_layout(m: nn.Module) -> _Layout:
    assert isinstance(m, nn.RNNCellBase)
    gates = 4 if isinstance(m, nn.LSTMCell) else 3 if isinstance(m, nn.GRUCell) else 1
    return {
        "weight_ih": _Role("weight", m.input_size, m.hidden_size, chunks=gates),
        "weight_hh": _Role("weight", m.hidden_size, m.hidden_size, chunks=gates),
        "bias_ih": _ZERO,
        "bias_hh": _ZERO,
    }


def _norm_layout(m: nn.Module) -> _Layout:
    return {"weight": _ONE, "bias": _ZERO}


_NORMS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name)
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",  # torch >= 2.4
    )
    if hasattr(nn, name)
)

# module types → their parameter layout; the first matching entry wins
_LAYOUTS: list[tuple[tuple[type[nn.Module], ...], Callable[[nn.Module], _Layout]]] = [
    ((nn.Linear,), _linear_layout),
    ((nn.Bilinear,), _bilinear_layout),
    (_CONVS, _conv_layout),
    ((nn.Embedding, nn.EmbeddingBag), _embedding_layout),
    ((nn.MultiheadAttention,), _attention_layout),
    ((nn.RNNBase,), _rnn_layout),
    ((nn.RNNCellBase,), _cell_layout),
    (_NORMS, _norm_layout),
]


def _layout(module: nn.Module) -> _Layout | None:
    for types, layout in _LAYOUTS:
        if isinstance(module, types):
            return layout(module)
    return None


def fans(module: nn.Module, param_name: str) -> tuple[int, int]:
    r"""``(fan_in, fan_out)`` of one of ``module``'s own weight parameters, per chunk for packed weights.

    fan_in is how many inputs each output unit sums, fan_out how many output units each input unit
    feeds. The semantics by layer type:

    * **Linear** ``weight`` (out, in): (in, out). **Bilinear** (out, in1, in2): (in1·in2, out), a
      Linear map from the outer product of the two inputs.
    * **Conv1d/2d/3d** ``weight`` (out, in/groups, \*k): fan_in = (in/groups)·prod(k),
      fan_out = (out/groups)·prod(k). PyTorch's shape-based ``_calculate_fan_in_and_fan_out`` gives
      out·prod(k) for fan_out, not dividing by groups; but each input channel belongs to one group
      and feeds only that group's out/groups channels, so the per-group value is the one that keeps
      the backward variance (a depthwise conv has fan_out = (out/in)·prod(k), not out·prod(k)).
    * **ConvTranspose1d/2d/3d** ``weight`` (in, out/groups, \*k): the same formula,
      fan_in = (in/groups)·prod(k), fan_out = (out/groups)·prod(k), which is the *reverse* of what
      the shape-based computation gives (it reads dim 1 as the input dim). Stride is ignored, as
      in PyTorch and Keras: with stride s an output actually sums about fan_in/prod(s) inputs.
    * **Embedding/EmbeddingBag** ``weight``: (1, 1). A lookup is a Linear map from a one-hot input,
      so one input is active per output; variance-preserving inits then give Var 1 (gain²), which
      is PyTorch's own N(0, 1) default.
    * **MultiheadAttention** packed ``in_proj_weight`` (3E, E): per chunk (q, k, v each E×E):
      (E, E). Separate ``q_proj_weight``: (E, E); ``k_proj_weight``: (kdim, E);
      ``v_proj_weight``: (vdim, E). ``out_proj`` is a child Linear.
    * **RNN/LSTM/GRU** ``weight_ih_l{k}[_reverse]`` and ``weight_hh_l{k}[_reverse]`` per gate chunk
      (LSTM 4, GRU 3, RNN 1 chunks of hidden_size rows): fan_in = the width the layer reads
      (``weight_ih``: input_size for layer 0, else num_directions·(proj_size or hidden_size);
      ``weight_hh``: proj_size or hidden_size), fan_out = hidden_size. LSTM ``weight_hr_l{k}``
      (proj_size, hidden_size): (hidden_size, proj_size).
    * **RNNCell/LSTMCell/GRUCell** ``weight_ih``: (input_size, hidden_size), ``weight_hh``:
      (hidden_size, hidden_size), per gate chunk.

    Raises :class:`~gradprobe.errors.UsageError` for other module types and for parameters that are
    not weights (biases, normalization parameters).

    >>> fans(torch.nn.Conv2d(16, 32, 3, groups=4), "weight")
    (36, 72)
    >>> fans(torch.nn.LSTM(10, 20, num_layers=2, bidirectional=True), "weight_ih_l1_reverse")
    (40, 20)
    """
    layout = _layout(module)
    if layout is None:
        raise UsageError(f"no fan rule for module type {type(module).__name__}")
    found = _weight_fans(module, layout)
    if param_name not in found:
        raise UsageError(
            f"no fans for parameter {param_name!r} of {type(module).__name__}; "
            f"valid: {', '.join(found) or '(none: this module has no weight parameters)'}"
        )
    return found[param_name]


def weight_fans(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (fan_in, fan_out)}`` for each of ``module``'s own weight parameters that
    :func:`fans` knows (empty for other module types): one lookup per module, no exceptions, for
    reports with hundreds of layers."""
    layout = _layout(module)
    return {} if layout is None else _weight_fans(module, layout)


def _weight_fans(module: nn.Module, layout: _Layout) -> dict[str, tuple[int, int]]:
    own = module._parameters
    return {
        name: (role.fan_in, role.fan_out)
        for name, role in layout.items()
        if role.kind == "weight" and own.get(name) is not None
    }


def set_norm_scale_(module: nn.Module, scale: float) -> bool:
    """Set a normalization layer's per-channel scale (its ``weight``) to ``scale`` in place; return
    whether ``module`` is one with a scale (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm
    with ``elementwise_affine``/``affine``)."""
    weight = module._parameters.get("weight") if isinstance(module, _NORMS) else None
    if weight is None:
        return False
    with torch.no_grad():
        constant_(weight, scale)
    return True


def _chunks(param: Tensor, count: int) -> tuple[Tensor, ...]:
    """Views of ``param`` split along dim 0 into ``count`` equal blocks (gates, q/k/v)."""
    if param.shape[0] % count:
        raise ValueError(f"cannot split a parameter of shape {tuple(param.shape)} into {count} chunks")
    return param.split(param.shape[0] // count, dim=0)


def _zero_padding_row(module: nn.Module) -> None:
    padding_idx = getattr(module, "padding_idx", None)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and padding_idx is not None:
        module.weight[padding_idx].zero_()


# ============================================================================================
# Initializers
# ============================================================================================

_AUTO = "auto"

# names torch.nn.init.calculate_gain knows; `selu` is overridden to 1 (REFERENCE #11)
_GAIN_NAMES = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
)


def _option_error(owner: str, key: str, value: object, expected: str) -> UsageError:
    return UsageError(f"bad value for {owner}:{key}: {value!r}; expected {expected}")


def _float_option(owner: str, key: str, value: object, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _option_error(owner, key, value, "a finite number")
    if low is not None and value < low:
        raise _option_error(owner, key, value, f"a number >= {low:g}")
    return float(value)


def _gain_option(owner: str, value: object) -> float | str:
    if value == _AUTO:
        return _AUTO
    if isinstance(value, str):
        raise _option_error(owner, "gain", value, "a number >= 0 or auto (the caller's gain)")
    return _float_option(owner, "gain", value, low=0.0)


def _choice_option(owner: str, key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"unknown {key} {value!r} for {owner}; valid: {', '.join(choices)}")
    return str(value)


def _format_value(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class Initializer:
    """A named rule that initialises the own parameters of one module.

    Subclasses are frozen dataclasses whose fields are the options of the spec string
    (``"normal:std=0.02"`` → ``Normal(std=0.02)``) and implement :meth:`init_weight_` for one weight
    (or one chunk of a packed weight). The base class knows the layer types:

    * weights (Linear, Bilinear, Conv/ConvTranspose 1-3d, Embedding/EmbeddingBag, MultiheadAttention
      projections, RNN/LSTM/GRU and their cells) get the rule with the fans of :func:`fans`; packed
      weights (q/k/v, RNN gates) get it once per chunk, so each gate is e.g. orthogonal on its own;
    * every bias of those layers (also MHA ``in_proj_bias``, ``bias_k``, ``bias_v``) is set to 0;
    * the ``padding_idx`` row of an embedding stays 0;
    * normalization layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm) get weight 1
      and bias 0 under every initializer: their weight is a per-channel scale that starts at the
      identity, not a weight matrix with fans. When an override names the layer, the probe then
      sets that scale with :func:`set_norm_scale_` to the rule's :meth:`norm_scale`, where it has
      one: ``zeros`` gives weight 0 (the zero-γ residual recipe), ``constant:value=v`` weight v;
    * a module with a parameter the rules do not know (a custom module, a subclass with an extra
      parameter, weight-norm's ``weight_g``/``weight_v``, a lazy module not yet materialised) is
      left exactly as built and :meth:`init_module_` returns False, so the caller can report it.

    ``gain`` passed to :meth:`init_module_` is the caller's gain for the activation that follows
    the module (the probe derives it at run time); rules with ``gain=auto`` use it, rules with a
    number ignore it.
    """

    name: ClassVar[str] = ""  # the registry key and the spec name
    summary: ClassVar[str] = ""  # one line for `gradprobe inits`
    formula: ClassVar[str] = ""  # one line, e.g. "W ~ N(0, std²)"
    aliases: ClassVar[tuple[str, ...]] = ()  # other spec names for the same rule

    def init_module_(self, module: nn.Module, *, gain: float, generator: torch.Generator) -> bool:
        """Initialise ``module``'s own parameters in place; return whether this module type was handled.

        A module without own parameters is trivially handled (True).
        """
        params = list(module.named_parameters(recurse=False))
        if not params:
            return True
        layout = _layout(module)
        if layout is None or any(
            name not in layout or isinstance(p, nn.parameter.UninitializedParameter) for name, p in params
        ):
            return False
        with torch.no_grad():
            for name, param in params:
                role = layout[name]
                if role.kind == "zero":
                    zeros_(param)
                elif role.kind == "one":
                    constant_(param, 1.0)
                else:
                    for chunk in _chunks(param, role.chunks):
                        self.init_weight_(chunk, role.fan_in, role.fan_out, gain=gain, generator=generator)
            _zero_padding_row(module)
        return True

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        """Initialise one weight (or one chunk of a packed weight) in place and return it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement init_weight_")

    def norm_scale(self) -> float | None:
        """The scale a normalization layer gets when an override names it with this rule, or None
        (the identity scale 1). Only rules whose meaning carries over to a per-channel scale have one."""
        return None

    @property
    def uses_caller_gain(self) -> bool:
        """Whether the ``gain`` passed to :meth:`init_module_` changes the result (``gain=auto``)."""
        return False

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, in field order."""
        changed: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                changed[f.name] = value
        return changed

    def describe(self) -> str:
        """The name and the options that differ from their defaults: ``"normal(std=0.02)"``."""
        options = self.options()
        if not options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_format_value(v)}' for k, v in options.items())})"

    def spec(self) -> str:
        """A string :func:`resolve_initializer` turns back into an equal initializer: ``"normal:std=0.02"``."""
        options = self.options()
        if not options:
            return self.name
        return f"{self.name}:{','.join(f'{k}={_format_value(v)}' for k, v in options.items())}"


INITIALIZERS: dict[str, type[Initializer]] = {}
"""Registry: spec name → Initializer class, in registration order (the order ``gradprobe inits``
lists them): keep, default, zeros, constant, uniform, normal, xavier_uniform, xavier_normal,
kaiming_uniform, kaiming_normal, lecun_normal, orthogonal, sparse, then later registrations."""

ALIASES: dict[str, str] = {}
"""Other spec names → registry name (``he_normal`` → ``kaiming_normal``)."""

_I = TypeVar("_I", bound=type[Initializer])


def register_initializer(cls: _I) -> _I:
    """Add an :class:`Initializer` subclass to :data:`INITIALIZERS` under ``cls.name`` (and its
    ``aliases``); usable as a class decorator. Registering a different class under a taken name
    raises ValueError."""
    if not (isinstance(cls, type) and issubclass(cls, Initializer)):
        raise TypeError(f"register_initializer expects an Initializer subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a (frozen) dataclass: its fields are the spec options")
    names = (cls.name, *cls.aliases)
    if not cls.name or any(not re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names):
        raise ValueError(f"{cls.__name__}: names must be lower-case identifiers, got {names}")
    for n in names:
        taken = INITIALIZERS.get(n) or INITIALIZERS.get(ALIASES.get(n, ""))
        if taken is not None and taken is not cls:
            raise ValueError(f"initializer name {n!r} is already taken by {taken.__name__}")
    INITIALIZERS[cls.name] = cls
    for alias in cls.aliases:
        ALIASES[alias] = cls.name
    return cls


@register_initializer
@dataclass(frozen=True)
class Keep(Initializer):
    """Leave every parameter as built (the model's own init, or its trained weights)."""

    name: ClassVar[str] = "keep"
    summary: ClassVar[str] = "leave the parameters as built (the model's own init)"
    formula: ClassVar[str] = "W unchanged"

    def init_module_(self, module: nn.Module, *, gain: float, generator: torch.Generator) -> bool:
        return True


@register_initializer
@dataclass(frozen=True)
class Default(Initializer):
    """Re-run each module's own ``reset_parameters()`` (PyTorch's default init for that layer).

    ``reset_parameters`` draws from the *global* torch RNG, not from ``generator``: the caller seeds
    it (the probe seeds it from its own seed first, see gradprobe.rng, and restores the global state
    afterwards).
    MultiheadAttention has only the private ``_reset_parameters``, which is called instead; it also
    zeroes its child ``out_proj.bias``, which ``out_proj``'s own ``reset_parameters`` redraws when
    that module is visited. Returns False for a module without own parameters or without such a
    method (its parameters stay as built).
    """

    name: ClassVar[str] = "default"
    summary: ClassVar[str] = "each module's own reset_parameters() (PyTorch's default, global RNG)"
    formula: ClassVar[str] = "Linear/Conv: W, b ~ U(±1/√fan_in); per layer type"

    def init_module_(self, module: nn.Module, *, gain: float, generator: torch.Generator) -> bool:
        if not any(True for _ in module.parameters(recurse=False)):
            return False
        reset = getattr(module, "reset_parameters", None)
        if reset is None and isinstance(module, nn.MultiheadAttention):
            reset = module._reset_parameters
        if not callable(reset):
            return False
        with torch.no_grad():
            reset()
        return True


@register_initializer
@dataclass(frozen=True)
class Zeros(Initializer):
    """All weights 0: no signal forward, no gradient to the layers below."""

    name: ClassVar[str] = "zeros"
    summary: ClassVar[str] = "all weights 0 (no signal, no gradient below: a symmetry trap)"
    formula: ClassVar[str] = "W = 0"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return zeros_(weight)

    def norm_scale(self) -> float | None:
        return 0.0


@register_initializer
@dataclass(frozen=True)
class Constant(Initializer):
    """Every weight ``value``, every bias 0.

    Biases stay 0 (not ``value``) on purpose: constant weights alone already make all units of a
    layer identical, and the lesson this initializer demonstrates is that symmetry, not the scale.
    """

    value: float = 0.1  # every weight entry

    name: ClassVar[str] = "constant"
    summary: ClassVar[str] = "all weights one value, biases 0 (every unit identical: a symmetry trap)"
    formula: ClassVar[str] = "W = value, b = 0"

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _float_option(self.name, "value", self.value))

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return constant_(weight, self.value)

    def norm_scale(self) -> float | None:
        return self.value


@register_initializer
@dataclass(frozen=True)
class Uniform(Initializer):
    """Small uniform noise, independent of the fans (Keras's ``RandomUniform`` range by default)."""

    a: float = -0.05  # lower bound
    b: float = 0.05  # upper bound

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "small uniform noise, the same for every layer width"
    formula: ClassVar[str] = "W ~ U(a, b)"

    def __post_init__(self) -> None:
        a = _float_option(self.name, "a", self.a)
        b = _float_option(self.name, "b", self.b)
        if a > b:
            raise _option_error(self.name, "b", b, f"a number >= a = {a:g}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return uniform_(weight, self.a, self.b, generator=generator)


@register_initializer
@dataclass(frozen=True)
class Normal(Initializer):
    """Small Gaussian noise, independent of the fans (too small for deep nets at std 0.01)."""

    mean: float = 0.0  # mean of every weight
    std: float = 0.01  # standard deviation, the same for every layer width

    name: ClassVar[str] = "normal"
    summary: ClassVar[str] = "small Gaussian noise, the same for every layer width"
    formula: ClassVar[str] = "W ~ N(mean, std²)"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _float_option(self.name, "mean", self.mean))
        object.__setattr__(self, "std", _float_option(self.name, "std", self.std, low=0.0))

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return normal_(weight, self.mean, self.std, generator=generator)


@dataclass(frozen=True)
class _GainInitializer(Initializer):
    """An initializer with a ``gain`` option: a number, or ``auto`` for the caller's gain."""

    gain: float | str = 1.0  # scale of the weights; "auto": the gain of the activation that follows

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _gain_option(self.name, self.gain))

    @property
    def uses_caller_gain(self) -> bool:
        return self.gain == _AUTO

    def _gain(self, caller_gain: float) -> float:
        return caller_gain if self.gain == _AUTO else float(self.gain)


@register_initializer
@dataclass(frozen=True)
class XavierUniform(_GainInitializer):
    """Glorot & Bengio (2010), uniform; gain 1 as in the paper, ``gain=auto`` for the caller's."""

    name: ClassVar[str] = "xavier_uniform"
    aliases: ClassVar[tuple[str, ...]] = ("glorot_uniform",)
    summary: ClassVar[str] = "Glorot/Xavier: balances forward and backward variance (tanh, linear)"
    formula: ClassVar[str] = "W ~ U(±gain·√(6/(fan_in+fan_out)))"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return xavier_uniform_(weight, fan_in, fan_out, self._gain(gain), generator=generator)


@register_initializer
@dataclass(frozen=True)
class XavierNormal(_GainInitializer):
    """Glorot & Bengio (2010), normal; gain 1 as in the paper, ``gain=auto`` for the caller's."""

    name: ClassVar[str] = "xavier_normal"
    aliases: ClassVar[tuple[str, ...]] = ("glorot_normal",)
    summary: ClassVar[str] = "Glorot/Xavier: balances forward and backward variance (tanh, linear)"
    formula: ClassVar[str] = "W ~ N(0, gain²·2/(fan_in+fan_out))"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return xavier_normal_(weight, fan_in, fan_out, self._gain(gain), generator=generator)


@dataclass(frozen=True)
class _Kaiming(Initializer):
    """He et al. (2015): Var[W] = gain²/fan.

    ``nonlinearity=auto`` (default) uses the caller's gain, i.e. the gain of the activation that
    follows the layer; a name uses ``torch.nn.init.calculate_gain(name, a)``, except ``selu`` → 1
    (LeCun normal, the self-normalising init; ``calculate_gain`` says 3/4). ``a`` is the negative
    slope of ``leaky_relu`` and only valid with it.
    """

    mode: str = "fan_in"  # fan_in keeps the forward variance, fan_out the backward variance
    nonlinearity: str = _AUTO  # auto: the caller's gain; else a calculate_gain name
    a: float = 0.0  # negative slope, nonlinearity=leaky_relu only

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _choice_option(self.name, "mode", self.mode, ("fan_in", "fan_out")))
        nonlinearity = _choice_option(self.name, "nonlinearity", self.nonlinearity, (_AUTO, *_GAIN_NAMES))
        object.__setattr__(self, "nonlinearity", nonlinearity)
        a = _float_option(self.name, "a", self.a, low=0.0)
        if a != 0.0 and nonlinearity != "leaky_relu":
            raise _option_error(
                self.name, "a", a, "0 unless nonlinearity=leaky_relu (a is its negative slope)"
            )
        object.__setattr__(self, "a", a)

    @property
    def uses_caller_gain(self) -> bool:
        return self.nonlinearity == _AUTO

    def _gain(self, caller_gain: float) -> float:
        if self.nonlinearity == _AUTO:
            return caller_gain
        if self.nonlinearity == "selu":
            return 1.0
        return nn.init.calculate_gain(self.nonlinearity, self.a)  # type: ignore[arg-type]


@register_initializer
@dataclass(frozen=True)
class KaimingUniform(_Kaiming):
    """He et al. (2015), uniform: Var[W] = gain²/fan (see the options of :class:`_Kaiming`)."""

    name: ClassVar[str] = "kaiming_uniform"
    aliases: ClassVar[tuple[str, ...]] = ("he_uniform",)
    summary: ClassVar[str] = "He/Kaiming: keeps the variance through ReLU-like layers (gain √2 for ReLU)"
    formula: ClassVar[str] = "W ~ U(±gain·√(3/fan)), fan = fan_in or fan_out"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return kaiming_uniform_(
            weight, fan_in, fan_out, self._gain(gain), mode=self.mode, generator=generator
        )


@register_initializer
@dataclass(frozen=True)
class KaimingNormal(_Kaiming):
    """He et al. (2015), normal: Var[W] = gain²/fan (see the options of :class:`_Kaiming`)."""

    name: ClassVar[str] = "kaiming_normal"
    aliases: ClassVar[tuple[str, ...]] = ("he_normal",)
    summary: ClassVar[str] = "He/Kaiming: keeps the variance through ReLU-like layers (gain √2 for ReLU)"
    formula: ClassVar[str] = "W ~ N(0, gain²/fan), fan = fan_in or fan_out"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return kaiming_normal_(weight, fan_in, fan_out, self._gain(gain), mode=self.mode, generator=generator)


@register_initializer
@dataclass(frozen=True)
class LecunNormal(_GainInitializer):
    """LeCun et al. (1998), Klambauer et al. (2017): Var[W] = gain²/fan_in, gain 1 for SELU."""

    name: ClassVar[str] = "lecun_normal"
    summary: ClassVar[str] = "LeCun: Var = 1/fan_in, the self-normalising init for SELU"
    formula: ClassVar[str] = "W ~ N(0, gain²/fan_in)"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return lecun_normal_(weight, fan_in, self._gain(gain), generator=generator)


@register_initializer
@dataclass(frozen=True)
class Orthogonal(_GainInitializer):
    """Saxe et al. (2014): a Haar-random (semi-)orthogonal matrix times gain, per gate chunk."""

    name: ClassVar[str] = "orthogonal"
    summary: ClassVar[str] = "random orthogonal matrix: all singular values = gain (dynamical isometry)"
    formula: ClassVar[str] = "W = gain·Q, QᵀQ = I (Q from QR of a Gaussian matrix)"

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return orthogonal_(weight, self._gain(gain), generator=generator)


@register_initializer
@dataclass(frozen=True)
class Sparse(Initializer):
    """Martens (2010): in each column a fraction ``sparsity`` of the weights 0, the rest N(0, std²)."""

    sparsity: float = 0.1  # fraction of each column set to 0
    std: float = 0.01  # standard deviation of the weights that are not 0

    name: ClassVar[str] = "sparse"
    summary: ClassVar[str] = "a fraction of each column 0, the rest small Gaussian noise"
    formula: ClassVar[str] = "W_ij = 0 for ⌈sparsity·rows⌉ i per column j, else N(0, std²)"

    def __post_init__(self) -> None:
        sparsity = _float_option(self.name, "sparsity", self.sparsity, low=0.0)
        if sparsity > 1.0:
            raise _option_error(self.name, "sparsity", sparsity, "a fraction between 0 and 1")
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "std", _float_option(self.name, "std", self.std, low=0.0))

    def init_weight_(
        self, weight: Tensor, fan_in: int, fan_out: int, *, gain: float, generator: torch.Generator
    ) -> Tensor:
        return sparse_(weight, self.sparsity, self.std, generator=generator)


# ============================================================================================
# Parsing at the edge
# ============================================================================================


def _valid_names() -> str:
    names = ", ".join(INITIALIZERS)
    return f"{names} (aliases: {', '.join(ALIASES)})" if ALIASES else names


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: mode=fan_out, gain=auto


def resolve_initializer(spec: str | Initializer) -> Initializer:
    """An :class:`Initializer` from ``"name"``, ``"name:key=value,key=value"`` or an instance.

    Values are read as Python literals (``std=2e-2``, ``gain=1``), falling back to the bare word
    (``mode=fan_out``, ``gain=auto``). Raises :class:`~gradprobe.errors.UsageError` naming the bad
    name, option or value and listing the valid ones.

    >>> resolve_initializer("he_normal:mode=fan_out").describe()
    'kaiming_normal(mode=fan_out)'
    >>> resolve_initializer("normal:std=0.02")
    Normal(mean=0.0, std=0.02)
    """
    if isinstance(spec, Initializer):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"an initializer is a name like 'kaiming_normal' or an Initializer, got {spec!r}")
    head, _, tail = spec.partition(":")
    name = head.strip().lower()
    cls = INITIALIZERS.get(ALIASES.get(name, name))
    if cls is None:
        raise UsageError(f"unknown initializer {name!r}; valid: {_valid_names()}")
    fields = [f.name for f in dataclasses.fields(cls)]
    options: dict[str, Any] = {}
    for item in (part.strip() for part in tail.split(",")) if tail.strip() else ():
        key, equals, raw = (s.strip() for s in item.partition("="))
        if not equals or not key:
            raise UsageError(f"malformed option {item!r} in {spec!r}; expected key=value")
        if key not in fields:
            valid = ", ".join(fields) or "(none: it takes no options)"
            raise UsageError(f"unknown option {key!r} for {cls.name}; valid: {valid}")
        if key in options:
            raise UsageError(f"option {key!r} given twice in {spec!r}")
        options[key] = _parse_value(raw)
    return cls(**options)


# ============================================================================================
# A plan: one initializer per module
# ============================================================================================


@dataclass(frozen=True)
class InitPlan:
    """Which initializer each module gets: ``default``, unless a glob in ``overrides`` matches.

    Globs are matched with :func:`fnmatch.fnmatchcase` against the module's qualified name from
    ``named_modules()`` (``"head"``, ``"layers.3.fc2"``); ``*`` also matches dots, so
    ``"layers.*"`` covers every module below ``layers``. The first matching glob wins, in the order
    the overrides were given, so put specific globs before general ones.

    >>> plan = InitPlan.from_spec("kaiming_normal", {"head": "zeros", "layers.*.fc2": "normal:std=0.02"})
    >>> plan.for_module("layers.0.fc2").describe(), plan.for_module("layers.0.fc1").describe()
    ('normal(std=0.02)', 'kaiming_normal')
    """

    default: Initializer = dataclasses.field(default_factory=Keep)  # for modules no glob matches
    overrides: tuple[tuple[str, Initializer], ...] = ()  # (glob, initializer), first match wins

    @classmethod
    def from_spec(
        cls,
        init: str | Initializer | InitPlan,
        overrides: Mapping[str, str | Initializer] | None = None,
    ) -> InitPlan:
        """Resolve ``init`` and every override spec now, so a bad one fails before any work."""
        if isinstance(init, InitPlan):
            if overrides:
                return cls(init.default, (*cls._resolve_overrides(overrides), *init.overrides))
            return init
        return cls(resolve_initializer(init), cls._resolve_overrides(overrides or {}))

    @staticmethod
    def _resolve_overrides(overrides: Mapping[str, str | Initializer]) -> tuple[tuple[str, Initializer], ...]:
        resolved = []
        for glob, spec in overrides.items():
            if not isinstance(glob, str) or not glob:
                raise UsageError(
                    f"an override needs a module-name glob like 'head' or 'layers.*.fc2', got {glob!r}"
                )
            resolved.append((glob, resolve_initializer(spec)))
        return tuple(resolved)

    def for_module(self, name: str) -> Initializer:
        """The initializer for the module with qualified name ``name`` (first matching glob wins)."""
        return self.match(name)[0]

    def match(self, name: str) -> tuple[Initializer, bool]:
        """``(initializer, explicit)``: the module's initializer, and whether an override glob chose
        it (rather than the default)."""
        for glob, initializer in self.overrides:
            if fnmatch.fnmatchcase(name, glob):
                return initializer, True
        return self.default, False

    @property
    def is_keep(self) -> bool:
        """True when no module gets anything but ``keep`` (the parameters are never written)."""
        return isinstance(self.default, Keep) and all(isinstance(i, Keep) for _, i in self.overrides)

    def describe(self) -> str:
        """``"kaiming_normal; head=zeros; layers.*.fc2=normal(std=0.02)"``."""
        return "; ".join([self.default.describe(), *(f"{g}={i.describe()}" for g, i in self.overrides)])


# The data-dependent LSUV initializer registers itself (it needs the registry defined above).
from gradprobe import lsuv as _lsuv  # noqa: E402,F401
