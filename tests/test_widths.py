"""Width sweeps (μP-style coordinate checks): a readout initialised with std 1 instead of 1/√fan_in
is flagged (its output grows like √width, at init and after steps), a correctly scaled network
passes; under Adam with a width-independent learning rate, the standard parametrization's hidden
activations grow with width after a few steps although they are flat at init (Yang et al. 2021)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradprobe.errors import UsageError
from gradprobe.widths import SLOPE_THRESHOLD, add_widths_parser, fit_slope, run_widths, width_sweep

WIDTHS = [64, 128, 256, 512]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def mlp(width: int, readout_std: float | None = None) -> nn.Sequential:
    """Input 32 → width → width → 10, PyTorch's default init (1/√fan_in scale) unless the readout
    is given a fixed std."""
    head = nn.Linear(width, 10)
    if readout_std is not None:
        nn.init.normal_(head.weight, std=readout_std)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), head)


def x() -> torch.Tensor:
    return torch.randn(128, 32, generator=torch.Generator().manual_seed(1))


def test_mis_scaled_readout_is_flagged_and_only_it() -> None:
    sweep = width_sweep(lambda width: mlp(width, readout_std=1.0), x(), values=WIDTHS, steps=3, lr=0.01)
    assert sweep.phases == ["init", "after 3 steps"]
    init = sweep.flagged("init")
    assert [(t.name, t.direction) for t in init] == [("4", "grows")]
    assert 0.35 < init[0].slope < 0.75  # type: ignore[operator]  # √width, ± the spread of 10 units
    assert "4" in [t.name for t in sweep.flagged("after 3 steps")]
    assert not sweep.passed
    assert "4 (Linear) grows like width^" in sweep.summary()


def test_correctly_scaled_network_passes() -> None:
    sweep = width_sweep(mlp, x(), values=WIDTHS, steps=3, lr=0.01)
    assert sweep.passed, sweep.summary()
    hidden = [t for p in sweep.phases for t in sweep.trends[p] if t.name != "4"]
    assert all(t.slope is not None and abs(t.slope) < 0.1 for t in hidden)
    assert len(sweep.reports["init"]) == len(WIDTHS) == len(sweep.reports["after 3 steps"])


def test_adam_with_a_fixed_learning_rate_is_not_width_stable() -> None:
    """The coordinate check's classic finding: flat at init, growing after a few Adam steps (each
    weight moves by ≈ lr, so a hidden pre-activation moves by ≈ lr·width)."""
    sweep = width_sweep(mlp, x(), values=WIDTHS, steps=3, optimizer="adam", lr=0.01)
    assert not sweep.flagged("init")
    grown = {t.name: t.slope for t in sweep.flagged("after 3 steps")}
    assert "2" in grown and grown["2"] > 0.5  # type: ignore[operator]


def test_init_option_and_example_inputs() -> None:
    """A factory may return (model, inputs); ``init`` re-initialises before the steps."""

    def factory(width: int) -> tuple[nn.Module, torch.Tensor]:
        return mlp(width, readout_std=1.0), x()

    sweep = width_sweep(factory, values=[64, 256], steps=1, init="kaiming_normal")
    assert sweep.passed, sweep.summary()  # kaiming gives the readout Var = 1/fan_in
    with pytest.raises(UsageError, match="no inputs"):
        width_sweep(mlp, values=[64, 256], steps=0)
    with pytest.raises(UsageError, match="two distinct"):
        width_sweep(mlp, x(), values=[64], steps=0)


def test_fit_slope_and_plot(tmp_path: Path) -> None:
    assert fit_slope([64, 128, 256], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert fit_slope([64, 128, 256], [0.0, None, 4.0]) is None
    assert SLOPE_THRESHOLD == 0.25
    sweep = width_sweep(lambda width: mlp(width, readout_std=1.0), x(), values=[64, 256], steps=1)
    figure = sweep.plot()
    assert len(figure.axes) == 2 and "flagged" in figure.axes[0].get_title()
    figure.savefig(tmp_path / "widths.png")
    assert (tmp_path / "widths.png").stat().st_size > 1000


FACTORY = """
import torch
from torch import nn

def make(width=64, readout_std=None):
    torch.manual_seed(0)
    head = nn.Linear(width, 10)
    if readout_std is not None:
        nn.init.normal_(head.weight, std=readout_std)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), head)
"""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gradprobe")
    add_widths_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_widths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    common = ["--values", "64,128,256", "--input", "128x32", "--steps", "1", "--width", "160"]
    assert run_widths(parse(["widths", f"{path}:make", *common])) == 0
    assert "all width-stable" in capsys.readouterr().out
    plot = tmp_path / "w.png"
    code = run_widths(
        parse(["widths", f"{path}:make", *common, "--arg", "readout_std=1.0", "--plot", str(plot)])
    )
    assert code == 1 and plot.exists()
    assert "grows like width^0.5" in capsys.readouterr().out
    with pytest.raises(UsageError, match="conflicts"):
        run_widths(parse(["widths", f"{path}:make", *common, "--arg", "width=3"]))
