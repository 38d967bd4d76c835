"""LSUV, layer-sequential unit-variance initialization (Mishkin & Matas, "All you need is a good init", ICLR 2016).

Orthonormal weights first (Saxe et al. 2014), then, for each Linear/Conv layer in the order the
forward pass runs them, the first one included: run the model on a batch, measure the variance of
the layer's output over every element, and divide the layer's weights by its square root, until
``|Var(out) − 1| < tol`` or ``max_iter`` measurements (the paper: tol 0.1, at most 10; it usually
takes one or two). Layers later in the order cannot change an earlier layer's output, so one pass
in execution order suffices.

Registered as ``lsuv`` (``gradprobe.probe(model, x, init="lsuv")``, ``lsuv:tol=0.05,max_iter=20``)
once this module is imported. The probe calls :meth:`LSUV.init_with_data_` on its own copy of the
parameters with a ``forward`` that runs the first batch; called directly, it rescales the model's
own weights in place:

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
>>> x = torch.randn(256, 64)
>>> init = LSUV()
>>> generator = torch.Generator().manual_seed(0)
>>> for m in net.modules():
...     _ = init.init_module_(m, gain=1.0, generator=generator)
>>> scaled = init.init_with_data_(net, dict(net.named_children()), lambda: net(x))
>>> round(net[2](net[1](net[0](x))).var().item(), 1)
1.0
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gradprobe.errors import UsageError
from gradprobe.initializers import Orthogonal, register_initializer

__all__ = ["LSUV", "LSUV_TYPES", "lsuv_"]

#: The layers LSUV rescales: those whose output is a weighted sum with a weight to scale.
LSUV_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


class _Stop(BaseException):
    """Ends a forward pass once the measured layer has run (not an Exception: a model's own
    ``except Exception`` must not swallow it)."""


@dataclass
class _Measurement:
    """Streaming moments of every output of one module, over all its calls."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, output: torch.Tensor) -> None:
        x = output.detach().double()
        self.count += x.numel()
        self.total += float(x.sum())
        self.squares += float((x * x).sum())

    @property
    def variance(self) -> float:
        if not self.count:
            return math.nan
        mean = self.total / self.count
        return max(self.squares / self.count - mean * mean, 0.0)


def _output_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0] if output[0].is_floating_point() else None
    return None


