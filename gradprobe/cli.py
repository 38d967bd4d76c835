"""The ``gradprobe`` command: a thin shell that parses, calls the library, renders, sets the exit code.

Verbs: ``probe`` (one model, one initializer: the report), ``compare`` (one model, several
initializers, ranked), ``check`` (the CI gate), ``inits`` (the initializers), ``demo`` (a bundled
example with a real finding and its fix). docs/cli.md documents each with real output.

Exit codes: 0 ran (``check``: and passed); 1 ``check`` found a failing finding; 2 a usage, loading or
probing error (one line on stderr, with a hint); 3 an internal error (a bug: rerun with ``--debug``).

Nothing heavy is imported at module level (torch, rich, matplotlib load inside the commands), so
``gradprobe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradprobe import __version__
from gradprobe.errors import GradprobeError, UsageError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
_MAX_MESSAGE = 600  # characters of one error line; --debug shows everything


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: … (hint: …)``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message}", hint=f"{self.prog} --help", prog=self.prog)
        raise SystemExit(EXIT_USAGE)


def _print_error(message: str, *, hint: str | None = None, prog: str = "gradprobe") -> None:
    text = " ".join(message.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 1] + "…"
    if hint and "(hint:" not in text:
        text += f" (hint: {' '.join(hint.split())})"
    print(f"{prog}: error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

_MODEL_HELP = (
    "path/to/file.py:factory, package.module:factory, a TorchScript archive, a torch.export "
    "program (.pt2), or a pickled module (with --trust-pickle)"
)
_INPUT_HELP = (
    "model input; repeat for several positional inputs. SPEC: [NAME=][float|int|mask:]SHAPE[:key=value…] "
    "or a .pt/.npy file, e.g. 8x3x224x224, int:8x128:vocab=50257, attention_mask=mask:8x128, batch.pt"
)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument(
        "--threads", type=int, metavar="N", default=argparse.SUPPRESS,
        help="torch CPU threads (default: torch's; demo: 1). One thread is often fastest for the probe's "
        "many small reductions, and much faster on a busy machine",
    )  # fmt: skip


def _add_model_options(p: argparse.ArgumentParser, *, init: bool = True) -> None:
    g = p.add_argument_group("model and inputs")
    g.add_argument(
        "--input", "-i", dest="inputs", action="append", default=[], metavar="SPEC", help=_INPUT_HELP
    )
    g.add_argument(
        "--arg", "-a", dest="args", action="append", default=[], metavar="KEY=VALUE",
        help="factory keyword argument; VALUE is a Python literal (a bare word is a string)",
    )  # fmt: skip
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        default=None,
        help="allow loading a fully pickled model (runs code in the file)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64", "float16", "bfloat16"),
        help="cast the model and floating inputs",
    )
    g.add_argument("--device", help="probe on this device, e.g. cuda:0 (default: the model's)")
    o = p.add_argument_group("probe")
    if init:
        o.add_argument(
            "--init",
            help="initializer, e.g. kaiming_normal or normal:std=0.02 (see `gradprobe inits`; default: keep)",
        )
    o.add_argument(
        "--override", dest="overrides", action="append", default=[], metavar="GLOB=INIT",
        help="initializer for modules matching a name glob, e.g. head=zeros",
    )  # fmt: skip
    o.add_argument("--seed", type=int, help="seeds the model build, inputs, initializer and loss (default 0)")
    o.add_argument(
        "--loss", choices=("randn", "mse", "ce"), help="how the backward pass is seeded (default randn)"
    )
    o.add_argument("--mode", choices=("train", "eval"), help="module mode during the probe (default train)")
    o.add_argument(
        "--output",
        dest="output_selector",
        metavar="KEY",
        help="which part of a tuple/dict output the loss uses",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _add_seeds_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="repeat over N initializations (seeds SEED..SEED+N-1): gains as mean and spread, "
        "errors by majority (default 1)",
    )


def _add_report_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the report as JSON (the core report schema)")
    g.add_argument("--plot", metavar="PATH", help="save a plot (PNG, SVG, PDF by extension)")
    g.add_argument("--width", type=int, metavar="N", help="console width (default: the terminal's)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (imports nothing heavy)."""
    parser = _Parser(
        prog="gradprobe",
        description="Will this network train from this initialization? Measure signal propagation at init and get a verdict.",
        epilog="Exit codes: 0 ran/passed, 1 check failed, 2 usage or loading error, 3 internal error. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"gradprobe {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("probe", help="probe one model under one initializer and show the report",
                       description="Probe MODEL under an initializer: per-layer table, findings, suggestions. Exit 0 when it ran.")  # fmt: skip
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    _add_model_options(p)
    _add_seeds_option(p)
    _add_report_options(p)
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per layer")
    p.add_argument("--max-rows", type=int, metavar="N", help="elide the middle of tables longer than N rows")
    _add_debug(p)

    c = sub.add_parser("compare", help="rank several initializers on one model",
                       description="Probe MODEL under each initializer and rank them (verdict, worst gain, findings).")  # fmt: skip
    c.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    c.add_argument(
        "--inits",
        required=True,
        metavar="A,B,C",
        help="comma-separated initializers, e.g. xavier_normal,kaiming_normal",
    )
    _add_model_options(c, init=False)
    _add_seeds_option(c)
    _add_report_options(c)
    _add_debug(c)

    k = sub.add_parser("check", help="CI gate: fail when a model is unstable at init",
                       description="Probe the models named here or in [tool.gradprobe] of pyproject.toml. "
                       "Exit 0 when no finding fails the gate, 1 when one does, 2 on usage or loading errors.")  # fmt: skip
    k.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"models to check instead of the table's ({_MODEL_HELP})"
    )
    k.add_argument("--config", metavar="PYPROJECT", help="pyproject.toml to read (default: the nearest one)")
    _add_model_options(k)
    g = k.add_argument_group("gate")
    g.add_argument(
        "--fail-on", choices=("error", "warning", "info"), help="lowest severity that fails (default error)"
    )
    g.add_argument(
        "--allow", action="append", default=[], metavar="CODE", help="finding code that never fails the gate"
    )
    g.add_argument(
        "--baseline", metavar="FILE", help="also fail when a layer's profile drifts from this stored report"
    )
    g.add_argument("--update-baseline", action="store_true", help="write the baseline from this run")
    g.add_argument(
        "--drift-decades", type=float, metavar="X", help="allowed drift from the baseline (default 1.0)"
    )
    g.add_argument("--junit", metavar="PATH", help="write JUnit XML")
    g.add_argument("--width", type=int, metavar="N", help="console width")
    _add_debug(k)

    i = sub.add_parser(
        "inits",
        help="list the initializers",
        description="List the initializers with one line and formula each.",
    )
    i.add_argument("--width", type=int, metavar="N", help="console width")
    _add_debug(i)

    d = sub.add_parser("demo", help="probe a bundled 30-layer ReLU MLP: a real finding and its fix",
                       description="Probe gradprobe.zoo.demo_model() with xavier_normal (signal vanishes), then with the fix.")  # fmt: skip
    d.add_argument("--width", type=int, metavar="N", help="console width")
    _add_debug(d)

    from gradprobe.fixing import add_fix_parser
    from gradprobe.widths import add_widths_parser

    add_fix_parser(sub)
    add_widths_parser(sub)
    return parser


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _console(ns: argparse.Namespace, *, stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(width=getattr(ns, "width", None), stderr=stderr, highlight=False)


def check_inits(specs: Sequence[str]) -> None:
    """Fail fast, before any model is loaded, on an initializer spec the registry does not know."""
    from gradprobe.initializers import resolve_initializer

    for spec in specs:
        try:
            resolve_initializer(spec)
        except GradprobeError as e:
            raise UsageError(
                e.message, hint=e.hint or "`gradprobe inits` lists them with their formulas"
            ) from e


def _probe_options(ns: argparse.Namespace) -> dict[str, Any]:
    from gradprobe.loading import parse_overrides

    check_inits([ns.init] if getattr(ns, "init", None) else [])
    options: dict[str, Any] = {"seed": ns.seed or 0}
    if getattr(ns, "init", None):
        options["init"] = ns.init
    if ns.overrides:
        options["overrides"] = parse_overrides(ns.overrides)
        check_inits(list(options["overrides"].values()))
    if ns.loss:
        options["loss"] = ns.loss
    if ns.mode:
        options["mode"] = ns.mode
    if ns.device:
        options["device"] = ns.device
    if ns.output_selector is not None:
        sel = ns.output_selector
        options["output"] = int(sel) if sel.lstrip("-").isdigit() else sel
    if getattr(ns, "seeds", None):
        options["seeds"] = ns.seeds
    return options


def _load(ns: argparse.Namespace) -> tuple[Any, Any]:
    from gradprobe.api import load_target
    from gradprobe.loading import parse_arg_values

    return load_target(
        ns.model,
        ns.inputs,
        args=parse_arg_values(ns.args),
        seed=ns.seed or 0,
        dtype=ns.dtype,
        trust_pickle=bool(ns.trust_pickle),
    )


def _plot_module() -> Any:
    os.environ.setdefault("MPLBACKEND", "Agg")  # a command line never opens a window
    try:
        import gradprobe.render.plots as plots
    except ImportError as e:
        raise UsageError(
            f"--plot is not available: gradprobe.render.plots could not be imported ({e})",
            hint="run without --plot, or install gradprobe with its plotting module",
        ) from e
    return plots


def _save_figure(figure: Any, path: str) -> None:
    try:
        figure.savefig(path, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot save the plot to {path}: {e}") from e


def _shown_path(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _written(what: str, path: str) -> None:
    print(f"wrote {what} to {path}", file=sys.stderr)


def _write_text(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"cannot write {what} to {path}: {e.strerror or e}") from e
    _written(what, path)


def split_inits(text: str) -> list[str]:
    """``"xavier_normal,normal:mean=0,std=0.02,orthogonal"`` → three initializer specs: a chunk
    ``key=value`` continues the options of the spec before it."""
    specs: list[str] = []
    for chunk in (c.strip() for c in text.split(",")):
        if not chunk:
            continue
        head = chunk.split(":", 1)[0]
        if specs and "=" in head:
            specs[-1] += "," + chunk
        else:
            specs.append(chunk)
    return specs


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _cmd_probe(ns: argparse.Namespace) -> int:
    from gradprobe.api import probe_loaded
    from gradprobe.render.console import render_report

    options = _probe_options(ns)
    plots = _plot_module() if ns.plot else None
    loaded, inputs = _load(ns)
    report = probe_loaded(loaded, inputs, **options)
    _console(ns).print(render_report(report, max_rows=ns.max_rows))
    if ns.json:
        _write_text(ns.json, report.to_json() + "\n", "the report (JSON)")
    if ns.csv:
        from gradprobe.render.csv import to_csv

        _write_text(ns.csv, to_csv(report), "the per-layer CSV")
    if plots is not None:
        _save_figure(plots.plot_report(report), ns.plot)
        _written("the plot", ns.plot)
    return EXIT_OK


def _cmd_compare(ns: argparse.Namespace) -> int:
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from gradprobe.api import probe_loaded, rank
    from gradprobe.render.console import render_compare

    inits = split_inits(ns.inits)
    if not inits:
        raise UsageError("--inits is empty", hint="e.g. --inits xavier_normal,kaiming_normal,orthogonal")
    if len(set(inits)) != len(inits):
        raise UsageError("an initializer appears twice in --inits", hint="name each once")
    check_inits(inits)
    plots = _plot_module() if ns.plot else None
    options = _probe_options(ns)
    loaded, inputs = _load(ns)
    reports = []
    progress_console = _console(ns, stderr=True)
    progress = Progress(
        TextColumn("[bold]probing[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=progress_console,
        transient=True,
        disable=not progress_console.is_terminal,  # no bar in CI logs or pipes
    )
    with progress:
        task = progress.add_task(inits[0], total=len(inits))
        for init in inits:
            progress.update(task, description=init)
            reports.append(probe_loaded(loaded, inputs, init=init, **options))
            progress.advance(task)
    console = _console(ns)
    head = reports[0].meta
    title = Text(str(head.get("model", "model")), style="bold")
    title.append(f" · {len(inits)} initializers · seed {head.get('seed')} · batch {head.get('batch_size')}")
    console.print(title)
    console.print(render_compare(reports, labels=inits))
    best = rank(reports)[0]
    line = Text("best: ")
    line.append(inits[reports.index(best)], style="bold")
    line.append(f" ({best.verdict})")
    console.print(line)
    if ns.json:
        payload = {"schema": "gradprobe.compare/1", "inits": inits, "reports": [r.to_dict() for r in reports]}
        _write_text(ns.json, json.dumps(payload, indent=1, allow_nan=False) + "\n", "the reports (JSON)")
    if plots is not None:
        _save_figure(plots.plot_compare(reports, labels=inits), ns.plot)
        _written("the plot", ns.plot)
    return EXIT_OK


def _cmd_check(ns: argparse.Namespace) -> int:
    from rich.text import Text

    from gradprobe import gate
    from gradprobe.loading import parse_arg_values, parse_overrides
    from gradprobe.render.console import render_findings

    pyproject: Path | None
    if ns.config:
        pyproject = Path(ns.config)
        if not pyproject.is_file():
            raise UsageError(f"config file not found: {ns.config}", hint="--config names a pyproject.toml")
    else:
        pyproject = gate.find_pyproject()
        if pyproject is None and not ns.models:
            raise UsageError(
                "no pyproject.toml here or above, and no MODEL given",
                hint="name models (gradprobe check file.py:factory) or add [tool.gradprobe] to pyproject.toml",
            )
    cli = {
        "inputs": ns.inputs or None,
        "args": parse_arg_values(ns.args) or None,
        "init": ns.init,
        "overrides": parse_overrides(ns.overrides) or None,
        "seed": ns.seed,
        "loss": ns.loss,
        "mode": ns.mode,
        "dtype": ns.dtype,
        "device": ns.device,
        "trust_pickle": ns.trust_pickle,
        "allow": ns.allow or None,
        "fail_on": ns.fail_on,
        "baseline": ns.baseline,
        "drift_decades": ns.drift_decades,
    }
    if ns.output_selector is not None:
        raise UsageError("--output is not supported by check", hint="use gradprobe probe --output")
    if pyproject is not None and ns.models and not ns.config:
        # Named models use the table's defaults when there is one, but need none.
        data_has_table = "gradprobe" in gate._load_toml(pyproject).get("tool", {})
        pyproject = pyproject if data_has_table else None
    config = gate.read_config(pyproject, models=ns.models, cli=cli)
    check_inits(
        sorted({c.init for c in config.checks} | {v for c in config.checks for v in c.overrides.values()})
    )
    if ns.update_baseline and config.baseline is None:
        raise UsageError(
            "--update-baseline needs a file",
            hint='pass --baseline FILE or set baseline = "…" in [tool.gradprobe]',
        )
    baseline = None
    if config.baseline is not None and not ns.update_baseline:
        baseline = gate.read_baseline(config.baseline)

    console = _console(ns)

    def show(result: gate.CheckResult) -> None:
        line = Text()
        if result.error is not None:
            line.append("! ", style="bold red")
            line.append(result.check.label, style="bold")
            line.append(f"  could not probe: {result.error}")
            console.print(line)
            return
        report = result.report
        errors = sum(1 for f in result.findings if f.severity == "error")
        warnings = sum(1 for f in result.findings if f.severity == "warning")
        line.append("✓ " if result.passed else "✗ ", style="bold green" if result.passed else "bold red")
        line.append(result.check.label, style="bold")
        line.append(f"  {report.verdict or 'not diagnosed'}  init {result.check.init}")
        line.append(
            f"  ({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})  {result.seconds:.1f} s",
            style="dim",
        )
        console.print(line)
        if result.failing:
            console.print(
                render_findings(report, result.failing, title=f"{result.check.label}: failing findings")
            )

    results = gate.run_checks(config, baseline=baseline, on_result=show)
    code = gate.exit_code(results)
    failed = sum(1 for r in results if not r.passed)
    summary = {0: "passed", 1: "failed", 2: "could not run"}[code]
    console.print(f"gradprobe check {summary}: {len(results)} model(s), {failed} not passing")
    if ns.update_baseline and config.baseline is not None:
        n = gate.write_baseline(config.baseline, results)
        _written(f"the baseline ({n} model(s))", _shown_path(config.baseline))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in gate.github_annotations(results, config.root):
            print(line)
        summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_path:
            with open(summary_path, "a", encoding="utf-8") as f:
                f.write(gate.step_summary(results))
    if ns.junit:
        _write_text(ns.junit, gate.junit_xml(results), "JUnit XML")
    sys.stdout.flush()
    return code


def _cmd_inits(ns: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from gradprobe.initializers import INITIALIZERS

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("what it does", overflow="fold")
    table.add_column("formula", overflow="fold")
    for key, value in INITIALIZERS.items():
        name = getattr(value, "name", key)
        table.add_row(name, str(getattr(value, "summary", "")), str(getattr(value, "formula", "")))
    console = _console(ns)
    console.print(table)
    console.print(
        "Options: name:key=value,key=value, e.g. normal:std=0.02 or kaiming_normal:mode=fan_out",
        style="dim",
    )
    return EXIT_OK


def _cmd_demo(ns: argparse.Namespace) -> int:
    import torch

    from gradprobe.api import compare
    from gradprobe.render.console import render_compare, render_report
    from gradprobe.zoo import demo_model

    made = demo_model()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if inputs is None:
        width = next(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
        inputs = torch.randn(128, width, generator=torch.Generator().manual_seed(0))
    console = _console(ns)
    inits = ["xavier_normal", "kaiming_normal"]
    reports = compare(model, inputs, inits, seed=0)
    depth = sum(1 for m in model.modules() if isinstance(m, torch.nn.ReLU))
    width = next(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    console.rule(f"[bold]1. a ReLU MLP, {depth} hidden layers of width {width}, under xavier_normal")
    console.print(render_report(reports[0], max_rows=16))
    console.rule("[bold]2. the fix: kaiming_normal (gain √2 for ReLU)")
    console.print(render_report(reports[1], max_rows=16))
    console.rule("[bold]3. side by side")
    console.print(render_compare(reports, labels=inits))
    console.print(
        "Try it on your model: [bold]gradprobe probe path/to/model.py:make_model --input 32x784 --init kaiming_normal[/]"
    )
    return EXIT_OK


def _cmd_fix(ns: argparse.Namespace) -> int:
    from gradprobe.fixing import run_fix

    return run_fix(ns)


def _cmd_widths(ns: argparse.Namespace) -> int:
    from gradprobe.widths import run_widths

    return run_widths(ns)


_COMMANDS = {
    "probe": _cmd_probe,
    "compare": _cmd_compare,
    "check": _cmd_check,
    "inits": _cmd_inits,
    "demo": _cmd_demo,
    "fix": _cmd_fix,
    "widths": _cmd_widths,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = bool(getattr(ns, "debug", False))
    threads = getattr(ns, "threads", 1 if ns.command == "demo" else None)
    previous_threads = None
    try:
        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be ≥ 1, got {threads}")
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        return _COMMANDS[ns.command](ns)
    except GradprobeError as e:
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(e.message, hint=e.hint or f"gradprobe {ns.command} --help")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradprobe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(
            f"internal error: {type(e).__name__}: {e}",
            hint="rerun with --debug for the traceback, and please report it",
        )
        return EXIT_INTERNAL
    finally:
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)
