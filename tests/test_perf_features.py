"""Big-model features and the fast statistics path: filters, half precision, the device option, no
deep copy, and the chunked float64 moments against direct float64 computation."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe.stats as stats
from gradprobe import zoo
from gradprobe.probing import _Session, probe
from gradprobe.stats import DeviceMoments, Scratch, as_units, square_sum, sum_and_square_sum


def _moments(x: torch.Tensor, axis: int | None, chunk: int = stats.CHUNK_ELEMENTS, **kwargs: Any) -> stats.Moments:
    acc = DeviceMoments(Scratch(chunk))
    acc.add(x, axis, **kwargs)
    return DeviceMoments.unpack([p.double().numpy().reshape(-1) for p in acc.pack()], acc.rows, acc.calls)


def _check_exact(x: torch.Tensor, axis: int | None, m: stats.Moments) -> None:
    d = as_units(x.contiguous().double(), axis)
    np.testing.assert_allclose(m.mean, d.mean(dim=(0, 2)).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.unit_var(), d.var(dim=(0, 2), unbiased=False).numpy(), rtol=1e-10, atol=1e-300)
    np.testing.assert_array_equal(m.unit_max, d.amax(dim=(0, 2)).numpy())
    np.testing.assert_array_equal(m.unit_min, d.amin(dim=(0, 2)).numpy())
    assert m.zeros == int((x == 0).sum()) and m.rows == d.shape[0] * d.shape[2]


# --------------------------------------------------------------------------------------------
# the chunked statistics
# --------------------------------------------------------------------------------------------

# (shape, unit axis, chunk elements): whole samples per chunk with one or several elements per unit
# (rows of 1, short rows summed over the samples first, long rows summed along the row first),
# blocks of units when a sample exceeds the chunk, pieces of one unit's row, a single unit.
CASES = [
    ((300, 7), 1, 64),
    ((300, 40), 1, 2600),  # (rows, units): the fused per-channel kernel, chunks merged
    ((17, 40), 1, 640),  # ... with a last chunk of one row
    ((40, 6, 3, 3), 1, 256),
    ((16, 5, 100), 1, 2048),
    ((3, 40, 7), 1, 64),
    ((2, 3, 1000), 1, 64),
    ((6, 4, 50), 1, 7),
    ((1000,), None, 64),
    ((9, 4, 6, 6), 1, stats.CHUNK_ELEMENTS),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,axis,chunk", CASES)
@pytest.mark.usefixtures("stats_path")
def test_every_chunk_layout_is_exact(shape: tuple[int, ...], axis: int | None, chunk: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(len(shape) * 7 + chunk)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    x[x.abs() < 0.6] = 0.0
    x = x.to(dtype)
    m = _moments(x, axis, chunk, saturation=(0.0, 4.0))
    _check_exact(x, axis, m)
    assert m.saturated == int((x.double().abs() > 4.0).sum())


@pytest.mark.usefixtures("stats_path")
def test_large_mean_small_spread_across_many_chunks_is_exact() -> None:
    """The per-unit centre (the first chunk's mean) keeps M2 exact where Σx² − (Σx)²/n fails."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 8, generator=g) + 1e4).float()
    m = _moments(x, 1, chunk=64)  # 625 chunks
    d = x.double()
    np.testing.assert_allclose(m.unit_var(), d.var(dim=0, unbiased=False).numpy(), rtol=1e-9)


@pytest.mark.parametrize(
    "make,axis",
    [
        (lambda: torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last), 1),
        (lambda: torch.randn(8, 16, 32).transpose(0, 1), 2),  # batch-first attention's (T, N, E) output
        (lambda: torch.randn(3, 4, 5).permute(2, 0, 1), 1),
    ],
)
@pytest.mark.usefixtures("stats_path")
def test_permuted_layouts_are_read_in_place(make: Any, axis: int) -> None:
    x = make()
    assert not x.is_contiguous()
    v = as_units(x, axis)
    assert v.data_ptr() == x.data_ptr() and v.is_contiguous()  # a view, no copy
    _check_exact(x, axis, _moments(x, axis, chunk=64))


@pytest.mark.usefixtures("stats_path")
def test_one_read_per_tensor_recorded_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """An nn.Identity returns its input: the same tensor object is summarised once (counted where the
    data is read: the kernel call, or the PyTorch path's chunk loop)."""
    calls = []

    def counting(original: Any) -> Any:
        def read(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs)

        return read

    monkeypatch.setattr(stats, "_kernel_summary", counting(stats._kernel_summary))
    monkeypatch.setattr(stats, "_summarize_chunks", counting(stats._summarize_chunks))
    scratch = Scratch()
    x = torch.randn(64, 32)
    a, b = DeviceMoments(scratch), DeviceMoments(scratch)
    a.add(x, 1)
    b.add(x, 1)
    assert len(calls) == 1
    x.add_(1.0)  # a new version of the same tensor is read again
    b.add(x, 1)
    assert len(calls) == 2
    np.testing.assert_array_equal(a.mean.numpy(), (b._pending[0].mean).numpy())  # type: ignore[union-attr]


