"""Width sweeps: the coordinate check that a parametrization is width-stable (Yang et al. 2021, μP).

:func:`width_sweep` builds the model at several widths, probes each at initialization and again
after a few optimizer steps, and fits, per layer, the slope of ``log(activation scale)`` against
``log(width)``. In a width-stable parametrization every layer's typical activation is Θ(1) in the
width: the slope is 0. A layer whose scale grows or shrinks like a power of the width is flagged
when ``|slope| > threshold`` (default :data:`SLOPE_THRESHOLD`). The mis-scalings this catches have
slopes of ±1/2 or ±1: a readout initialised with std 1 instead of 1/√fan_in grows like √width at
init (slope 1/2); under a width-independent Adam learning rate (standard parametrization) hidden
activations move by Θ(lr·width) in one step (slope → 1 once the update dominates).

The activation scale is the root mean square of the layer's outputs (``act.rms``) over the batch,
the quantity μP's coordinate checks plot (they use the mean absolute value; the two differ by a
constant factor for any fixed distribution).

>>> import torch
>>> from torch import nn
>>> def make(width: int) -> nn.Module:
...     torch.manual_seed(0)
...     readout = nn.Linear(width, 1)
...     nn.init.normal_(readout.weight, std=1.0)   # mis-scaled: should be 1/sqrt(width)
...     return nn.Sequential(nn.Linear(16, width), nn.ReLU(), readout)
>>> x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
>>> sweep = width_sweep(make, x, values=[64, 256, 1024], steps=0)
>>> [(t.name, round(t.slope, 1)) for t in sweep.flagged()]
[('2', 0.5)]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from gradprobe.errors import UsageError
from gradprobe.rng import stream_seed

if TYPE_CHECKING:  # torch loads inside the functions: `gradprobe --help` must stay light
    import torch
    from torch import nn

    from gradprobe.report import Report

__all__ = [
    "SLOPE_THRESHOLD",
    "OPTIMIZERS",
    "LayerTrend",
    "WidthSweep",
    "width_sweep",
    "fit_slope",
    "add_widths_parser",
    "run_widths",
]

#: A layer is flagged when its activation scale changes like width^slope with |slope| above this:
#: halfway between 0 (width-stable) and the ±1/2 of the mildest mis-scaling (a 1/√fan_in factor).
#: Across 64…512 a correct layer's finite-width noise moves the fitted slope by ≲ 0.05.
SLOPE_THRESHOLD = 0.25

#: Optimizers for the steps, by name (``torch.optim.SGD``, ``torch.optim.Adam``); a callable
#: ``(model, width) -> Optimizer`` is accepted too (per-layer learning rates such as μP's).
OPTIMIZERS = ("sgd", "adam")

OptimizerSpec: TypeAlias = "str | Callable[[nn.Module, int], torch.optim.Optimizer]"


@dataclass
class LayerTrend:
    """One layer in one phase: its activation scale at each width and the fitted slope."""

    name: str
    type: str
    phase: str  # "init" or "after N steps"
    scales: list[float | None]  # per width, in the order of WidthSweep.values; None: not recorded
    slope: float | None  # d log(scale) / d log(width); None with fewer than 2 usable widths
    flagged: bool

    @property
    def direction(self) -> str:
        """``"grows"``, ``"shrinks"`` or ``"stable"`` with the width."""
        if not self.flagged or self.slope is None:
            return "stable"
        return "grows" if self.slope > 0 else "shrinks"


@dataclass
class WidthSweep:
    """The result of :func:`width_sweep`: per-phase layer trends and the reports behind them."""

    param: str
    values: list[int]
    steps: int
    threshold: float
    trends: dict[str, list[LayerTrend]] = field(default_factory=dict)  # phase → layers in order
    reports: dict[str, list[Report]] = field(default_factory=dict)  # phase → one report per width

    @property
    def phases(self) -> list[str]:
        return list(self.trends)

    def flagged(self, phase: str | None = None) -> list[LayerTrend]:
        """Flagged layers, of one phase or of all."""
        phases = [phase] if phase is not None else self.phases
        return [t for p in phases for t in self.trends.get(p, []) if t.flagged]

    @property
    def passed(self) -> bool:
        """True when no layer's scale changes with width beyond the threshold in any phase."""
        return not self.flagged()

    def summary(self) -> str:
        """One line per phase, then one per flagged layer."""
        lines = []
        for phase in self.phases:
            bad = self.flagged(phase)
            lines.append(
                f"{phase}: {len(self.trends[phase])} layers, "
                + (
                    f"{len(bad)} change with {self.param}"
                    if bad
                    else f"all width-stable (|slope| ≤ {self.threshold:g})"
                )
            )
            for t in bad:
                lines.append(f"  {t.name} ({t.type}) {t.direction} like {self.param}^{t.slope:.2f}")
        return "\n".join(lines)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
        table.add_column("phase", no_wrap=True)
        table.add_column("layer", no_wrap=True)
        table.add_column("type", no_wrap=True)
        for v in self.values:
            table.add_column(f"{self.param}={v}", justify="right", no_wrap=True)
        table.add_column("slope", justify="right", no_wrap=True)
        table.add_column("", no_wrap=True)
        for phase in self.phases:
            for t in self.trends[phase]:
                style = "bold red" if t.flagged else ""
                table.add_row(
                    phase,
                    t.name,
                    t.type,
                    *["—" if s is None else f"{s:.3g}" for s in t.scales],
                    "—" if t.slope is None else f"{t.slope:+.2f}",
                    t.direction if t.flagged else "",
                    style=style,
                )
        yield table
        yield self.summary()

    def __repr__(self) -> str:
        return (
            f"WidthSweep({self.param}={self.values}, steps={self.steps}, "
            f"flagged={[(t.phase, t.name) for t in self.flagged()]})"
        )

    def plot(self, *, max_labels: int = 8) -> Any:
        """Each layer's activation scale against width, log-log, one panel per phase; flagged layers
        in colour and labelled, the others grey. Returns a matplotlib Figure."""
        from matplotlib.figure import Figure

        phases = self.phases
        figure = Figure(figsize=(5.0 * max(1, len(phases)), 4.0), layout="constrained")
        axes = figure.subplots(1, max(1, len(phases)), squeeze=False)[0]
        colours = [
            "tab:red",
            "tab:orange",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "tab:cyan",
            "tab:blue",
        ]
        for ax, phase in zip(axes, phases):
            labelled = 0
            for t in self.trends[phase]:
                points = [
                    (v, s)
                    for v, s in zip(self.values, t.scales)
                    if s is not None and s > 0 and math.isfinite(s)
                ]
                if len(points) < 2:
                    continue
                xs, ys = zip(*points)
                if t.flagged:
                    label = f"{t.name} ({t.slope:+.2f})" if labelled < max_labels else None
                    ax.plot(
                        xs, ys, "o-", color=colours[labelled % len(colours)], lw=1.8, label=label, zorder=3
                    )
                    labelled += 1
                else:
                    ax.plot(xs, ys, "-", color="0.6", lw=0.8, alpha=0.7, zorder=2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(self.values, [str(v) for v in self.values])
            ax.set_xlabel(self.param)
            ax.set_ylabel("activation scale (RMS)")
            flagged = sum(1 for t in self.trends[phase] if t.flagged)
            ax.set_title(
                f"{phase}: {flagged} layer{'s' * (flagged != 1)} flagged (|slope| > {self.threshold:g})"
            )
            if labelled:
                ax.legend(fontsize=8, loc="best")
            ax.grid(True, which="both", alpha=0.3)
        return figure


def fit_slope(values: Sequence[float], scales: Sequence[float | None]) -> float | None:
    """Least-squares slope of ``log(scale)`` against ``log(value)`` over the usable points (finite,
    positive); None with fewer than two."""
    points = [
        (math.log(v), math.log(s))
        for v, s in zip(values, scales)
        if s is not None and s > 0 and math.isfinite(s)
    ]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def _build(factory: Callable[..., Any], param: str, value: int, seed: int) -> tuple[nn.Module, Any]:
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        # a stream of its own: built under manual_seed(seed) itself, the weights would repeat the
        # numbers of inputs drawn from torch.Generator().manual_seed(seed) (the CLI's --input)
        torch.manual_seed(stream_seed(seed, "widths-build"))
        made = factory(**{param: value})
    example = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, example = made
    if not isinstance(made, nn.Module):
        raise UsageError(
            f"the factory returned {type(made).__name__} for {param}={value}, not an nn.Module",
            hint="return the model, or (model, example_inputs)",
        )
    return made, example


def _inputs(inputs_for_width: Any, value: int, example: Any, param: str) -> Any:
    import torch
    from torch import nn

    if callable(inputs_for_width) and not isinstance(inputs_for_width, (torch.Tensor, nn.Module)):
        return inputs_for_width(value)
    if inputs_for_width is not None:
        return inputs_for_width
    if example is None:
        raise UsageError(
            f"no inputs for {param}={value}",
            hint="pass inputs_for_width (a callable width -> inputs, or fixed inputs), or let the factory "
            "return (model, example_inputs)",
        )
    return example


def _optimizer(spec: OptimizerSpec, model: nn.Module, value: int, lr: float) -> torch.optim.Optimizer:
    if callable(spec) and not isinstance(spec, str):
        return spec(model, value)
    import torch

    if spec not in OPTIMIZERS:
        raise UsageError(
            f"unknown optimizer {spec!r}; valid: {', '.join(OPTIMIZERS)} or a callable (model, width)"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[spec](trainable, lr=lr)


def _train(
    model: nn.Module,
    inputs: Any,
    steps: int,
    optimizer: OptimizerSpec,
    lr: float,
    value: int,
    seed: int,
    output: Any,
) -> None:
    """``steps`` optimizer steps on an MSE loss against fixed N(0, 1) targets (our own model instance)."""
    import torch

    from gradprobe.hooks import select_output
    from gradprobe.probing import normalize_batches

    args, kwargs = normalize_batches(inputs)[0]
    optim = _optimizer(optimizer, model, value, lr)
    generator = torch.Generator().manual_seed(stream_seed(seed, "widths-target"))
    target = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "dropout"))
        model.train()
        for _ in range(steps):
            out = select_output(model(*args, **kwargs), output)
            if out is None or not out.is_floating_point():
                raise UsageError(
                    "the model's output has no floating-point tensor to train on", hint="pass output=…"
                )
            if target is None:
                target = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out)
            loss = torch.nn.functional.mse_loss(out, target)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()


