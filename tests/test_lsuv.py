"""LSUV (Mishkin & Matas 2016, REFERENCE #9): after ``init="lsuv"`` every Linear/Conv output variance,
as the probe measures it, is within the tolerance of 1, on an MLP, a CNN and a residual network; the
model, its modes, its hooks and the global RNG are left as they were."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradprobe.lsuv  # noqa: F401 - registers `lsuv` (until gradprobe.initializers imports it)
from gradprobe import zoo
from gradprobe.errors import UsageError
from gradprobe.initializers import INITIALIZERS, resolve_initializer
from gradprobe.lsuv import LSUV, lsuv_
from gradprobe.probing import probe
from gradprobe.report import Report


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def weighted_variances(report: Report) -> dict[str, float]:
    return {x.name: x.act.var for x in report.layers if x.type in ("Linear", "Conv2d") and x.act is not None}


@pytest.mark.parametrize(
    ("name", "tol"), [("mlp", 0.1), ("mlp", 0.02), ("vgg_style", 0.1), ("resnet_style", 0.1)]
)
def test_every_linear_and_conv_has_unit_output_variance(name: str, tol: float) -> None:
    model, x = zoo.example(name, batch=32, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    report = probe(model, x, init=f"lsuv:tol={tol}", seed=5, diagnose=False)
    variances = weighted_variances(report)
    assert len(variances) >= 5
    off = {k: v for k, v in variances.items() if not abs(v - 1.0) < tol}
    assert not off, f"output variance not within {tol} of 1: {off}"
    assert all(
        x.initializer == (f"lsuv(tol={tol})" if tol != 0.1 else "lsuv") for x in report.layers if x.params
    )
    # The user's model is untouched: weights, buffers, modes, hooks; the global RNG too.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_direct_call_rescales_in_place_first_layer_included() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )
    x = 5.0 * torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    init = LSUV(tol=0.05)
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        assert init.init_module_(module, gain=1.0, generator=generator)
    net.eval()
    rng = torch.get_rng_state()
    result = init.init_with_data_(net, dict(net.named_children()), lambda: net(x))
    assert list(result) == ["0", "3", "5"]  # execution order, the first layer included
    # Orthonormal columns keep ‖Wx‖ = ‖x‖ over 64 outputs of 32 inputs: Var(out) = 25·32/64.
    assert result["0"]["scale"] == pytest.approx(1 / math.sqrt(25 * 32 / 64), rel=0.05)
    assert all(abs(r["variance"] - 1) < 0.05 and r["iterations"] <= 3 for r in result.values())
    assert not net.training and all(not m.training for m in net.modules())  # modes as they were
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in net.modules())
    # Measured again from scratch: each layer's output variance is 1.
    with torch.no_grad():
        h = net[0](x)
        assert h.var(unbiased=False).item() == pytest.approx(1.0, abs=0.05)


def test_dropout_masks_are_the_same_in_every_measurement() -> None:
    """In train mode each forward pass would draw new dropout masks; LSUV replays the first RNG
    state, so the layer after a dropout converges on the masks the probe itself then uses."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    report = probe(net, x, init="lsuv:tol=0.01", seed=3, diagnose=False)
    assert abs(report["3"].act.var - 1.0) < 0.01  # type: ignore[union-attr]


def test_dead_layer_is_left_alone_and_hooks_come_off_on_errors() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8))
    zeros = torch.zeros(4, 8)
    weights = [m.weight.detach().clone() for m in net]
    result = lsuv_(net, dict(net.named_children()), lambda: net(zeros))
    # Var 0 (no bias, zero input) and a variance that does not follow the weight (the bias alone):
    # nothing to scale, and the weights are as they were.
    assert result["0"] == {"variance": 0.0, "scale": 1.0, "iterations": 0}
    assert result["1"]["scale"] == 1.0 and result["1"]["iterations"] == 1
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, net))

    def failing() -> None:
        net(zeros)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lsuv_(net, dict(net.named_children()), failing)
    assert all(not m._forward_hooks for m in net.modules())


def test_registry_and_options() -> None:
    assert INITIALIZERS["lsuv"] is LSUV
    init = resolve_initializer("lsuv:tol=0.05,max_iter=20")
    assert isinstance(init, LSUV) and init.tol == 0.05 and init.max_iter == 20
    assert init.spec() == "lsuv:tol=0.05,max_iter=20" and getattr(init, "data_dependent", False)
    for bad in ("lsuv:tol=0", "lsuv:tol=-1", "lsuv:max_iter=0", "lsuv:max_iter=2.5", "lsuv:tol=nan"):
        with pytest.raises(UsageError):
            resolve_initializer(bad)
    with pytest.raises(UsageError, match="valid: gain, tol, max_iter"):
        resolve_initializer("lsuv:tolerance=0.1")
    assert math.isfinite(LSUV().tol)
