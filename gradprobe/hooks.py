"""Attach and detach the probe's hooks; nothing is left behind.

Forward hooks record each module's output; a ``Tensor.register_hook`` on that output records the
gradient with respect to it. PyTorch's ``register_full_backward_hook`` is deliberately not used: it
fails on in-place activations (``ReLU(inplace=True)``) and in-place residual adds (``out +=
identity``) with "Output 0 of BackwardHookFunction is a view and is being modified inplace", never
fires for dict/dataclass outputs, and costs several times more per module. A tensor hook registered
before an in-place op receives the gradient with respect to the value the module produced.

Tensor hooks on the parameters (:class:`GradientSums`) sum each parameter's gradient as autograd makes
it and let it go, so that a probe never holds all of a model's gradients at once; they are removed on
exit, and a parameter that had no tensor hooks is given none back.

Also here: the rule for which axis holds units, the output-selection rule, and
:class:`ActivationTracer`, which watches torch function calls during a forward pass to find the
nonlinearity that actually follows each weighted layer at run time (module or functional, looking
through normalization, dropout and reshapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradprobe.stats import DeviceMoments, Scratch, sums_of

__all__ = [
    "ModuleState",
    "Recorder",
    "GradientSums",
    "ActivationTracer",
    "select_output",
    "unit_axis",
    "select_modules",
    "saturation_band",
]

_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd if hasattr(nn.modules.dropout, "_DropoutNd") else nn.Dropout,
)
_CHANNEL_MODULES = tuple(t for t in _CHANNEL_MODULES if t not in (nn.Dropout,))


def unit_axis(module: nn.Module, x: torch.Tensor, inherited: int | None = None) -> int | None:
    """Which axis of ``x`` holds the module's units. The documented rule:

    * 0-d and 1-d outputs: one unit (None).
    * 4-d and 5-d outputs (images, volumes): axis 1, the channel.
    * 3-d outputs of convolution, batch/instance/group norm and pooling modules: axis 1;
      other 3-d outputs inherit the axis of their input when it has the same shape (a ReLU after a
      Conv1d), else the last axis (sequence models: (batch, time, features)).
    * everything else: the last axis (features).
    """
    nd = x.dim()
    if nd <= 1:
        return None
    if nd >= 4:
        return 1
    if nd == 3:
        if isinstance(module, _CHANNEL_MODULES):
            return 1
        if inherited is not None:
            return inherited
    return nd - 1


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not t.is_complex()


def _leaves(obj: Any) -> Iterator[Any]:
    """Leaves of nested outputs: tensors in tuples, lists, dicts and dataclasses (HF ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name))


def select_output(
    output: Any, selector: str | int | Callable[[Any], Any] | None = None
) -> torch.Tensor | None:
    """The tensor that stands for a (model or module) output.

    The rule: a tensor is itself; otherwise the ``logits`` entry (dict key, attribute or dataclass
    field) when present and floating; otherwise the first floating tensor in depth-first order of
    tuples, lists, dicts (insertion order) and dataclass fields. ``selector`` overrides it: a callable
    ``output -> tensor``, an int (index into a tuple) or a str (key or attribute).
    """
    if selector is not None:
        if callable(selector):
            picked = selector(output)
        elif isinstance(selector, int):
            picked = output[selector]
        elif isinstance(output, dict):
            picked = output[selector]
        else:
            picked = getattr(output, selector)
        return picked if isinstance(picked, torch.Tensor) else None
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if _floating(logits):
        return logits  # type: ignore[no-any-return]
    for leaf in _leaves(output):
        if _floating(leaf):
            return leaf  # type: ignore[no-any-return]
    return None