def _trends(reports: list[Report], values: list[int], phase: str, threshold: float) -> list[LayerTrend]:
    order: list[tuple[str, str]] = []
    scales: dict[str, list[float | None]] = {}
    for i, report in enumerate(reports):
        for layer in report.layers:
            if layer.name not in scales:
                scales[layer.name] = [None] * len(reports)
                order.append((layer.name, layer.type))
            if layer.act is not None and math.isfinite(layer.act.rms):
                scales[layer.name][i] = layer.act.rms
    out = []
    for name, kind in order:
        slope = fit_slope(values, scales[name])
        out.append(
            LayerTrend(name, kind, phase, scales[name], slope, slope is not None and abs(slope) > threshold)
        )
    return out


def width_sweep(
    factory: Callable[..., Any],
    inputs_for_width: Any = None,
    *,
    param: str = "width",
    values: Sequence[int] = (64, 128, 256, 512),
    steps: int = 3,
    optimizer: OptimizerSpec = "sgd",
    lr: float = 0.01,
    init: Any = "keep",
    seed: int = 0,
    threshold: float = SLOPE_THRESHOLD,
    output: Any = None,
    **probe_options: Any,
) -> WidthSweep:
    """Probe ``factory(**{param: v})`` at each width ``v`` at init and after ``steps`` optimizer steps;
    flag layers whose activation scale changes with width.

    Args:
        factory: called as ``factory(**{param: value})`` with the global RNG seeded from ``seed``
            (:func:`gradprobe.rng.stream_seed`; the caller's RNG is left alone); returns a module
            or ``(module, example_inputs)``.
        inputs_for_width: a callable ``value -> inputs``, fixed inputs for every width, or None to
            use the factory's example inputs. Any form :func:`gradprobe.probe` accepts.
        param, values: the factory keyword that sets the width and the widths (at least two; four
            spanning 8× or more give a steady slope).
        steps: optimizer steps before the second probe (0: init only). The steps train each width's
            own freshly built model on an MSE loss against fixed random N(0, 1) targets.
        optimizer, lr: ``"sgd"`` or ``"adam"`` with a learning rate that is the same at every width
            (what a width-stable parametrization must tolerate), or a callable ``(model, width) ->
            Optimizer`` (e.g. μP's per-layer learning rates).
        init: the initializer the sweep measures (default ``"keep"``: the factory's own
            parametrization); another spec is applied to the built model before the steps.
        seed: seeds the factory, the initializer, the targets and the probes.
        threshold: flag a layer when ``|slope| > threshold``.
        output: which part of the model output the losses use (as for :func:`gradprobe.probe`).
        **probe_options: passed to every :func:`gradprobe.probe` (``loss``, ``mode``, …).
    """
    from gradprobe.probing import probe

    widths = [int(v) for v in values]
    if len(widths) < 2 or len(set(widths)) != len(widths) or min(widths) < 1:
        raise UsageError(f"need at least two distinct positive widths, got {list(values)!r}")
    if steps < 0:
        raise UsageError(f"steps must be ≥ 0, got {steps!r}")
    if not (threshold > 0):
        raise UsageError(f"threshold must be > 0, got {threshold!r}")
    probe_options.setdefault("diagnose", False)
    for key in ("init", "seeds"):
        if key in probe_options:
            raise UsageError(
                f"width_sweep does not pass {key!r} to the probe", hint="use width_sweep's own init"
            )
    phases = ["init"] + ([f"after {steps} step{'s' * (steps != 1)}"] if steps else [])
    reports: dict[str, list[Report]] = {p: [] for p in phases}
    for value in widths:
        model, example = _build(factory, param, value, seed)
        inputs = _inputs(inputs_for_width, value, example, param)
        reports["init"].append(probe(model, inputs, init=init, seed=seed, output=output, **probe_options))
        if steps:
            if not (isinstance(init, str) and init == "keep"):
                from gradprobe.fixing import initialised_state_dict

                mode = probe_options.get("mode", "train")
                model.load_state_dict(initialised_state_dict(model, inputs, init, seed=seed, mode=mode))
            _train(model, inputs, steps, optimizer, lr, value, seed, output)
            reports[phases[1]].append(
                probe(model, inputs, init="keep", seed=seed, output=output, **probe_options)
            )
    sweep = WidthSweep(param=param, values=widths, steps=steps, threshold=float(threshold), reports=reports)
    for phase in phases:
        sweep.trends[phase] = _trends(reports[phase], widths, phase, float(threshold))
    return sweep


