"""``gradprobe.fix``: find an initializer under which the model passes, verify it, write its weights.

The steps, each a probe (:func:`gradprobe.probe`), so the user's model is never modified:

1. probe the model as given (``init="keep"`` by default): the *before* report;
2. if it is unstable, try the initializer the diagnosis recommends
   (:func:`gradprobe.diagnose.suggested_init`), then LSUV (:mod:`gradprobe.lsuv`), which makes every
   Linear/Conv output variance 1 on the data whatever the architecture;
3. the first candidate whose probe is stable is the fix: the *after* report;
4. its parameters — bit for bit those the verifying probe measured, produced by the probe's own
   initialisation machinery with the same seed (:func:`initialised_state_dict`) — are returned as a
   state dict and written with safetensors when it is installed, else ``torch.save``.

Load the result with ``model.load_state_dict(torch.load(path))`` (or ``safetensors.torch.load_file``).

>>> import torch
>>> from gradprobe.fixing import fix
>>> net = torch.nn.Sequential(*[m for _ in range(20) for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())])
>>> x = torch.randn(128, 64, generator=torch.Generator().manual_seed(7))
>>> result = fix(net, x)   # PyTorch's default init: tanh signal vanishes
>>> result.before.verdict, result.initializer, result.after.verdict
('unstable', 'xavier_normal', 'stable')
>>> sorted(result.state_dict)[:2]
['0.bias', '0.weight']
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradprobe.errors import UsageError

if TYPE_CHECKING:  # torch loads inside the functions: `gradprobe --help` must stay light
    import torch
    from torch import nn

    from gradprobe.report import Report

__all__ = [
    "FixResult",
    "fix",
    "initialised_state_dict",
    "save_state_dict",
    "add_fix_parser",
    "run_fix",
]

#: Tried when the recommended initializer does not pass (or there is none).
FALLBACK = "lsuv"

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _ensure_lsuv_registered() -> None:
    import gradprobe.lsuv  # noqa: F401 - registers `lsuv` (until gradprobe.initializers imports it)


# --------------------------------------------------------------------------------------------
# The initialised tensors, from the probe's own machinery
# --------------------------------------------------------------------------------------------


def initialised_state_dict(
    model: nn.Module,
    inputs: Any,
    init: Any,
    *,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    mode: str = "train",
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict ``model`` would have under ``init``: exactly the parameters that
    ``gradprobe.probe(model, inputs, init=init, seed=seed, overrides=overrides, mode=mode)`` measures,
    on the CPU, with the model's own buffers. The model is left untouched.

    It runs the probe's initialisation steps (fresh tensors, activation tracing for the gains, the
    per-module initializer, data-dependent initializers such as LSUV on the first batch) with the
    probe's seeding, inside the probe's guard that restores every module's mode and the global RNG
    states. Keys are those of ``model.state_dict()`` (of the module inside DDP/``torch.compile``
    wrappers); tensors shared between several keys are copied once per key.
    """
    _ensure_lsuv_registered()
    from gradprobe.initializers import InitPlan
    from gradprobe.probing import ProbeConfig, _Session, normalize_batches, preserved_global_state, unwrap

    if mode not in ("train", "eval"):
        raise UsageError(f"unknown mode {mode!r}; valid: train, eval")
    plan = InitPlan.from_spec(init, overrides)
    module = unwrap(model)
    batches = normalize_batches(inputs)
    config = ProbeConfig(init=init, overrides=overrides, seed=seed, mode=mode, device=device)
    with preserved_global_state(module):
        # The same steps, in the same order, as _Session.run up to the measuring passes.
        session = _Session(module, plan, config)
        module.train(mode == "train")
        params, buffers = session._new_tensors()
        prepared = [session._prepare(b) for b in batches]
        fresh = {k: v.clone() for k, v in buffers.items()}
        if not session.keep:
            session._trace_activations(prepared[0], fresh)
            fresh = {k: v.clone() for k, v in buffers.items()}
        session._initialise(params, fresh, prepared[0])
    state: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        source = params.get(id(value), value) if params is not None else value
        state[key] = source.detach().to("cpu", copy=True).contiguous()
    return state