def saturation_band(module: nn.Module, derivative_ratio: float) -> tuple[float, float] | None:
    """``(centre, threshold)`` such that ``|y − centre| > threshold`` ⇔ φ′(z)/φ′(0) < ratio.

    Read off the activation's *output* y, for bounded activations: tanh (φ′ = 1 − y²), sigmoid
    (φ′/φ′(0) = 1 − 4(y − ½)²), softsign (φ′ = (1 − |y|)²), hardtanh and hardsigmoid (φ′ = 0 at the
    bounds). None for other modules.
    """
    r = derivative_ratio
    if isinstance(module, nn.Tanh):
        return 0.0, math.sqrt(1.0 - r)
    if isinstance(module, nn.Sigmoid):
        return 0.5, 0.5 * math.sqrt(1.0 - r)
    if isinstance(module, nn.Softsign):
        return 0.0, 1.0 - math.sqrt(r)
    if isinstance(module, nn.Hardtanh):  # includes ReLU6, whose lower bound is "dead", not saturated
        if isinstance(module, nn.ReLU6):
            return None
        lo, hi = float(module.min_val), float(module.max_val)
        return (lo + hi) / 2, (hi - lo) / 2 * (1 - 1e-6)
    if isinstance(module, nn.Hardsigmoid):
        return 0.5, 0.5 * (1 - 1e-6)
    return None