# --------------------------------------------------------------------------------------------
# Command line: `gradprobe widths MODEL --param width --values 64,128,256,512`
# --------------------------------------------------------------------------------------------


def _parse_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"bad --values {text!r}", hint="comma-separated integers, e.g. 64,128,256,512"
        ) from None
    if len(values) < 2:
        raise UsageError(f"--values needs at least two widths, got {text!r}", hint="e.g. 64,128,256,512")
    return values


def add_widths_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gradprobe widths`` to the CLI's subparsers."""
    from gradprobe import cli

    p = subparsers.add_parser(
        "widths",
        help="coordinate check: does each layer's activation scale stay put as the width grows?",
        description="Build the factory MODEL at each width (--param keyword, --values), probe it at init and "
        "after a few optimizer steps, fit log(activation scale) against log(width) per layer, and flag "
        f"layers with |slope| > {SLOPE_THRESHOLD:g}. Exit 0 when none is flagged, 1 when one is.",
    )
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or package.module:factory")
    p.add_argument("--param", default="width", help="the factory keyword that sets the width (default width)")
    p.add_argument("--values", required=True, metavar="A,B,C", help="widths, e.g. 64,128,256,512")
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="optimizer steps before the second probe (default 3; 0: init only)",
    )
    p.add_argument(
        "--optimizer", choices=tuple(OPTIMIZERS), default="sgd", help="optimizer for the steps (default sgd)"
    )
    p.add_argument(
        "--lr", type=float, default=0.01, help="learning rate, the same at every width (default 0.01)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=SLOPE_THRESHOLD,
        help=f"flag |slope| above this (default {SLOPE_THRESHOLD:g})",
    )
    p.add_argument("--plot", metavar="PATH", help="save the log-log plot (PNG, SVG, PDF by extension)")
    p.add_argument("--width", type=int, metavar="N", help="console width (default: the terminal's)")
    cli._add_model_options(p)
    cli._add_debug(p)
    return p


