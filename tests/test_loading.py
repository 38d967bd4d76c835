"""Loading what the command line names: input SPECs, factories, pickles, TorchScript, torch.export."""

from __future__ import annotations

import pickle
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.errors import UsageError
from gradprobe.loading import (
    ScriptedBlock,
    as_probe_inputs,
    load_model,
    make_inputs,
    parse_arg_values,
    parse_input_spec,
    parse_overrides,
)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small probes run fastest on one thread (and the suite shares two cores between workers)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Input SPECs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "kind", "shape", "options"),
    [
        ("8x3x224x224", None, "float", (8, 3, 224, 224), {}),
        ("float:4x16:std=0.5,mean=1", None, "float", (4, 16), {"std": 0.5, "mean": 1.0}),
        ("int:8x128:vocab=50257", None, "int", (8, 128), {"vocab": 50257, "low": 0, "high": 50257}),
        (
            "input_ids=int:8x128:vocab=1000",
            "input_ids",
            "int",
            (8, 128),
            {"vocab": 1000, "low": 0, "high": 1000},
        ),
        ("int:2x3:low=5:high=9:dtype=int32", None, "int", (2, 3), {"low": 5, "high": 9, "dtype": "int32"}),
        ("attention_mask=mask:8x128", "attention_mask", "mask", (8, 128), {}),
        ("x=float:2x2:dtype=float64", "x", "float", (2, 2), {"dtype": "float64"}),
    ],
)
def test_parse_input_spec(
    text: str, name: str | None, kind: str, shape: tuple[int, ...], options: dict
) -> None:
    spec = parse_input_spec(text)
    assert (spec.name, spec.kind, spec.shape, dict(spec.options)) == (name, kind, shape, options)