@contextlib.contextmanager
def _hooked(modules: Mapping[str, nn.Module], hook: Callable[[str, nn.Module, Any], None]) -> Iterator[None]:
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: hook(name, m, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _same_randomness() -> Iterator[Callable[[], None]]:
    """Every forward pass sees the global RNG state of the first (the same dropout masks), and the
    state is restored on exit: LSUV leaves no global state behind."""
    state = torch.get_rng_state()

    def reset() -> None:
        torch.set_rng_state(state)

    try:
        yield reset
    finally:
        torch.set_rng_state(state)


def _execution_order(
    modules: Mapping[str, nn.Module], forward: Callable[[], Any], reset: Callable[[], None]
) -> tuple[list[str], dict[str, int]]:
    order: list[str] = []
    calls: dict[str, int] = {}

    def record(name: str, module: nn.Module, output: Any) -> None:
        if _output_tensor(output) is None:
            return
        calls[name] = calls.get(name, 0) + 1
        if name not in order:
            order.append(name)

    reset()
    with _hooked(modules, record), torch.no_grad():
        forward()
    return order, calls


def _measure(
    name: str,
    module: nn.Module,
    expected_calls: int,
    forward: Callable[[], Any],
    reset: Callable[[], None],
) -> float:
    """Var(out) of ``module`` over all its calls, stopping the forward pass after the last one."""
    measurement = _Measurement()
    seen = 0

    def record(_: str, m: nn.Module, output: Any) -> None:
        nonlocal seen
        tensor = _output_tensor(output)
        if tensor is None:
            return
        measurement.add(tensor)
        seen += 1
        if seen >= expected_calls:
            raise _Stop

    reset()
    with _hooked({name: module}, record), torch.no_grad():
        try:
            forward()
        except _Stop:
            pass
    return measurement.variance


def _rescale(
    name: str,
    module: nn.Module,
    expected_calls: int,
    forward: Callable[[], Any],
    reset: Callable[[], None],
    tol: float,
    max_iter: int,
) -> dict[str, float | int]:
    """Scale one module's weight until its output variance is within ``tol`` of 1.

    Stops early, undoing the last step, when a step does not bring the variance closer to 1: the
    output then does not follow the weight's scale (a zero input, a bias larger than 1), and more
    steps would only shrink or blow up the weight.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    scale, iterations = 1.0, 0
    variance = _measure(name, module, expected_calls, forward, reset)
    while math.isfinite(variance) and variance > 0 and abs(variance - 1.0) >= tol and iterations < max_iter:
        factor = 1.0 / math.sqrt(variance)
        previous = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(factor)
        iterations += 1
        after = _measure(name, module, expected_calls, forward, reset)
        if not (math.isfinite(after) and abs(after - 1.0) < abs(variance - 1.0)):
            with torch.no_grad():
                weight.copy_(previous)  # exactly as before the step
            break
        scale *= factor
        variance = after
    return {"variance": variance, "scale": scale, "iterations": iterations}


def lsuv_(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    forward: Callable[[], Any],
    *,
    tol: float = 0.1,
    max_iter: int = 10,
) -> dict[str, dict[str, float | int]]:
    """Rescale each Linear/Conv of ``modules`` in execution order until its output variance is within
    ``tol`` of 1; return, per layer, ``variance`` (the last measurement, after the last step kept),
    ``scale`` (the product of the factors applied to its weight) and ``iterations`` (steps taken,
    at most ``max_iter``).

    ``forward()`` runs ``model`` on the data (its output is ignored). Weights are changed in place;
    a layer whose output variance is 0 or not finite, or does not move towards 1 when its weight is
    scaled, is left as it is. Every
    module's ``training`` flag and the global RNG state are as before on return, and every hook is
    removed, also when ``forward`` raises.
    """
    if not (tol > 0 and math.isfinite(tol)):
        raise UsageError(f"lsuv tol must be a positive number, got {tol!r}")
    if max_iter < 1:
        raise UsageError(f"lsuv max_iter must be ≥ 1, got {max_iter!r}")
    targets = {
        name: m
        for name, m in modules.items()
        if isinstance(m, LSUV_TYPES) and getattr(m, "weight", None) is not None
    }
    if not targets:
        return {}
    flags = [(m, m.training) for m in model.modules()]
    result: dict[str, dict[str, float | int]] = {}
    try:
        with _same_randomness() as reset:
            order, calls = _execution_order(targets, forward, reset)
            for name in order:
                result[name] = _rescale(name, targets[name], calls[name], forward, reset, tol, max_iter)
    finally:
        for m, flag in flags:
            m.training = flag
    return result


@register_initializer
@dataclass(frozen=True)
class LSUV(Orthogonal):
    """Mishkin & Matas (2016): orthonormal weights, then each Linear/Conv rescaled in execution order
    until its output variance on the data is within ``tol`` of 1 (see :func:`lsuv_`)."""

    tol: float = 0.1  # stop when |Var(out) − 1| < tol (the paper's value)
    max_iter: int = 10  # measurements per layer at most (the paper: 10; one or two usually suffice)

    name: ClassVar[str] = "lsuv"
    summary: ClassVar[str] = "orthonormal, then each layer rescaled on the data to output variance 1"
    formula: ClassVar[str] = "W = Q (QᵀQ = I), then W ← W/√Var(out) per layer until |Var(out) − 1| < tol"
    data_dependent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
            raise UsageError(f"bad value for lsuv:tol: {tol!r}; expected a positive number")
        object.__setattr__(self, "tol", float(tol))
        max_iter = self.max_iter
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise UsageError(f"bad value for lsuv:max_iter: {max_iter!r}; expected an integer ≥ 1")

    def init_with_data_(
        self, model: nn.Module, modules: Mapping[str, nn.Module], forward: Callable[[], Any]
    ) -> dict[str, dict[str, float | int]]:
        """The data-dependent step, after :meth:`init_module_` gave every module orthonormal weights."""
        return lsuv_(model, modules, forward, tol=self.tol, max_iter=self.max_iter)
