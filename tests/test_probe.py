"""The core probe: statistics against direct computation, theory, hook edge cases, and the model left
exactly as it was."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.errors import ProbeError, UsageError
from gradprobe.report import Report
from gradprobe.rng import stream_seed
from gradprobe.stats import as_units

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def mlp(depth: int, width: int, act: type[nn.Module] = nn.ReLU, out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything the probe promises not to change."""
    return {
        "params": {k: (v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "grad_ids": {k: id(v.grad) for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        },
        "param_ids": {k: id(v) for k, v in model.named_parameters()},
        # tensor hooks on the parameters (the probe hooks them while it runs: gradprobe.hooks.GradientSums)
        "tensor_hooks": {
            k: None if v._backward_hooks is None else list(v._backward_hooks.items())
            for k, v in model.named_parameters()
        },
        "rng": torch.get_rng_state().clone(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def assert_untouched(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    for k, (v, rg) in before["params"].items():  # type: ignore[attr-defined]
        w, rg2 = after["params"][k]  # type: ignore[index]
        assert torch.equal(v, w) and rg == rg2, f"parameter {k} changed"
    for k, v in before["buffers"].items():  # type: ignore[attr-defined]
        assert torch.equal(v, after["buffers"][k]), f"buffer {k} changed"  # type: ignore[index]
    for k, g in before["grads"].items():  # type: ignore[attr-defined]
        g2 = after["grads"][k]  # type: ignore[index]
        assert (g is None and g2 is None) or torch.equal(g, g2), f"grad of {k} changed"
    for key in ("grad_ids", "training", "hooks", "param_ids", "tensor_hooks", "py_rng"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])  # type: ignore[arg-type]
    assert np.array_equal(before["np_rng"], after["np_rng"])  # type: ignore[arg-type]


def direct_capture(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[dict, dict, dict]:
    """Outputs and output-gradients of every child, captured by hand, with the probe's randn loss."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if name == "":
            continue

        def hook(mod: nn.Module, inp: object, out: torch.Tensor, name: str = name) -> None:
            acts[name] = out.detach().clone()
            out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone()))

        handles.append(m.register_forward_hook(hook))
    try:
        xin = x.detach().requires_grad_(True)
        y = model(xin)
        v = torch.randn(y.shape, generator=torch.Generator().manual_seed(stream_seed(seed, "loss")))
        loss = (y * v).sum() / math.sqrt(y.numel() // y.shape[0])
        params = [p for p in model.parameters()]
        pgrads = torch.autograd.grad(loss, params + [xin])
    finally:
        for h in handles:
            h.remove()
    return acts, grads, dict(zip([n for n, _ in model.named_parameters()], pgrads))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------------------------
# every statistic against a direct torch computation
# --------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.tanh = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tanh(self.fc(self.flat(self.pool(self.relu(self.conv(x))))))


def test_every_statistic_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(32, 3, 8, 8)
    report = gradprobe.probe(model, x, diagnose=False, gate_check=False)
    acts, grads, pgrads = direct_capture(model, x)
    assert [layer.name for layer in report.layers] == ["conv", "relu", "pool", "flat", "fc", "tanh"]
    for layer in report.layers:
        for stats, t in ((layer.act, acts[layer.name]), (layer.grad, grads[layer.name])):
            assert stats is not None
            d = t.double()
            axis = layer.unit_axis
            units = as_units(d, axis)
            unit_var = units.var(dim=(0, 2), unbiased=False)
            assert stats.count == d.numel()
            assert rel(stats.mean, d.mean().item()) < 1e-6 or abs(stats.mean - d.mean().item()) < 1e-12
            assert rel(stats.var, d.var(unbiased=False).item()) < 1e-6
            assert rel(stats.rms, d.square().mean().sqrt().item()) < 1e-6
            assert stats.min == d.min().item() and stats.max == d.max().item()
            assert stats.zero_fraction == pytest.approx((d == 0).double().mean().item(), rel=1e-12)
            assert stats.nonfinite == 0
            assert stats.units == units.shape[1]
            assert rel(stats.unit_var_min, unit_var.min().item()) < 1e-6
            assert rel(stats.unit_var_median, unit_var.median().item()) < 1e-6 or len(unit_var) % 2 == 0
            assert rel(stats.unit_var_max, unit_var.max().item()) < 1e-6
            assert rel(stats.signal_var, unit_var.mean().item()) < 1e-6
            per_sample = d.numel() // d.shape[0]
            assert rel(stats.energy, d.square().mean().item() * per_sample) < 1e-6
            assert stats.dead_units == int((units.amax(dim=(0, 2)) <= 0).sum())
    # unit rule: channels for conv-shaped tensors, last dim otherwise
    assert report["conv"].unit_axis == 1 and report["relu"].unit_axis == 1 and report["fc"].unit_axis == 1
    assert report["conv"].act.units == 8 and report["flat"].act.units == 128
    # the saturation of tanh: fraction with φ′ = 1 − y² < 0.1
    y = acts["tanh"]
    assert report["tanh"].act.saturated_fraction == pytest.approx(((1 - y * y) < 0.1).double().mean().item())
    # parameters
    for layer in report.layers:
        for p in layer.params:
            w = dict(model.named_parameters())[f"{layer.name}.{p.name}"].detach().double()
            g = pgrads[f"{layer.name}.{p.name}"].double()
            assert rel(p.var, w.var(unbiased=False).item()) < 1e-6
            assert rel(p.rms, w.square().mean().sqrt().item()) < 1e-6
            assert rel(p.grad_rms, g.square().mean().sqrt().item()) < 1e-6
            assert rel(p.grad_to_weight, g.norm().item() / w.norm().item()) < 1e-6
    assert report["conv"].param("weight").fan_in == 27 and report["conv"].param("weight").fan_out == 72
    assert report["fc"].param("weight").fan_in == 128 and report["fc"].param("weight").fan_out == 5


def test_statistics_merge_over_several_batches() -> None:
    torch.manual_seed(1)
    model = mlp(2, 16, nn.Tanh)
    batches = [torch.randn(8, 16), torch.randn(24, 16), torch.randn(16, 16)]
    report = gradprobe.probe(model, batches, diagnose=False, gate_check=False)
    whole = torch.cat([model[0](b) for b in batches]).detach().double()
    assert report["0"].act.count == whole.numel()
    assert rel(report["0"].act.var, whole.var(unbiased=False).item()) < 1e-9
    assert report.meta["batches"] == 3 and report["0"].calls == 3
    assert report["0"].param("weight").batches == 3


# --------------------------------------------------------------------------------------------
# theory (REFERENCE #1, #2)
# --------------------------------------------------------------------------------------------


def _mean_gains(report: Report, kind: str) -> float:
    linears = [x for x in report.layers if x.type == "Linear"][:-1]  # hidden layers
    values = [getattr(x, kind).var for x in linears]
    ratios = [b / a for a, b in zip(values, values[1:])]
    if kind == "grad":
        ratios = [1 / r for r in ratios]  # backward: from the output towards the input
    return float(np.exp(np.mean(np.log(ratios))))


@pytest.mark.parametrize("init,expected,tol", [("xavier_normal", 0.5, 0.05), ("kaiming_normal", 1.0, 0.1)])
def test_relu_mlp_gain_per_layer_matches_he_et_al(init: str, expected: float, tol: float) -> None:
    model = mlp(30, 512)
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    report = gradprobe.probe(model, x, init=init, diagnose=False, gate_check=False)
    assert _mean_gains(report, "act") == pytest.approx(expected, abs=tol)
    assert _mean_gains(report, "grad") == pytest.approx(expected, abs=tol)


def test_tanh_mlp_with_pytorch_default_init_loses_two_thirds_per_layer() -> None:
    model = mlp(10, 512, nn.Tanh)
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    report = gradprobe.probe(model, x, init="default", diagnose=False, gate_check=False)
    linears = [x for x in report.layers if x.type == "Linear"][:-1]
    # between-sample variance (the bias adds a per-unit constant, REFERENCE #2); from layer 4 on the
    # signal is small enough that tanh is linear and only σ_w² = n·Var[w] = 1/3 remains
    values = [layer.act.signal_var for layer in linears[3:]]
    gains = [b / a for a, b in zip(values, values[1:])]
    assert float(np.exp(np.mean(np.log(gains)))) == pytest.approx(1 / 3, abs=0.04)


# --------------------------------------------------------------------------------------------
# hook edge cases
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision's ResNet
        return self.relu(out)


def test_inplace_relu_and_inplace_residual_add() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), Block(8), Block(8))
    x = torch.randn(16, 3, 8, 8)
    before = snapshot(model)
    report = gradprobe.probe(model, x, init="kaiming_normal", diagnose=False, gate_check=False)
    assert_untouched(model, before)
    relu = report["2.relu"]
    assert relu.calls == 2  # the block's ReLU is called twice
    assert relu.grad is not None and relu.grad.var > 0
    # the conv output was recorded before the in-place ReLU modified it: it has negative values
    assert report["2.conv1"].act.min < 0 and relu.act.min == 0.0
    # BatchNorm running stats were not touched
    assert torch.equal(model[2].bn1.running_mean, torch.zeros(8))
    assert int(model[2].bn1.num_batches_tracked) == 0


def test_inplace_hooks_see_the_gradient_of_the_value_the_module_produced() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    x = torch.randn(20, 6)
    report = gradprobe.probe(model, x, diagnose=False, gate_check=False)
    model2 = nn.Sequential(model[0], nn.ReLU(), model[2])  # same weights, out-of-place
    _, grads, _ = direct_capture(model2, x)
    assert rel(report["0"].grad.var, grads["0"].double().var(unbiased=False).item()) < 1e-6
    assert rel(report["1"].grad.var, grads["1"].double().var(unbiased=False).item()) < 1e-6


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"hidden": h, "logits": self.head(h)}


@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


class DataclassNet(DictNet):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        d = super().forward(x)
        return Output(loss=None, logits=d["logits"], hidden_states=(d["hidden"],))


@pytest.mark.parametrize("cls", [DictNet, DataclassNet])
def test_dict_and_dataclass_outputs_use_logits(cls: type[nn.Module]) -> None:
    torch.manual_seed(4)
    model = cls()
    report = gradprobe.probe(model, torch.randn(12, 5), diagnose=False, gate_check=False)
    assert report["head"].grad is not None
    assert report["head"].grad.var == pytest.approx(1 / 3, rel=0.5)  # unit energy over 3 outputs
    # functional relu after `body` is found by the run-time tracer
    assert report["body"].activation == "relu"
    # selecting the hidden state instead: the head then gets no gradient
    hidden = gradprobe.probe(
        model,
        torch.randn(12, 5),
        output="hidden" if cls is DictNet else (lambda o: o.hidden_states[0]),
        diagnose=False,
        gate_check=False,
    )
    assert hidden["head"].grad is None and hidden["head"].grad_missing == 0


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def test_lstm_tuple_output_and_integer_inputs() -> None:
    torch.manual_seed(5)
    model = LSTMNet()
    ids = torch.randint(0, 50, (8, 7))
    before = snapshot(model)
    report = gradprobe.probe(model, ids, init="orthogonal", diagnose=False, gate_check=False)
    assert_untouched(model, before)
    lstm = report["lstm"]
    assert lstm.output_shape == [8, 7, 24] and lstm.act.units == 24 and lstm.grad is not None
    assert {p.name for p in lstm.params} >= {"weight_ih_l0", "weight_hh_l1"}
    assert all(p.grad_rms and p.grad_rms > 0 for p in lstm.params)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(6):
            h = torch.tanh(self.shared(h))
        return self.head(h)


def test_shared_module_called_six_times_is_merged() -> None:
    torch.manual_seed(6)
    model = Shared()
    x = torch.randn(10, 4)
    report = gradprobe.probe(model, x, diagnose=False, gate_check=False)
    shared = report["shared"]
    assert shared.calls == 6 and shared.act.count == 6 * 10 * 16 and shared.grad.moments.calls == 6
    assert [x.name for x in report.layers] == ["inp", "shared", "head"]
    # merged statistic equals the statistic of all six outputs together
    outs = []
    h = model.inp(x)
    for _ in range(6):
        o = model.shared(h)
        outs.append(o)
        h = torch.tanh(o)
    allv = torch.cat(outs).detach().double()
    assert rel(shared.act.var, allv.var(unbiased=False).item()) < 1e-9


def test_frozen_submodule_still_passes_gradient() -> None:
    torch.manual_seed(7)
    model = mlp(4, 32)
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(16, 32)
    before = snapshot(model)
    report = gradprobe.probe(model, x, init="kaiming_normal", diagnose=False, gate_check=False)
    assert_untouched(model, before)
    first = report["0"]
    assert first.grad is not None  # the input is a leaf that requires grad: gradient reaches it
    assert first.param("weight").requires_grad is False and first.param("weight").grad_rms is None
    assert report["2"].param("weight").grad_rms > 0


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(7, 3)  # wrong in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x)))


def test_forward_raising_halfway_leaves_model_untouched_and_names_the_module() -> None:
    torch.manual_seed(8)
    model = Failing()
    model.a.weight.grad = torch.ones_like(model.a.weight)
    model.eval()
    x = torch.randn(4, 8)
    before = snapshot(model)
    with pytest.raises(ProbeError) as err:
        gradprobe.probe(model, x, init="xavier_uniform", diagnose=False)
    assert "`b`" in str(err.value) and "float32[4, 8]" in str(err.value) and "Linear" in str(err.value)
    assert_untouched(model, before)
    assert not model.training


def test_bf16_parameters_statistics_accurate() -> None:
    torch.manual_seed(9)
    model = mlp(3, 64).to(torch.bfloat16)
    x = torch.randn(64, 64).to(torch.bfloat16)
    report = gradprobe.probe(model, x, diagnose=False, gate_check=False)
    acts, grads, _ = direct_capture_bf16(model, x)
    for name in ("0", "1", "6"):
        assert rel(report[name].act.var, acts[name].double().var(unbiased=False).item()) < 1e-6
    assert report.meta["dtypes"] == ["bfloat16"]


def direct_capture_bf16(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict, dict]:
    acts: dict[str, torch.Tensor] = {}
    hs = [
        m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.detach().clone()))
        for n, m in model.named_children()
    ]
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    return acts, {}, {}


def test_parameter_free_and_non_float_outputs_are_counted_not_lost() -> None:
    class ArgMax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.argmax(-1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.pick = ArgMax()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            self.pick(y)
            return y

    report = gradprobe.probe(Net(), torch.randn(3, 4), diagnose=False, gate_check=False)
    assert report["pick"].outputs_skipped == 1 and report["pick"].act is None


# --------------------------------------------------------------------------------------------
# the model is sacred; determinism; JSON
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["keep", "default", "zeros", "kaiming_normal", "orthogonal"])
def test_model_untouched_for_every_kind_of_init(init: str) -> None:
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 36, 2)
    )
    model[5].weight.grad = torch.randn_like(model[5].weight)
    model[1].eval()
    random.seed(3)
    np.random.seed(4)
    x = torch.randn(8, 3, 8, 8)
    before = snapshot(model)
    gradprobe.probe(model, x, init=init, diagnose=False, gate_check=True)
    assert_untouched(model, before)


def test_same_inputs_same_seed_identical_report_and_seed_matters() -> None:
    model = mlp(3, 32, nn.Tanh)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    a = gradprobe.probe(model, x, init="xavier_normal", seed=3, diagnose=False, gate_check=False)
    b = gradprobe.probe(model, x, init="xavier_normal", seed=3, diagnose=False, gate_check=False)
    c = gradprobe.probe(model, x, init="xavier_normal", seed=4, diagnose=False, gate_check=False)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()


def test_json_round_trip_is_exact_and_contract_fields_present() -> None:
    torch.manual_seed(11)
    model = mlp(2, 16)
    r = gradprobe.probe(model, torch.randn(8, 16), init="kaiming_uniform", diagnose=False, gate_check=False)
    text = r.to_json()
    back = Report.from_json(text)
    assert back.to_json() == text
    import json

    d = json.loads(text)
    assert d["schema"] == "gradprobe.report/1"
    layer = d["layers"][0]
    assert {"name", "type", "act_var", "grad_var"} <= set(layer)
    assert "findings" in d and "verdict" in d
    assert d["meta"]["seed"] == 0 and d["meta"]["init"].startswith("kaiming_uniform")


def test_reports_from_two_processes_merge_exactly() -> None:
    model = mlp(2, 16, nn.Tanh)
    g = torch.Generator().manual_seed(12)
    x1, x2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    whole = gradprobe.probe(model, [x1, x2], diagnose=False, gate_check=False)
    a = gradprobe.probe(model, x1, diagnose=False, gate_check=False)
    b = gradprobe.probe(model, x2, diagnose=False, gate_check=False)
    merged = a.merge(b)
    for m, w in zip(merged.layers, whole.layers):
        assert rel(m.act.var, w.act.var) < 1e-12
        assert m.act.count == w.act.count


def test_overrides_by_glob_and_gain_from_runtime_activation() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.drop = nn.Dropout(0.0)
            self.b = nn.Linear(32, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.gelu(self.drop(self.a(x)))  # through dropout, functional
            x = torch.tanh(nn.functional.layer_norm(self.b(x), (32,)))  # through a norm
            return self.head(x)

    report = gradprobe.probe(
        Net(),
        torch.randn(8, 32),
        init="kaiming_normal",
        overrides={"head": "zeros"},
        diagnose=False,
        gate_check=False,
    )
    assert report["a"].activation == "gelu" and report["b"].activation == "tanh"
    assert report["head"].activation is None and report["head"].gain == 1.0
    assert report["b"].gain == pytest.approx(5 / 3)
    assert report["head"].param("weight").rms == 0.0 and report["head"].initializer.startswith("zeros")
    # kaiming with the gelu gain: Var = gain² / fan_in
    assert report["a"].param("weight").var == pytest.approx(report["a"].gain ** 2 / 32, rel=0.15)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match="unknown loss"):
        gradprobe.probe(mlp(1, 4), torch.randn(2, 4), loss="hinge")
    with pytest.raises(UsageError, match="valid"):
        gradprobe.probe(mlp(1, 4), torch.randn(2, 4), init="xavier")

    class Detaching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).detach()

    with pytest.raises(ProbeError, match="not differentiable"):
        gradprobe.probe(Detaching(), torch.randn(2, 4), diagnose=False)
    with pytest.raises(ProbeError, match="no floating-point tensor"):
        gradprobe.probe(nn.Flatten(), torch.randint(0, 3, (2, 4)), diagnose=False)


def test_initial_weights_are_not_the_inputs_drawn_from_the_same_seed() -> None:
    """Inputs from torch.Generator().manual_seed(0) and probe(seed=0): the probe's streams are
    derived from the seed (gradprobe.rng), so the first weight is not a scaled copy of the batch
    (it was, row for row, when the initializer's generator was seeded with the seed itself)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: object, output: torch.Tensor) -> None:
        seen.setdefault("weight", module.weight.detach().clone())

    handle = model[0].register_forward_hook(capture)
    try:
        report = gradprobe.probe(model, x, init="kaiming_normal", seed=0, diagnose=False)
    finally:
        handle.remove()
    w = seen["weight"]
    corr = torch.corrcoef(torch.stack([w.flatten(), x[:64].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    # and the first layer's output variance is what the theory says for independent weights,
    # fan_in·Var[w]·E[x²] = 2 (it was 2.46 with the clash)
    assert report["0"].act.var == pytest.approx(2.0, rel=0.1)  # type: ignore[union-attr]
    assert stream_seed(0, "init") != stream_seed(0, "loss")


def test_rng_docstring_examples() -> None:
    import doctest

    import gradprobe.rng

    assert doctest.testmod(gradprobe.rng).failed == 0


def test_an_override_that_names_a_norm_layer_sets_its_scale() -> None:
    """zeros on a named BatchNorm is the zero-γ residual recipe (γ = 0); constant:value=v gives γ = v;
    the default init (and any rule without a scale) leaves norms at the identity, as before."""
    from gradprobe import zoo

    model, x = zoo.example("resnet_style", batch=8, seed=0)
    before = snapshot(model)
    report = gradprobe.probe(
        model, x, init="kaiming_normal", overrides={"*.bn2": "zeros", "bn1": "constant:value=0.5"}, diagnose=False
    )
    assert_untouched(model, before)
    bn2 = [layer for layer in report.layers if layer.name.endswith(".bn2")]
    assert bn2 and all(layer.param("weight").rms == 0.0 for layer in bn2)
    assert all(layer.act.var == 0.0 for layer in bn2)  # type: ignore[union-attr]
    assert report["bn1"].param("weight").mean == 0.5 and report["bn1"].param("weight").var == 0.0
    others = [x for x in report.layers if x.type == "BatchNorm2d" and not x.name.endswith(".bn2") and x.name != "bn1"]
    assert others and all(x.param("weight").mean == 1.0 for x in others)
    plain = gradprobe.probe(model, x, init="zeros", overrides={"*.bn2": "kaiming_normal"}, diagnose=False)
    assert all(x.param("weight").mean == 1.0 for x in plain.layers if x.type == "BatchNorm2d")


def test_parameter_sums_over_batches_with_tied_and_frozen_parameters() -> None:
    """The parameter table (one kernel call for every weight, one per batch for every gradient):
    Σw, Σw² per parameter, Σ over batches of ‖∇‖² against autograd directly, a tied weight seen from
    both modules that own it, a frozen bias without a gradient."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    model[3].bias.requires_grad_(False)
    batches = [torch.randn(5, 6), torch.randn(7, 6)]

    def loss(y: torch.Tensor) -> torch.Tensor:
        return (y**2).sum()

    report = gradprobe.probe(model, batches, loss=loss, diagnose=False, gate_check=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    direct = {id(p): 0.0 for p in trainable}
    for b in batches:
        for p, g in zip(trainable, torch.autograd.grad(loss(model(b)), trainable)):
            direct[id(p)] += float(g.double().square().sum())
    owners = {"0": model[0], "2": model[2], "3": model[3]}
    for name, module in owners.items():
        for pname, p in module.named_parameters(recurse=False):
            rec = report[name].param(pname)
            w = p.detach().double()
            assert rec.mean == pytest.approx(float(w.mean()), rel=1e-12, abs=1e-15)
            assert rec.var == pytest.approx(float(w.var(unbiased=False)), rel=1e-12)
            if p.requires_grad:
                assert rec.grad_sq_sum == pytest.approx(direct[id(p)], rel=1e-12) and rec.batches == 2
            else:
                assert rec.grad_sq_sum is None and rec.grad_rms is None
    assert report["0"].param("weight").grad_sq_sum == report["2"].param("weight").grad_sq_sum