def test_parse_input_spec_files() -> None:
    assert parse_input_spec("batch.pt").kind == "file"
    spec = parse_input_spec("pixel_values=images.npy")
    assert (spec.name, spec.kind, spec.path) == ("pixel_values", "file", "images.npy")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("8by3", "expected a shape"),
        ("int:8x128", "needs a bound"),
        ("int:8x8:vocab=0", "empty id range"),
        ("float:8x8:vocab=3", "options for float inputs: mean, std, dtype"),
        ("8x8:dtype=complex", "unknown dtype"),
        ("int:8x8:vocab=ten", "bad number"),
    ],
)
def test_parse_input_spec_errors(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_input_spec(text)


def test_generated_inputs_are_deterministic_and_bounded() -> None:
    specs = ["16x8", "ids=int:16x32:vocab=7", "mask=mask:16x32"]
    a1, k1 = make_inputs(specs, seed=3)
    a2, k2 = make_inputs(specs, seed=3)
    a3, _ = make_inputs(specs, seed=4)
    assert torch.equal(a1[0], a2[0]) and torch.equal(k1["ids"], k2["ids"])
    assert not torch.equal(a1[0], a3[0])
    assert a1[0].dtype == torch.float32 and a1[0].shape == (16, 8)
    assert k1["ids"].dtype == torch.int64 and int(k1["ids"].min()) >= 0 and int(k1["ids"].max()) < 7
    assert torch.equal(k1["mask"], torch.ones(16, 32, dtype=torch.int64))
    # N(mean, std²) and the dtype options
    (x,), _ = make_inputs(["float:20000:mean=3:std=0.5:dtype=float64"], seed=0)
    assert x.dtype == torch.float64
    assert abs(float(x.mean()) - 3) < 0.02 and abs(float(x.std()) - 0.5) < 0.02
    (y,), _ = make_inputs(["4x4"], seed=0, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_input_files(tmp_path: Path) -> None:
    torch.save({"input_ids": torch.arange(6).reshape(2, 3)}, tmp_path / "kw.pt")
    torch.save((torch.ones(2, 3), torch.zeros(2)), tmp_path / "pos.pt")
    np.save(tmp_path / "x.npy", np.ones((2, 5)))  # float64 in numpy
    args, kwargs = make_inputs(["kw.pt"], base=tmp_path)
    assert args == () and torch.equal(kwargs["input_ids"], torch.arange(6).reshape(2, 3))
    args, _ = make_inputs(["pos.pt"], base=tmp_path)
    assert len(args) == 2 and args[0].shape == (2, 3)
    (x,), _ = make_inputs([str(tmp_path / "x.npy")])
    assert x.dtype == torch.float32 and x.shape == (2, 5)
    with pytest.raises(UsageError, match="input file not found"):
        make_inputs(["missing.pt"], base=tmp_path)
    with pytest.raises(UsageError, match="positional --input"):
        make_inputs(["a=2x2", "2x2"])


def test_input_file_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UsageError, match="weights_only=True"):
        make_inputs(["evil.pt"], base=tmp_path)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_arg_values_and_overrides() -> None:
    assert parse_arg_values(["depth=8", "act=relu", "dims=(2, 3)", "p=0.1", "flag=True", "name='x=y'"]) == {
        "depth": 8,
        "act": "relu",
        "dims": (2, 3),
        "p": 0.1,
        "flag": True,
        "name": "x=y",
    }
    with pytest.raises(UsageError, match="key=value"):
        parse_arg_values(["8"])
    assert parse_overrides(["head=zeros", "blocks.*.attn=normal:std=0.02"]) == {
        "head": "zeros",
        "blocks.*.attn": "normal:std=0.02",
    }
    with pytest.raises(UsageError, match="GLOB=INIT"):
        parse_overrides(["head"])


class _TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        return x * scale


def test_mixed_positional_and_keyword_inputs_bind_to_forward() -> None:
    x, m = torch.ones(2, 2), torch.zeros(2, 2)
    assert as_probe_inputs(_TwoInputs(), (x,), {}) is x
    assert as_probe_inputs(_TwoInputs(), (x, m), {}) == (x, m)
    bound = as_probe_inputs(_TwoInputs(), (x,), {"mask": m})
    assert set(bound) == {"x", "mask"} and bound["x"] is x
    with pytest.raises(UsageError, match="cannot pass"):
        as_probe_inputs(_TwoInputs(), (x,), {"nope": m})


# --------------------------------------------------------------------------------------------
# Factories and pickles
# --------------------------------------------------------------------------------------------

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.fc = nn.Linear(width, 2)

        def forward(self, x):
            return self.fc(x)

    def make(width=8):
        return Net(width)

    def with_inputs():
        return Net(), torch.randn(4, 8)

    def not_a_module():
        return 42

    def broken():
        raise ValueError("no weights here")

    instance = Net(3)
    """
)


def fc_in(module: nn.Module) -> int:
    fc = module.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    return fc.in_features


@pytest.fixture
def models_py(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def test_factory_forms(models_py: Path) -> None:
    loaded = load_model(f"{models_py}:make", args={"width": 5})
    assert isinstance(loaded.module, nn.Module) and fc_in(loaded.module) == 5
    assert loaded.kind == "factory" and loaded.example_inputs is None
    assert loaded.location is not None and loaded.location[0].endswith("models.py")
    loaded = load_model("models.py:with_inputs", base=models_py.parent)
    assert loaded.example_inputs.shape == (4, 8)
    assert fc_in(load_model(f"{models_py}:Net", args={"width": 6}).module) == 6  # a class
    assert fc_in(load_model(f"{models_py}:instance").module) == 3  # an instance


def test_package_module_factory(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg_for_gradprobe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODELS)
    loaded = load_model("mypkg_for_gradprobe.nets:make", base=tmp_path)
    assert fc_in(loaded.module) == 8


@pytest.mark.parametrize(
    ("spec", "args", "fragment"),
    [
        ("{py}:nope", {}, "no factory 'nope' in .*callables there: Net, make, with_inputs"),
        ("{py}:not_a_module", {}, r"returned 42 \(int\), not a torch.nn.Module"),
        ("{py}:broken", {}, "factory 'broken' raised ValueError: no weights here"),
        ("{py}:make", {"depth": 3}, "unexpected keyword argument 'depth'.*signature is make\\(width=8\\)"),
        ("{dir}/absent.py:make", {}, "model file not found"),
        ("{py}", {}, "name the factory"),
        ("{dir}/absent.pt", {}, "model file not found"),
        ("no_such_package_xyz.mod:make", {}, "cannot import module 'no_such_package_xyz.mod'"),
    ],
)
def test_factory_errors(models_py: Path, spec: str, args: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        load_model(spec.format(py=models_py, dir=models_py.parent), args=args)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, path)  # torch.save's zip format, a code-running payload inside
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker)))  # a bare pickle
    for p in (path, raw):
        with pytest.raises(UsageError, match="refuses.*--trust-pickle"):
            load_model(str(p))
    assert not marker.exists()

    net = nn.Sequential(nn.Linear(3, 2))
    torch.save(net, tmp_path / "full.pt")
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_model(str(tmp_path / "full.pt"))
    loaded = load_model(str(tmp_path / "full.pt"), trust_pickle=True)
    assert isinstance(loaded.module, nn.Sequential) and loaded.kind == "pickle"

    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UsageError, match="state dict"):
        load_model(str(tmp_path / "sd.pt"))


# --------------------------------------------------------------------------------------------
# TorchScript and torch.export
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class TopNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        Block(),
        nn.Sequential(nn.Linear(16, 16), nn.GELU()),
        nn.LayerNorm(16),
        nn.Linear(16, 4),
    )


def _act_vars(report) -> dict[str, float]:
    return {x.name: x.act_var for x in report.layers}


def test_torchscript_sequential_is_unrolled_and_matches_eager(tmp_path: Path) -> None:
    from gradprobe.api import load_target, probe_loaded
    from gradprobe.probing import probe

    eager = _seq()
    torch.jit.script(eager).save(str(tmp_path / "seq.pt"))
    loaded, inputs = load_target(str(tmp_path / "seq.pt"), ["32x8"])
    assert loaded.kind == "torchscript" and loaded.opaque == ["2"]
    assert isinstance(loaded.module[2], ScriptedBlock) and isinstance(loaded.module[3][0], nn.Linear)
    report = probe_loaded(loaded, inputs, diagnose=False)
    reference = probe(eager, inputs, diagnose=False, include=["2"])
    # Same weights, same inputs: the same numbers wherever both measured a layer.
    got, want = _act_vars(report), _act_vars(reference)
    assert set(got) == set(want) - {"2.fc"}  # inside the scripted block nothing can be seen
    for name, value in got.items():
        assert value == pytest.approx(want[name], rel=1e-5), name
    assert report["2"].type == "Block" and report.meta["opaque_layers"] == ["2"]
    assert "opaque" in report.meta["notes"][0]


def test_torchscript_with_scripted_forward_is_one_opaque_layer(tmp_path: Path) -> None:
    from gradprobe.api import load_target, probe_loaded

    torch.jit.script(TopNet()).save(str(tmp_path / "net.pt"))
    loaded, inputs = load_target(str(tmp_path / "net.pt"), ["16x8"])
    assert loaded.opaque == ["model"]
    report = probe_loaded(loaded, inputs)
    assert [x.name for x in report.layers] == ["model"] and report.meta["model"] == "TopNet"
    assert "only the model's output is measured" in report.meta["notes"][0]
    assert any(f.code == "opaque_model" for f in report.findings)


def test_traced_leaf_that_cannot_be_rebuilt_faithfully_stays_opaque(tmp_path: Path) -> None:
    from gradprobe.api import load_target

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.3), nn.Linear(8, 2))
    torch.jit.trace(net, torch.randn(2, 8)).save(str(tmp_path / "traced.pt"))
    # A trace keeps no constants: LeakyReLU is rebuilt with the default slope, the check against
    # the archive's own output catches it, and it is measured opaquely instead.
    loaded, _ = load_target(str(tmp_path / "traced.pt"), ["16x8"])
    assert loaded.opaque == ["1"] and isinstance(loaded.module[1], ScriptedBlock)
    assert isinstance(loaded.module[0], nn.Linear) and isinstance(loaded.module[2], nn.Linear)


def test_scripted_block_uses_the_probes_parameters(tmp_path: Path) -> None:
    """The probe swaps initialised parameters in: an opaque block must compute with them."""
    scripted = torch.jit.script(Block())
    block = ScriptedBlock(scripted, "Block")
    x = torch.randn(4, 16)
    before = block(x)
    original = block._parameters["fc__weight"]
    block._parameters["fc__weight"] = nn.Parameter(torch.zeros(16, 16))
    block._parameters["fc__bias"], saved_bias = nn.Parameter(torch.zeros(16)), block._parameters["fc__bias"]
    assert torch.equal(block(x), x)  # tanh(0) = 0: the residual alone
    block._parameters["fc__weight"], block._parameters["fc__bias"] = original, saved_bias
    assert torch.equal(block(x), before)
    assert torch.equal(scripted(x), before)  # the scripted module got its own tensors back


def test_export_program_probes_every_layer(tmp_path: Path) -> None:
    from gradprobe.api import load_target, probe_loaded
    from gradprobe.probing import probe

    eager = _seq()
    example = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(eager, (example,)), str(tmp_path / "seq.pt2"))
    loaded, inputs = load_target(str(tmp_path / "seq.pt2"))  # the archive's example inputs
    assert loaded.kind == "export" and torch.equal(inputs, example)
    # standard leaves were rebuilt eagerly (initializers recognise them); the block's graph was not
    assert isinstance(loaded.module.get_submodule("0"), nn.Linear)
    assert isinstance(loaded.module.get_submodule("4"), nn.LayerNorm)
    assert type(loaded.module.get_submodule("2")).__name__ == "InterpreterModule"
    initialised = probe_loaded(loaded, inputs, init="kaiming_normal", diagnose=False)
    assert initialised.meta["kept_as_built"] == [] and initialised["0"].initializer.startswith(
        "kaiming_normal"
    )
    report = probe_loaded(loaded, inputs, diagnose=False)
    reference = probe(eager, example, diagnose=False)
    assert [x.name for x in report.layers] == [x.name for x in reference.layers]
    assert [x.type for x in report.layers] == [x.type for x in reference.layers]
    for a, b in zip(report.layers, reference.layers):
        assert a.act_var == pytest.approx(b.act_var, rel=1e-5) and a.grad_var == pytest.approx(
            b.grad_var, rel=1e-5
        )
    assert report.meta["model"] == "Sequential"
    with pytest.raises(UsageError, match="equal to 32, but got 16") as info:
        load_target(str(tmp_path / "seq.pt2"), ["16x8"])
    assert "specialised to the shapes" in (info.value.hint or "")
