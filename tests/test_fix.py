"""``gradprobe.fix``: the recommended initializer (or LSUV) is verified by probing, its parameters are
exactly those the verifying probe measured, the user's model is never modified, and the CLI verb
prints before/after and writes the file."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradprobe.errors import UsageError
from gradprobe.fixing import add_fix_parser, fix, initialised_state_dict, run_fix, save_state_dict
from gradprobe.probing import probe

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tanh_mlp(depth: int = 24, width: int = 64) -> nn.Sequential:
    """PyTorch's default init: tanh signal shrinks ≈ 3× per layer (REFERENCE #2)."""
    torch.manual_seed(0)
    return nn.Sequential(
        *[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())], nn.Linear(width, 10)
    )


def batch(width: int = 64) -> torch.Tensor:
    return torch.randn(128, width, generator=torch.Generator().manual_seed(7))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fix_applies_the_recommendation_and_verifies_it(tmp_path: Path) -> None:
    model, x = tanh_mlp(), batch()
    before = snapshot(model)
    out = tmp_path / "fixed.pt"
    result = fix(model, x, out=out, seed=3)
    assert result.before.verdict == "unstable" and result.passed and result.changed
    assert result.initializer == "xavier_normal" and result.after is not None
    assert result.tried == [("xavier_normal", "stable")]
    assert result.format == "torch" and result.path == str(out)
    # The user's model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The file holds exactly what the verifying probe measured: probing a copy that loads it
    # (init="keep") gives the same statistics.
    loaded = torch.load(out)
    assert set(loaded) == set(model.state_dict())
    twin = copy.deepcopy(model)
    twin.load_state_dict(loaded)
    again = probe(twin, x, seed=3)
    assert again.verdict == "stable"
    assert [a.act.var for a in again.layers] == pytest.approx(
        [a.act.var for a in result.after.layers], rel=1e-6
    )  # type: ignore[union-attr]
    assert (
        "before (keep): unstable" in result.summary() and "after (xavier_normal): stable" in result.summary()
    )


def test_lsuv_when_the_recommendation_fails() -> None:
    model, x = tanh_mlp(), batch()
    result = fix(model, x, candidates=["zeros", "lsuv"])
    assert [spec for spec, _ in result.tried] == ["zeros", "lsuv"]
    assert result.tried[0][1] == "unstable" and result.initializer == "lsuv" and result.passed
    assert result.after is not None and result.after.meta["init"] == "lsuv"
    state = result.state_dict
    assert state is not None and state["0.bias"].abs().max() == 0  # orthonormal start: zero biases


def test_nothing_to_fix_writes_nothing(tmp_path: Path) -> None:
    model = tanh_mlp(depth=3)
    result = fix(model, batch(), init="xavier_normal", out=tmp_path / "w.pt")
    assert result.passed and not result.changed and result.after is None and result.state_dict is None
    assert not (tmp_path / "w.pt").exists()
    with pytest.raises(UsageError, match="nothing to save"):
        result.save(tmp_path / "w.pt")


def test_no_candidate_passes_keeps_the_best_and_writes_nothing(tmp_path: Path) -> None:
    result = fix(tanh_mlp(), batch(), candidates=["zeros", "normal:std=1e-3"], out=tmp_path / "w.pt")
    assert (
        not result.passed
        and result.state_dict is not None
        and result.initializer in ("zeros", "normal:std=1e-3")
    )
    assert not (tmp_path / "w.pt").exists()


def test_initialised_state_dict_matches_the_probe_and_keeps_buffers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    model.eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    state = initialised_state_dict(model, x, "kaiming_normal", seed=4)
    assert not model.training  # the mode is restored
    assert torch.equal(state["1.running_mean"], model[1].running_mean)  # buffers: the model's own
    assert state["0.weight"].var().item() * 16 == pytest.approx(2.0, rel=0.2)
    assert not torch.equal(state["0.weight"], model[0].weight)
    report = probe(model, x, init="kaiming_normal", seed=4, diagnose=False)
    assert report["0"].param("weight").var == pytest.approx(
        state["0.weight"].double().var(unbiased=False).item(), rel=1e-9
    )  # type: ignore[union-attr]


def test_save_formats(tmp_path: Path) -> None:
    state = {"w": torch.ones(2, 2)}
    assert save_state_dict(state, tmp_path / "a.pth") == "torch"
    assert torch.equal(torch.load(tmp_path / "a.pth")["w"], state["w"])
    try:
        import safetensors  # noqa: F401
    except ImportError:
        assert save_state_dict(state, tmp_path / "a.bin") == "torch"
        assert save_state_dict(state, tmp_path / "weights") == "torch"
        with pytest.raises(UsageError, match="safetensors package is not installed"):
            save_state_dict(state, tmp_path / "a.safetensors")
    else:  # pragma: no cover - depends on the environment
        assert save_state_dict(state, tmp_path / "a.safetensors") == "safetensors"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gradprobe")
    add_fix_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fixed.pt"
    models = str(TESTS / "cli_models.py")
    code = run_fix(
        parse(["fix", f"{models}:unstable", "--input", "256x64", "--out", str(out), "--width", "120"])
    )
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "before: keep" in text and "after: kaiming_normal" in text and "fixed with kaiming_normal" in text
    # A model that passes as given: exit 0, nothing written.
    out2 = tmp_path / "again.pt"
    assert run_fix(parse(["fix", f"{models}:stable", "--input", "256x64", "--out", str(out2)])) == 0
    assert not out2.exists() and "nothing to fix" in capsys.readouterr().out
    # No candidate passes: exit 1.
    code = run_fix(
        parse(["fix", f"{models}:unstable", "--input", "256x64", "--out", str(out2), "--candidates", "zeros"])
    )
    assert code == 1 and not out2.exists() and "no candidate passes" in capsys.readouterr().out
    # A file that cannot be written fails before any probing.
    with pytest.raises(UsageError, match="does not exist"):
        run_fix(
            parse(["fix", f"{models}:unstable", "--input", "256x64", "--out", str(tmp_path / "no" / "w.pt")])
        )