def run_widths(args: argparse.Namespace) -> int:
    """``gradprobe widths``: the table, the plot; exit 0 when no layer is flagged, 1 otherwise."""
    from gradprobe import cli
    from gradprobe.api import load_target
    from gradprobe.loading import parse_arg_values

    values = _parse_values(args.values)
    options = cli._probe_options(args)
    init = options.pop("init", "keep")
    seed = options.pop("seed", 0)
    if "overrides" in options:
        raise UsageError(
            "--override is not supported by widths", hint="set the parametrization in the factory"
        )
    output = options.pop("output", None)
    fixed_args = parse_arg_values(args.args)
    if args.param in fixed_args:
        raise UsageError(
            f"--arg {args.param}=… conflicts with --param {args.param}", hint="the sweep sets it"
        )
    plots = cli._plot_module() if args.plot else None
    loaded_inputs: dict[int, Any] = {}

    def factory(**kw: Any) -> nn.Module:
        value = int(kw[args.param])
        loaded, inputs = load_target(
            args.model,
            args.inputs,
            args={**fixed_args, args.param: value},
            seed=seed,
            dtype=args.dtype,
            trust_pickle=bool(args.trust_pickle),
        )
        loaded_inputs[value] = inputs
        return loaded.module  # type: ignore[no-any-return]

    sweep = width_sweep(
        factory,
        lambda value: loaded_inputs[value],
        param=args.param,
        values=values,
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        init=init,
        seed=seed,
        threshold=args.threshold,
        output=output,
        **options,
    )
    console = cli._console(args)
    console.print(sweep)
    if plots is not None:
        cli._save_figure(sweep.plot(), args.plot)
        cli._written("the plot", args.plot)
    return cli.EXIT_OK if sweep.passed else cli.EXIT_FAILED