@pytest.mark.usefixtures("stats_path")
def test_module_called_on_different_unit_counts_becomes_one_exact_unit() -> None:
    """torchvision's Bottleneck applies one ReLU to 64- and 256-channel tensors."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 8, 5, 5, generator=g), torch.randn(4, 32, 5, 5, generator=g) + 2]
    acc = DeviceMoments(Scratch())
    for t in tensors:
        acc.add(t, 1)
    assert acc.collapsed
    m = DeviceMoments.unpack([p.double().numpy().reshape(-1) for p in acc.pack()], acc.rows, acc.calls)
    every = torch.cat([t.reshape(-1) for t in tensors]).double()
    assert m.units == 1 and m.count == every.numel() and m.calls == 2
    mean, var = m.global_mean_var()
    assert mean == pytest.approx(every.mean().item(), rel=1e-12)
    assert var == pytest.approx(every.var(unbiased=False).item(), rel=1e-12)
    assert m.unit_max[0] == every.max().item() and m.unit_min[0] == every.min().item()


def test_resnet50_style_shared_relu_is_probed() -> None:
    model = zoo.resnet50_style(layers=(1, 1), width=8, num_classes=10)
    report = probe(model, torch.randn(2, 3, 32, 32), diagnose=False, gate_check=False)
    relu = report["layer1.0.relu"]
    assert relu.calls == 3 and relu.unit_axis is None and relu.act.units == 1
    assert report["layer1.0.bn1"].act.units == 8  # everything else keeps its channels


@pytest.mark.usefixtures("stats_path")
def test_parameter_sums_are_exact_float64() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 77, generator=g) * 0.05 + 0.01
    sums = sum_and_square_sum(w, Scratch(1000))
    d = w.double()
    assert sums[0].item() == pytest.approx(d.sum().item(), rel=1e-12)
    assert sums[1].item() == pytest.approx(d.square().sum().item(), rel=1e-12)
    assert square_sum(w.t(), Scratch(64)).item() == pytest.approx(d.square().sum().item(), rel=1e-12)
    assert sum_and_square_sum(torch.zeros(0), Scratch()).tolist() == [0.0, 0.0]


def test_chunk_budget_keeps_zero_counts_exact() -> None:
    with pytest.raises(ValueError):
        Scratch(1 << 24)  # float32 dot products of 0/±1 are exact only below 2**24


# --------------------------------------------------------------------------------------------
# module filters
# --------------------------------------------------------------------------------------------


def test_include_and_exclude_filters() -> None:
    model = zoo.transformer(depth=2, d_model=16, max_len=8)
    x = torch.randint(0, 100, (2, 8))
    default = {layer.name for layer in probe(model, x, diagnose=False, gate_check=False).layers}
    assert "blocks.0.mlp.0" in default and "blocks.0" not in default  # leaves, not containers
    report = probe(
        model,
        x,
        include=["blocks.*.mlp"],  # containers by glob
        exclude=[nn.LayerNorm, "blocks.1.*"],  # by type and by glob
        diagnose=False,
        gate_check=False,
    )
    names = {layer.name for layer in report.layers}
    assert "blocks.0.mlp" in names and "blocks.0.mlp.0" in names
    assert not any(n.startswith("blocks.1.") for n in names)
    assert not any(report[n].type == "LayerNorm" for n in names)
    assert "blocks.1.mlp" not in names  # the exclusion wins over the inclusion
    assert report["blocks.0.mlp"].act.var == pytest.approx(report["blocks.0.mlp.2"].act.var, rel=1e-12)


# --------------------------------------------------------------------------------------------
# half-precision models, float64 statistics
# --------------------------------------------------------------------------------------------


class _Capture:
    def __init__(self, model: nn.Module) -> None:
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_hook(lambda m, i, o, n=n: self.acts.__setitem__(n, o.detach().clone()))
            for n, m in model.named_children()
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_gets_float64_statistics(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(dtype)
    x = torch.randn(128, 32).to(dtype)
    report = probe(model, x, diagnose=False, gate_check=False)
    capture = _Capture(model)
    try:
        model(x)
    finally:
        capture.remove()
    assert report.meta["dtypes"] == [str(dtype).replace("torch.", "")]
    for name, t in capture.acts.items():
        stats_ = report[name].act
        d = t.double()  # the exact values the model produced, in float64
        assert stats_.var == pytest.approx(d.var(unbiased=False).item(), rel=1e-9)
        assert stats_.mean == pytest.approx(d.mean().item(), rel=1e-9, abs=1e-12)
        assert stats_.max == d.max().item() and stats_.min == d.min().item()
        assert stats_.moments.mean.dtype == np.float64
        assert stats_.zero_fraction == pytest.approx((d == 0).double().mean().item(), rel=1e-12)
    for layer in report.layers:
        for p in layer.params:
            w = dict(model.named_parameters())[f"{layer.name}.{p.name}"].detach().double()
            assert p.rms == pytest.approx(w.square().mean().sqrt().item(), rel=1e-9)
            assert p.grad_rms is not None and math.isfinite(p.grad_rms) and p.grad_rms > 0


# --------------------------------------------------------------------------------------------
# the device option, and no copy of the model
# --------------------------------------------------------------------------------------------


def test_device_option_on_cpu_matches_the_default() -> None:
    model = zoo.mlp(depth=3, width=32)
    x = torch.randn(16, 32)
    a = probe(model, x, init="kaiming_normal", diagnose=False, gate_check=False)
    b = probe(model, x, init="kaiming_normal", device="cpu", diagnose=False, gate_check=False)
    assert b.meta["device"] == "cpu"
    for la, lb in zip(a.layers, b.layers):
        assert la.act_var == lb.act_var and la.grad_var == lb.grad_var


class _Stop(Exception):
    pass


@pytest.mark.parametrize("init", ["keep", "kaiming_normal"])
def test_device_option_puts_everything_on_that_device_and_leaves_the_model(
    init: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``device=`` the probe creates parameters/buffers and runs there; the model stays where it
    is. ``meta`` stands in for an accelerator: nothing may assume CPU (or read a value) on the way."""
    model = zoo.resnet_style(blocks=(1,), width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, Any] = {}

    def stop(self: _Session, states: dict[str, Any], param_stats: Any) -> None:
        seen["devices"] = {t.device.type for st in states.values() for acc in (st.act, st.grad) if not acc.empty for t in acc.pack()}
        seen["params"] = {param_stats[0].device.type}  # the (rows, 3) parameter table
        raise _Stop

    monkeypatch.setattr(_Session, "_layers", stop)
    with pytest.raises(_Stop):
        probe(model, torch.randn(2, 3, 8, 8), init=init, device="meta", diagnose=False, gate_check=False)
    assert seen["devices"] == {"meta"} and seen["params"] == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())  # not moved
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_deep_copy_of_the_model_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deepcopy called")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    monkeypatch.setattr(nn.Module, "__deepcopy__", refuse, raising=False)
    model = zoo.example("zero_head_mlp")[0]
    x = torch.randn(16, 128)
    report = probe(model, x, init="default", gate_check=True, suggest=True)  # every extra pass
    assert "gate_check" in report.meta
    probe(model, x)