def _safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_out_path(path: str | Path) -> None:
    """Fail before any probing when the file cannot be written the way its name asks."""
    target = Path(path)
    if target.suffix.lower() == ".safetensors" and not _safetensors_available():
        raise UsageError(
            f"cannot write {target}: the safetensors package is not installed",
            hint="pip install safetensors, or name the file *.pt to write it with torch.save",
        )
    if not target.parent.exists():
        raise UsageError(f"cannot write {target}: the directory {target.parent} does not exist")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> str:
    """Write ``state`` to ``path``; return the format used, ``"safetensors"`` or ``"torch"``.

    ``.safetensors`` files need the safetensors package; ``.pt``, ``.pth``, ``.bin`` and ``.ckpt``
    files are written with ``torch.save``; any other name gets safetensors when it is installed,
    else ``torch.save``.
    """
    import torch

    target = Path(path)
    suffix = target.suffix.lower()
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if suffix == ".safetensors" and save_file is None:
        raise UsageError(
            f"cannot write {target}: the safetensors package is not installed",
            hint="pip install safetensors, or name the file *.pt to write it with torch.save",
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        if save_file is not None and suffix not in _TORCH_SUFFIXES:
            save_file(tensors, str(target))
            return "safetensors"
        torch.save(tensors, target)
    except OSError as e:
        raise UsageError(f"cannot write the state dict to {target}: {e.strerror or e}") from e
    return "torch"


# --------------------------------------------------------------------------------------------
# fix()
# --------------------------------------------------------------------------------------------


@dataclass
class FixResult:
    """What :func:`fix` found.

    Attributes:
        before: the report of the model as given.
        after: the report under the chosen initializer (None when the model already passed).
        initializer: the chosen initializer spec (None when the model already passed).
        passed: whether the model passes now (already before, or after the fix).
        tried: every candidate probed, with its verdict, in order.
        state_dict: the chosen initializer's parameters (and the model's buffers), or None.
        path, format: where and how the state dict was written, when it was.
        candidates: the reports of every candidate tried, by spec.
    """

    before: Report
    after: Report | None = None
    initializer: str | None = None
    passed: bool = False
    tried: list[tuple[str, str | None]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None
    path: str | None = None
    format: str | None = None
    candidates: dict[str, Report] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """True when an initializer was chosen (the model did not pass as given)."""
        return self.initializer is not None

    def save(self, path: str | Path) -> str:
        """Write the state dict (see :func:`save_state_dict`); return the format used."""
        if self.state_dict is None:
            raise UsageError("nothing to save: the model passed as given, so no initializer was chosen")
        self.format = save_state_dict(self.state_dict, path)
        self.path = str(path)
        return self.format

    def summary(self) -> str:
        """A few lines: before → after, what was tried, where the weights went."""
        before = _describe(self.before)
        lines = [f"before ({self.before.meta.get('init', '?')}): {before}"]
        if self.after is None:
            lines.append(
                "the model passes as given: nothing to fix" if self.passed else "no candidate passed"
            )
        else:
            lines.append(f"after ({self.initializer}): {_describe(self.after)}")
        if len(self.tried) > 1 or (self.tried and not self.passed):
            lines.append("tried: " + ", ".join(f"{spec} → {verdict}" for spec, verdict in self.tried))
        if self.path is not None:
            lines.append(f"wrote the state dict ({self.format}) to {self.path}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        after = None if self.after is None else self.after.verdict
        return (
            f"FixResult(before={self.before.verdict!r}, initializer={self.initializer!r}, after={after!r}, "
            f"passed={self.passed})"
        )


def _describe(report: Report) -> str:
    from gradprobe.api import worst_gain

    errors = sorted({f.code for f in report.findings if f.severity == "error"})
    gain = worst_gain(report)
    text = f"{report.verdict or 'not diagnosed'}"
    if gain is not None:
        text += f", worst gain {gain}"
    if errors:
        text += f", errors: {', '.join(errors)}"
    return text


def _candidates(before: Report, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        chosen = [str(c) for c in given]
        if not chosen:
            raise UsageError(
                "no candidate initializers given", hint="e.g. candidates=['kaiming_normal', 'lsuv']"
            )
        return chosen
    from gradprobe.diagnose import suggested_init

    suggestion = suggested_init(before)
    out = [suggestion] if suggestion else []
    if FALLBACK not in out:
        out.append(FALLBACK)
    return out


def fix(
    model: nn.Module,
    inputs: Any,
    *,
    candidates: Sequence[str] | None = None,
    out: str | Path | None = None,
    init: Any = "keep",
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    mode: str = "train",
    device: str | torch.device | None = None,
    **options: Any,
) -> FixResult:
    """Probe ``model``; if it is unstable, find an initializer under which it is stable and return
    (and with ``out``, write) its parameters. ``model`` itself is never modified.

    Args:
        model, inputs: as for :func:`gradprobe.probe`.
        candidates: initializer specs to try in order; default: the diagnosis's recommendation
            (:func:`gradprobe.diagnose.suggested_init`), then ``lsuv``.
        out: write the chosen state dict here (safetensors when installed, else ``torch.save``);
            written only when a candidate passes.
        init: how the model is probed *before* (default ``"keep"``: its weights as built).
        seed, overrides, mode, device: as for :func:`gradprobe.probe`; ``overrides`` apply to the
            candidates too (e.g. keep a deliberately zero head: ``{"head": "keep"}``).
        **options: other :func:`gradprobe.probe` options (``loss``, ``output``, ``thresholds`` …).

    Returns:
        a :class:`FixResult`. When no candidate passes, ``after``, ``initializer`` and
        ``state_dict`` describe the best one (``gradprobe.api.rank``) and ``passed`` is False.
    """
    _ensure_lsuv_registered()
    from gradprobe.api import rank
    from gradprobe.probing import Batches, normalize_batches, probe

    for key in ("diagnose", "suggest", "seeds"):
        if key in options:
            raise UsageError(f"fix does not take {key!r}", hint="fix always diagnoses one seed per candidate")
    if out is not None:
        _check_out_path(out)
    batches = Batches(normalize_batches(inputs))  # an iterator of batches is read once
    common = dict(seed=seed, mode=mode, device=device, **options)
    before = probe(model, batches, init=init, overrides=overrides, **common)
    result = FixResult(before=before, passed=before.verdict == "stable")
    if result.passed:
        return result
    reports: dict[str, Report] = {}
    for spec in _candidates(before, candidates):
        if spec in reports:
            continue
        report = probe(model, batches, init=spec, overrides=overrides, **common)
        reports[spec] = report
        result.tried.append((spec, report.verdict))
        if report.verdict == "stable":
            break
    result.candidates = reports
    best = rank(list(reports.values()))[0]
    spec = next(s for s, r in reports.items() if r is best)
    result.after, result.initializer = best, spec
    result.passed = best.verdict == "stable"
    result.state_dict = initialised_state_dict(
        model, batches, spec, seed=seed, overrides=overrides, mode=mode, device=device
    )
    if out is not None and result.passed:
        result.save(out)
    return result


# --------------------------------------------------------------------------------------------
# Command line: `gradprobe fix MODEL --out FILE`
# --------------------------------------------------------------------------------------------


def add_fix_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gradprobe fix`` to the CLI's subparsers (model and probe options as ``gradprobe probe``)."""
    from gradprobe import cli

    p = subparsers.add_parser(
        "fix",
        help="find an initializer under which the model passes and write its weights",
        description="Probe MODEL; if it is unstable, try the recommended initializer, then LSUV, verify each "
        "by probing, and write the first that passes as a state dict (safetensors when installed, else "
        "torch.save). Exit 0 when the model passes (as given or fixed), 1 when no candidate passes.",
    )
    p.add_argument("model", metavar="MODEL", help=cli._MODEL_HELP)
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="where to write the state dict")
    p.add_argument(
        "--candidates",
        metavar="A,B",
        help=f"initializers to try in order (default: the recommended one, then {FALLBACK})",
    )
    cli._add_model_options(p)
    p.add_argument("--width", type=int, metavar="N", help="console width (default: the terminal's)")
    cli._add_debug(p)
    return p


def run_fix(args: argparse.Namespace) -> int:
    """``gradprobe fix``: print before/after, write the state dict; the exit code (0 passes, 1 not)."""
    from rich.text import Text

    from gradprobe import cli
    from gradprobe.render.console import render_compare

    _ensure_lsuv_registered()
    candidates = cli.split_inits(args.candidates) if args.candidates else None
    if candidates is not None:
        cli.check_inits(candidates)
    options = cli._probe_options(args)
    loaded, inputs = cli._load(args)
    result = fix(loaded.module, inputs, candidates=candidates, out=args.out, **options)
    for report in (result.before, *result.candidates.values()):
        loaded.annotate(report)  # original type names, notes (TorchScript, torch.export)
    console = cli._console(args)
    reports = [result.before] + ([result.after] if result.after is not None else [])
    labels = [f"before: {result.before.meta.get('init', 'keep')}"] + (
        [f"after: {result.initializer}"] if result.after is not None else []
    )
    console.print(render_compare(reports, labels=labels))
    line = Text()
    if result.after is None:
        line.append("passes as given: nothing to fix, nothing written", style="bold green")
    elif result.passed:
        line.append(f"fixed with {result.initializer}", style="bold green")
        line.append(
            f": {result.before.verdict} → {result.after.verdict}; wrote {result.format} state dict to {result.path}"
        )
    else:
        tried = ", ".join(f"{s} ({v})" for s, v in result.tried)
        line.append("no candidate passes", style="bold red")
        line.append(f": tried {tried}; nothing written")
    console.print(line)
    return cli.EXIT_OK if result.passed else cli.EXIT_FAILED