def _own_params(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def select_modules(
    model: nn.Module,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """The modules to record, by qualified name, in definition order.

    By default: every leaf module and every module that owns parameters directly (so that
    ``nn.MultiheadAttention`` and custom blocks with raw parameters are seen). ``include`` adds
    containers by name glob or type; ``exclude`` removes modules by name glob or type. The root
    module is called ``"model"``.
    """

    def matches(name: str, module: nn.Module, patterns: Sequence[str | type[nn.Module]]) -> bool:
        for p in patterns:
            if isinstance(p, str):
                if fnmatch.fnmatchcase(name, p):
                    return True
            elif isinstance(module, p):
                return True
        return False

    chosen: dict[str, nn.Module] = {}
    for raw_name, module in model.named_modules():
        name = raw_name or "model"
        is_leaf = next(iter(module.children()), None) is None
        keep = is_leaf or _own_params(module)
        if include and matches(name, module, include):
            keep = True
        if exclude and matches(name, module, exclude):
            keep = False
        if keep:
            chosen[name] = module
    return chosen


class _TensorTags:
    """A map from live tensors to a value, by identity, that never keeps a tensor alive."""

    def __init__(self) -> None:
        self._tags: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def set(self, t: torch.Tensor, value: Any) -> None:
        self._tags[id(t)] = (weakref.ref(t), value)

    def get(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._tags.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def clear(self) -> None:
        self._tags.clear()


@dataclasses.dataclass
class ModuleState:
    """What the recorder accumulates for one module (on the model's device)."""

    name: str
    module_type: str
    index: int
    act: DeviceMoments
    grad: DeviceMoments
    saturation: tuple[float, float] | None
    calls: int = 0
    output_shape: list[int] | None = None
    unit_axis: int | None = None
    elements_per_sample: int = 1
    outputs_skipped: int = 0
    grad_missing: int = 0
    # Exact non-finite diagnostics (only in the localisation re-run).
    inputs_finite: bool | None = None


_H = TypeVar("_H", bound="_Hooks")


class _Hooks:
    """Hooks attached on entering (``_attach``) and every one removed on exit, also when attaching
    or the pass raises; ``_detach`` then drops whatever else the hooks kept."""

    _handles: list[Any]

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        pass

    def __enter__(self: _H) -> _H:
        try:
            self._attach()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._detach()


class Recorder(_Hooks):
    """Forward hooks on the chosen modules and gradient hooks on their outputs.

    Use as a context manager: every hook is removed on exit, also when the forward pass raises.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        *,
        saturation_ratio: float = 0.1,
        exact_nonfinite: bool = False,
        histograms: bool = False,
    ) -> None:
        self.model = model
        self.modules = modules
        self.saturation_ratio = saturation_ratio
        self.exact_nonfinite = exact_nonfinite
        self.histograms = histograms
        self.scratch = Scratch()
        self.states: dict[str, ModuleState] = {}
        self._order = 0
        self._handles: list[Any] = []
        self._axes = _TensorTags()

    # -- attach / detach -------------------------------------------------------------------
    def _attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))

    def _detach(self) -> None:
        self._axes.clear()

    @property
    def completed(self) -> int:
        """Recorded module calls so far (for "failed after N module calls")."""
        return sum(st.calls for st in self.states.values())

    # -- statistics ------------------------------------------------------------------------
    def _state(self, name: str, module: nn.Module) -> ModuleState:
        st = self.states.get(name)
        if st is None:
            st = ModuleState(
                name=name,
                module_type=type(module).__name__,
                index=self._order,
                act=DeviceMoments(self.scratch),
                grad=DeviceMoments(self.scratch),
                saturation=saturation_band(module, self.saturation_ratio),
            )
            self._order += 1
            self.states[name] = st
        return st

    def _make_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            with torch._C.DisableTorchFunction():
                self._record(name, mod, args, output)

        return hook

    def _record(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        st = self._state(name, module)
        x = select_output(output)
        if x is None or not _floating(x):
            st.outputs_skipped += 1
            return
        in_backward = _in_backward()
        first_in = args[0] if isinstance(args, tuple) and args else None
        inherited = None
        if isinstance(first_in, torch.Tensor) and first_in.shape == x.shape:
            inherited = self._axes.get(first_in)
        axis = unit_axis(module, x, inherited)
        self._axes.set(x, axis)
        if not in_backward:
            # A checkpointed segment re-runs forward hooks during backward: count activations once.
            st.calls += 1
            if st.output_shape is None:
                st.output_shape = list(x.shape)
                st.unit_axis = axis
                st.elements_per_sample = max(1, x.numel() // x.shape[0]) if x.dim() >= 1 and x.shape[0] else 1
            if axis != st.unit_axis and x.dim() > 0 and st.unit_axis is not None:
                axis = st.unit_axis if st.unit_axis < x.dim() else axis
            st.act.add(x, axis, st.saturation, self.exact_nonfinite, self.histograms)
            if st.act.collapsed:  # outputs with different unit counts: reported as one unit
                st.unit_axis = None
            if self.exact_nonfinite:
                finite = all(
                    bool(torch.isfinite(t).all())
                    for t in _leaves(args)
                    if isinstance(t, torch.Tensor) and _floating(t)
                )
                st.inputs_finite = finite if st.inputs_finite is None else (st.inputs_finite and finite)
        if x.requires_grad:
            grad_axis = st.unit_axis if st.unit_axis is not None and st.unit_axis < x.dim() else axis
            x.register_hook(self._make_grad_hook(st, grad_axis))
        elif not in_backward:
            st.grad_missing += 1

    def _make_grad_hook(self, st: ModuleState, axis: int | None) -> Callable[[torch.Tensor], None]:
        exact, hist = self.exact_nonfinite, self.histograms

        def grad_hook(g: torch.Tensor) -> None:
            with torch._C.DisableTorchFunction():
                st.grad.add(g, axis, None, exact, hist)

        return grad_hook


# Gradients queued before one summing call: a few of them, still in the last-level cache.
GRADIENT_QUEUE_BYTES = 8 << 20
# Parameters smaller than this get no hook (a bias, a norm's scale): a hook call costs ~50 µs inside
# the backward pass, more than holding their gradients until one summing call after it.
GRADIENT_HOOK_MIN_BYTES = 64 << 10


class GradientSums(_Hooks):
    """Σg² of every parameter's gradient, taken as autograd produces it, and the gradient let go.

    A tensor hook on each parameter (a leaf: ``torch.autograd.grad`` runs it on the gradient before
    it captures it) queues the gradient and returns a zero-strided stand-in of the same shape (one
    zero, expanded; one per shape, shared), so the probe does not hold every gradient of the model
    at once, as a bare ``autograd.grad`` over all parameters does: a (20 × 1024)-wide MLP holds
    80 MiB of gradients at its peak. The queue is summed (:func:`gradprobe.stats.sums_of`, one kernel call) whenever it holds
    :data:`GRADIENT_QUEUE_BYTES`, and at the end of each backward pass (:meth:`flush`), with the
    gradients no hook took (:meth:`add`), into one float64 :attr:`sums`. No host sync.

    Gradients of the parameters in :attr:`keep` (ids: those the symmetry analysis reads, found from
    the weights before the passes) are summed too and returned unchanged. A parameter that is not a
    plain tensor (a DTensor shard), or smaller than :data:`GRADIENT_HOOK_MIN_BYTES`, gets no hook:
    the caller hands its gradient to :meth:`add` after the pass.

    Use as a context manager. On exit every hook is removed and a parameter that had no tensor hooks
    before (``_backward_hooks`` None) gets None back, so it is left exactly as it was.
    """

    def __init__(self, params: Sequence[torch.Tensor], scratch: Scratch, *, hooks: bool = True) -> None:
        self.params = list(params)
        self.scratch = scratch
        self.hooks = hooks  # False: no hook at all; every gradient is summed through add()
        self.keep: set[int] = set()
        self.sums: torch.Tensor | None = None  # Σ over the passes of ‖∇‖², float64, one per parameter
        self.taken: set[int] = set()  # positions in `params` whose gradient a hook took this pass
        self._queue: list[tuple[int, torch.Tensor]] = []
        self._bytes = 0
        self._handles: list[Any] = []
        self._had_none: list[torch.Tensor] = []
        self._stand_ins: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}

    def _attach(self) -> None:
        for i, q in enumerate(self.params if self.hooks else ()):
            if type(q) is not nn.Parameter and type(q) is not torch.Tensor:
                continue
            if q.numel() * q.element_size() < GRADIENT_HOOK_MIN_BYTES:
                continue
            if q._backward_hooks is None:
                self._had_none.append(q)
            self._handles.append(q.register_hook(self._make_hook(i)))

    def _detach(self) -> None:
        for q in self._had_none:
            if not q._backward_hooks:
                q._backward_hooks = None
        self._had_none.clear()
        self._queue.clear()
        self._bytes = 0

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(g: torch.Tensor) -> torch.Tensor | None:
            self.add(i, g)
            self.taken.add(i)
            if self._bytes >= GRADIENT_QUEUE_BYTES:
                self._sum_queue()
            if id(self.params[i]) in self.keep:
                return None
            key = (g.shape, g.dtype, g.device)
            stand_in = self._stand_ins.get(key)  # one per shape (a call in a hook is ~50 µs, caches cold)
            if stand_in is None:
                zero = torch.zeros((), dtype=g.dtype, device=g.device)
                stand_in = self._stand_ins[key] = zero.expand(g.shape)
            return stand_in

        return hook

    def _sum_queue(self) -> None:
        if not self._queue:
            return
        positions = [i for i, _ in self._queue]
        with torch._C.DisableTorchFunction():
            squares = sums_of([g for _, g in self._queue], self.scratch)[:, 1]
            device = squares.device
            if self.sums is None:
                self.sums = torch.zeros(len(self.params), dtype=torch.float64, device=device)
            self.sums.index_add_(0, torch.tensor(positions, device=device), squares)
        self._queue.clear()
        self._bytes = 0

    def add(self, i: int, g: torch.Tensor) -> None:
        """Queue the gradient of ``params[i]`` (a hook's, or one no hook took) for the next sum."""
        self._queue.append((i, g))
        self._bytes += g.numel() * g.element_size()

    def flush(self) -> None:
        """Sum what is queued, at the end of a backward pass; the next pass starts with no gradient taken."""
        self._sum_queue()
        self.taken.clear()


def describe_inputs(args: Any, kwargs: Any = None) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            dt = str(v.dtype).replace("torch.", "")
            return f"{dt}[{', '.join(str(s) for s in v.shape)}]"
        if isinstance(v, (list, tuple)):
            return "(" + ", ".join(one(x) for x in v) + ")"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        return type(v).__name__

    parts = [one(a) for a in (args if isinstance(args, tuple) else (args,))]
    parts += [f"{k}={one(v)}" for k, v in (kwargs or {}).items()]
    return ", ".join(parts)


def failure_context(model: nn.Module, error: BaseException) -> tuple[str | None, str]:
    """The innermost module executing when ``error`` was raised, and a description of its inputs.

    Read from the traceback (the frames of ``Module._call_impl``), so normal runs pay nothing.
    """
    names = {id(m): (n or "model") for n, m in model.named_modules()}
    found: tuple[str | None, str] = (None, "")
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("_call_impl", "_wrapped_call_impl"):
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and id(module) in names:
                found = (
                    names[id(module)],
                    describe_inputs(frame.f_locals.get("args", ()), frame.f_locals.get("kwargs")),
                )
        tb = tb.tb_next
    return found


def _in_backward() -> bool:
    try:
        return bool(torch._C._current_graph_task_id() != -1)
    except AttributeError:  # pragma: no cover - older torch
        return False


# --------------------------------------------------------------------------------------------
# Which activation follows each layer (run-time tracing)
# --------------------------------------------------------------------------------------------

# Function names (torch.*, Tensor.*, F.*; a trailing underscore for in-place is stripped) that are
# pointwise activations, mapped to the canonical name used by gradprobe.theory.
_ACTIVATION_FUNCS = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "rrelu": "leaky_relu",
    "prelu": "leaky_relu",
    "relu6": "relu6",
    "elu": "elu",
    "celu": "elu",
    "selu": "selu",
    "gelu": "gelu",
    "silu": "silu",
    "mish": "mish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "softplus": "softplus",
    "softsign": "softsign",
    "hardtanh": "hardtanh",
    "hardswish": "silu",
    "hardsigmoid": "sigmoid",
    "logsigmoid": "softplus",
}

# Functions whose output still "is" the layer's signal for the purpose of choosing a gain.
_TRANSPARENT_FUNCS = {
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "local_response_norm",
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "__getitem__",
    "clone",
    "to",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
}


def _activation_param(base: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    if base in ("leaky_relu", "rrelu"):
        v = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        if base == "rrelu":
            lo = kwargs.get("lower", args[1] if len(args) > 1 else 1 / 8)
            hi = kwargs.get("upper", args[2] if len(args) > 2 else 1 / 3)
            v = (lo + hi) / 2
        return float(v)
    if base == "prelu":
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        # a 0-d tensor, read on the host only when the trace is done (no sync inside the pass)
        return w.detach().float().mean() if isinstance(w, torch.Tensor) else 0.25  # type: ignore[return-value]
    if base in ("elu", "celu"):
        return float(kwargs.get("alpha", args[1] if len(args) > 1 else 1.0))
    return None


class ActivationTracer(TorchFunctionMode):
    """Finds, at run time, the first pointwise nonlinearity applied to each weighted layer's output.

    Weighted layers are modules owning a parameter of dimension ≥ 2 (Linear, ConvNd, Embedding,
    MultiheadAttention, RNNs, …). Their outputs are tagged; tags pass through normalization, dropout,
    pooling and reshapes; the first activation function (module or functional) applied to a tagged
    tensor is recorded for that layer. Anything else (a residual add, a matmul) ends the search, and
    the layer is reported with no activation (gain 1, as for a linear layer).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._found: dict[str, tuple[str, Any]] = {}
        self._tags = _TensorTags()
        self._handles: list[Any] = []

    @property
    def found(self) -> dict[str, tuple[str, float | None]]:
        """Layer name → (activation, its parameter), for the layers whose activation was found.

        Parameters that live in tensors (PReLU slopes) are read here, all in one transfer, after
        the pass: never inside it.
        """
        tensors = [param for _, param in self._found.values() if isinstance(param, torch.Tensor)]
        if tensors:
            device = tensors[0].device
            values = iter(torch.stack([t.reshape(()).to(device) for t in tensors]).cpu().tolist())
        return {
            name: (act, next(values) if isinstance(param, torch.Tensor) else param)
            for name, (act, param) in self._found.items()
        }

    @contextlib.contextmanager
    def attached(self) -> Iterator[ActivationTracer]:
        try:
            for name, module in self.model.named_modules():
                if any(p is not None and p.dim() >= 2 for p in module._parameters.values()):
                    self._handles.append(module.register_forward_hook(self._make_tagger(name or "model")))
            with self:
                yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._tags.clear()

    def _make_tagger(self, name: str) -> Callable[..., None]:
        def tagger(module: nn.Module, args: Any, output: Any) -> None:
            x = select_output(output)
            if isinstance(x, torch.Tensor):
                self._tags.set(x, name)

        return tagger

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fname = getattr(func, "__name__", "")
        base = fname if fname.startswith("__") else fname.rstrip("_")
        if base in _ACTIVATION_FUNCS or base in _TRANSPARENT_FUNCS:
            src = args[0] if args else kwargs.get("input")
            layer = self._tags.get(src)
            if layer is not None:
                if base in _ACTIVATION_FUNCS:
                    if layer not in self._found:
                        self._found[layer] = (_ACTIVATION_FUNCS[base], _activation_param(base, args, kwargs))
                else:
                    first = (
                        out
                        if isinstance(out, torch.Tensor)
                        else next((o for o in out if isinstance(o, torch.Tensor)), None)
                        if isinstance(out, (tuple, list))
                        else None
                    )
                    if first is not None:
                        self._tags.set(first, layer)
        return out