def test_a_cpu_probe_seeds_only_the_cpu_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout masks come from the global CPU generator, seeded per pass; torch.manual_seed would also
    seed every accelerator's (queuing a lazy call with a formatted stack where CUDA is present but not
    initialised, left behind after the probe). The masks stay the same from one probe to the next and
    change with the seed; the caller's CPU generator is restored."""
    calls: list[int] = []
    real = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (calls.append(s), real(s))[1])
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 8))
    x = torch.randn(64, 32)
    state = torch.get_rng_state()
    first = probe(net, x, init="kaiming_normal", diagnose=False).to_dict()["layers"]
    again = probe(net, x, init="kaiming_normal", diagnose=False).to_dict()["layers"]
    other = probe(net, x, init="kaiming_normal", diagnose=False, seed=1).to_dict()["layers"]
    assert calls == []
    assert first == again and first != other
    assert torch.equal(torch.get_rng_state(), state)


def test_a_first_probe_does_not_import_torch_distributed_tensor() -> None:
    """DTensor shards are looked for only once torch.distributed.tensor is imported (nothing else can
    make one): importing it for every first probe cost ~0.9 s here (it pulls in sympy)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch, gradprobe
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        gradprobe.probe(net, torch.randn(16, 8), init="kaiming_normal")
        print("torch.distributed.tensor" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# parameter gradients: summed as autograd makes them, then let go
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue_bytes", [1, None])
def test_parameter_gradients_are_let_go_as_autograd_makes_them(
    queue_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ``autograd.grad`` over all parameters holds every gradient until it returns; the probe
    holds at most its queue (``GRADIENT_QUEUE_BYTES``) besides the gradient being made, and keeps
    only the gradients the symmetry analysis reads (none in a randomly initialised MLP)."""
    import weakref

    import gradprobe.hooks as hooks

    if queue_bytes is not None:
        monkeypatch.setattr(hooks, "GRADIENT_QUEUE_BYTES", queue_bytes)
    limit = hooks.GRADIENT_QUEUE_BYTES
    made: list[tuple[weakref.ref[torch.Tensor], int]] = []
    most = [0]
    make_hook = hooks.GradientSums._make_hook

    def watched(self: hooks.GradientSums, i: int) -> Any:
        hook = make_hook(self, i)

        def wrapper(g: torch.Tensor) -> Any:
            held = sum(size for ref, size in made if ref() is not None)
            most[0] = max(most[0], held)
            made.append((weakref.ref(g), g.numel() * g.element_size()))
            return hook(g)

        return wrapper

    monkeypatch.setattr(hooks.GradientSums, "_make_hook", watched)
    kept: dict[str, Any] = {}
    monkeypatch.setattr(_Session, "_attach_unit_analysis", lambda self, report, params, grads: kept.update(grads))
    torch.manual_seed(0)
    model = zoo.mlp(depth=6, width=1024)
    probe(model, torch.randn(8, 1024), diagnose=False, gate_check=False)
    sizes = sorted(size for _, size in made)
    # every hidden weight, once; the biases and the (10, 1024) head are below GRADIENT_HOOK_MIN_BYTES
    assert sizes == [1024 * 1024 * 4] * 6 and hooks.GRADIENT_HOOK_MIN_BYTES > 10 * 1024 * 4
    assert sum(sizes) > 2 * limit  # more than the queue holds
    assert most[0] <= (0 if queue_bytes == 1 else limit), most[0]  # at most the queue was held
    assert all(ref() is None for ref, _ in made)
    # what reaches the analysis: only the small gradients no hook took (summed after the pass)
    assert len(kept) == 8 and all(g.numel() * 4 < hooks.GRADIENT_HOOK_MIN_BYTES for g in kept.values())


def test_gradients_of_identical_units_are_kept_for_the_symmetry_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero-initialised layer has identical units: its gradients and those of the layer after it
    reach the analysis (and decide it), the others do not."""
    import gradprobe.hooks as hooks

    monkeypatch.setattr(hooks, "GRADIENT_HOOK_MIN_BYTES", 0)  # hook these small parameters too
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    kept: dict[int, torch.Tensor] = {}
    analyse = _Session._attach_unit_analysis

    def capture(self: _Session, report: Any, params: Any, grads: dict[int, torch.Tensor]) -> None:
        kept.update(grads)
        analyse(self, report, params, grads)

    monkeypatch.setattr(_Session, "_attach_unit_analysis", capture)
    report = probe(model, torch.randn(32, 8), overrides={"2": "zeros"}, init="xavier_normal", gate_check=False)
    assert len(kept) == 4  # weight and bias of "2" (identical units) and of "4" (reads 16 inputs)
    assert report["2"].extra["symmetry"]["zero_gradient"]["groups"] == 0
    assert report["2"].extra["symmetry"]["broken"]["groups"] == 1  # decided by its gradients
    assert ("tie_broken_by_gradients", ("2",)) in {(f.code, tuple(f.layers)) for f in report.findings}


def test_parameter_hooks_are_removed_and_the_users_own_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hooks on the user's parameters (init="keep") are gone after the probe, also when it fails: a
    parameter without tensor hooks has ``_backward_hooks`` None again, and the user's own hook stays,
    having run as in any backward pass."""
    import gradprobe.hooks as hooks

    monkeypatch.setattr(hooks, "GRADIENT_HOOK_MIN_BYTES", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []

    def users_hook(g: torch.Tensor) -> None:
        calls.append(g.shape)

    model[2].weight.register_hook(users_hook)
    own = dict(model[2].weight._backward_hooks)
    batches = [torch.randn(3, 4), torch.randn(5, 4)]
    probe(model, batches, diagnose=False, gate_check=False)
    assert len(calls) == 2
    assert dict(model[2].weight._backward_hooks) == own
    assert all(model[i].bias._backward_hooks is None for i in (0, 2)) and model[0].weight._backward_hooks is None

    def failing(y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        probe(model, batches, loss=failing, diagnose=False, gate_check=False)
    assert model[0].weight._backward_hooks is None and dict(model[2].weight._backward_hooks) == own
