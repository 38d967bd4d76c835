"""Library front ends built on :func:`gradprobe.probe`: a test assertion, a comparison of initializers,
and the small summaries (worst gain, ranking) that the CLI, the CI gate and the renderers share.

>>> import torch, gradprobe.api as api
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
>>> report = api.assert_stable(net, torch.randn(64, 16), init="xavier_normal")
>>> report.verdict
'stable'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UsageError

__all__ = [
    "assert_stable",
    "compare",
    "Gain",
    "worst_gain",
    "rank",
    "gate_findings",
    "format_findings",
    "SEVERITY_ORDER",
    "load_target",
    "probe_loaded",
]

# Lower is worse; "fail_on" picks the lowest severity that fails.
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Gain:
    """The most extreme change of a variance across depth.

    ``direction`` is ``"activation"`` (layer's activation variance over the first layer's) or
    ``"gradient"`` (layer's gradient variance over that of the layer nearest the output that has one);
    ``ratio`` is that quotient, ``start``/``end`` the two layers it compares.
    """

    direction: str
    ratio: float
    start: str
    end: str

    @property
    def decades(self) -> float:
        """|log10 ratio|; infinite when a variance is exactly zero."""
        if self.ratio <= 0:
            return math.inf
        return abs(math.log10(self.ratio)) if math.isfinite(self.ratio) else math.inf

    def __str__(self) -> str:
        arrow = "→" if self.direction == "activation" else "←"
        return f"{self.direction} ×{self.ratio:.1e} ({self.start} {arrow} {self.end})"


def _usable(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def worst_gain(report: Any) -> Gain | None:
    """The most extreme cumulative ratio of the diagnosis's depth profile
    (:func:`gradprobe.diagnose.depth_profile`: between-sample signal variance forward from the first
    weighted layer, per-sample gradient energy backward from the last), whichever spans more decades.
    Reports without weighted layers (an opaque model) fall back to the per-element activation and
    gradient variances of all layers. None when fewer than two layers have statistics."""
    candidates: list[Gain] = []
    try:
        from gradprobe.diagnose.profile import depth_profile
    except ImportError:  # pragma: no cover - the diagnosis ships with gradprobe
        depth_profile = None  # type: ignore[assignment]
    if depth_profile is not None:
        profile = depth_profile(report)
        for direction, (names, ratios) in (
            ("activation", profile.forward()),
            ("gradient", profile.backward()),
        ):
            candidates += [Gain(direction, r, names[0], n) for n, r in zip(names[1:], ratios[1:])]
    if not candidates:
        acts = [(x.name, x.act_var) for x in report.layers if _usable(x.act_var)]
        grads = [(x.name, x.grad_var) for x in report.layers if _usable(x.grad_var)]
        if len(acts) >= 2 and acts[0][1] > 0:
            candidates += [Gain("activation", v / acts[0][1], acts[0][0], n) for n, v in acts[1:]]
        if len(grads) >= 2 and grads[-1][1] > 0:
            candidates += [Gain("gradient", v / grads[-1][1], grads[-1][0], n) for n, v in grads[:-1]]
    if not candidates:
        return None
    return max(candidates, key=lambda g: (g.decades, g.direction == "gradient"))


def _counts(report: Any) -> tuple[int, int]:
    errors = sum(1 for f in report.findings if f.severity == "error")
    warnings = sum(1 for f in report.findings if f.severity == "warning")
    return errors, warnings


def rank(reports: Iterable[Any]) -> list[Any]:
    """Best first: stable before unstable, then fewer errors, then the smaller worst gain (in
    decades), then fewer warnings."""

    def key(report: Any) -> tuple[int, int, float, int]:
        errors, warnings = _counts(report)
        gain = worst_gain(report)
        return (
            int(report.verdict == "unstable"),
            errors,
            gain.decades if gain is not None else math.inf,
            warnings,
        )

    return sorted(reports, key=key)


def gate_findings(findings: Iterable[Any], *, fail_on: str = "error", allow: Iterable[str] = ()) -> list[Any]:
    """The findings that fail a gate: severity at or above ``fail_on``, code not in ``allow``."""
    if fail_on not in SEVERITY_ORDER:
        raise UsageError(
            f"unknown severity {fail_on!r} for fail_on", hint=f"valid: {', '.join(SEVERITY_ORDER)}"
        )
    allowed = set(allow)
    limit = SEVERITY_ORDER[fail_on]
    return [f for f in findings if SEVERITY_ORDER.get(f.severity, 9) <= limit and f.code not in allowed]


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2e}"


def layer_span(layers: Sequence[str]) -> str:
    """``0``, ``0, 2``, ``0 … 58 (30 layers)``."""
    if len(layers) <= 3:
        return ", ".join(layers)
    return f"{layers[0]} … {layers[-1]} ({len(layers)} layers)"


def _signal(layer: Any) -> float | None:
    return None if layer.act is None else layer.act.signal_var


def _energy(layer: Any) -> float | None:
    return None if layer.grad is None else layer.grad.energy


def format_findings(report: Any, findings: Sequence[Any]) -> str:
    """Findings as text, each with its layers, message, the numbers the diagnosis compares at its
    first and last layer (signal variance forward, gradient energy backward), and the suggested fix
    (the body of :func:`assert_stable`'s AssertionError)."""
    lines: list[str] = []
    by_name = {x.name: x for x in report.layers}
    for f in findings:
        where = f" at {layer_span(list(f.layers))}" if f.layers else ""
        lines.append(f"  [{f.severity}] {f.code}{where}: {f.message}")
        known = [by_name[n] for n in f.layers if n in by_name]
        if known:
            first, last = known[0], known[-1]
            if first is last:
                lines.append(
                    f"      layer {first.name}: signal variance {_fmt(_signal(first))}, "
                    f"gradient energy {_fmt(_energy(first))}"
                )
            else:
                lines.append(
                    f"      signal variance {_fmt(_signal(first))} at {first.name} → {_fmt(_signal(last))} at {last.name}; "
                    f"gradient energy {_fmt(_energy(first))} at {first.name} ← {_fmt(_energy(last))} at {last.name}"
                )
        if f.suggestion:
            lines.append(f"      fix: {f.suggestion}")
    return "\n".join(lines)


def assert_stable(
    model: Any,
    inputs: Any,
    *,
    allow: Iterable[str] = (),
    fail_on: str = "error",
    **options: Any,
) -> Any:
    """Probe ``model`` and raise ``AssertionError`` when a finding at or above ``fail_on`` remains
    after dropping the codes in ``allow``. The message lists each finding with its layers, numbers
    and fix. ``options`` go to :func:`gradprobe.probe` (``init``, ``seed``, ``loss``, ``overrides``,
    ``thresholds`` …). Returns the report when the model passes.
    """
    from gradprobe.probing import probe

    options.pop("diagnose", None)
    report = probe(model, inputs, diagnose=True, **options)
    failing = gate_findings(report.findings, fail_on=fail_on, allow=allow)
    if failing:
        meta = report.meta
        head = (
            f"gradprobe: {meta.get('model', 'model')} is unstable at init "
            f"(init {meta.get('init', '?')}, seed {meta.get('seed', '?')}): "
            f"{len(failing)} finding{'s' if len(failing) != 1 else ''} at or above {fail_on!r}"
        )
        raise AssertionError(head + "\n" + format_findings(report, failing))
    return report


def compare(
    model: Any,
    inputs: Any,
    inits: Sequence[Any],
    *,
    progress: Callable[[int, Any, Any], None] | None = None,
    **options: Any,
) -> list[Any]:
    """Probe the same model and inputs under each initializer; the reports come back in the order of
    ``inits`` (:func:`rank` orders them best first). ``model`` may be a module or a zero-argument
    factory returning a module (or ``(module, example_inputs)``, used when ``inputs`` is None).
    ``progress(i, init, report)`` is called after each probe.
    """
    from torch import nn

    from gradprobe.probing import probe

    if not inits:
        raise UsageError("no initializers to compare", hint="e.g. inits=['xavier_normal', 'kaiming_normal']")
    if not isinstance(model, nn.Module) and callable(model):
        model = model()
        if isinstance(model, tuple) and len(model) == 2:
            model, example = model
            inputs = example if inputs is None else inputs
    if inputs is None:
        raise UsageError(
            "no inputs to compare with", hint="pass inputs, or a factory returning (model, inputs)"
        )
    options.setdefault("diagnose", True)
    reports = []
    for i, init in enumerate(inits):
        report = probe(model, inputs, init=init, **options)
        reports.append(report)
        if progress is not None:
            progress(i, init, report)
    return reports


# --------------------------------------------------------------------------------------------
# Probing a model named by a spec (the CLI and the CI gate)
# --------------------------------------------------------------------------------------------


def suggest_inputs(model: Any) -> str:
    """An ``--input`` guess from the model's first weighted module, for error hints."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Linear):
            return f"--input 32x{module.in_features}"
        if isinstance(module, nn.Embedding):
            return f"--input int:8x128:vocab={module.num_embeddings}"
        if isinstance(module, nn.Conv1d):
            return f"--input 8x{module.in_channels}x128"
        if isinstance(module, nn.Conv2d):
            return f"--input 8x{module.in_channels}x32x32"
        if isinstance(module, nn.Conv3d):
            return f"--input 4x{module.in_channels}x16x16x16"
    return "--input 32x64 (a float shape), --input int:8x128:vocab=1000 (token ids) or --input batch.pt"


def load_target(
    model: str,
    inputs: Sequence[str] = (),
    *,
    args: Any = None,
    seed: int = 0,
    dtype: Any = None,
    trust_pickle: bool = False,
    base: Any = None,
) -> tuple[Any, Any]:
    """Load MODEL (any form of :func:`gradprobe.loading.load_model`) and its inputs: built from the
    SPECs in ``inputs`` when given, else the example inputs the model came with. The model is built
    with the global RNG seeded from ``seed`` (restored afterwards), so a factory that does not seed
    itself gives the same weights for the same seed. ``dtype`` (a torch
    dtype or its name) casts the model and the floating inputs. Returns ``(LoadedModel, inputs)``
    ready for :func:`probe_loaded`."""
    from gradprobe.loading import as_probe_inputs, cast_inputs, dtype_from_name, load_model, make_inputs

    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype, floating=True)
    specs = list(inputs)
    from gradprobe.loading import parse_input_spec

    parsed = [parse_input_spec(s) for s in specs]  # a malformed SPEC fails before the model loads
    import torch

    from gradprobe.rng import stream_seed

    # A factory that draws from the global RNG without seeding it (an nn.Parameter made with
    # torch.randn) builds the same model for the same seed; the caller's RNG state comes back.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "build"))
        loaded = load_model(model, args=args, trust_pickle=trust_pickle, base=base)
    if dtype is not None:
        loaded.module.to(dtype)
    if parsed:
        positional, keywords = make_inputs(parsed, seed=seed, dtype=dtype, base=base)
        probe_inputs = as_probe_inputs(loaded.module, positional, keywords)
    elif loaded.example_inputs is not None:
        probe_inputs = loaded.example_inputs if dtype is None else cast_inputs(loaded.example_inputs, dtype)
    else:
        raise UsageError(
            f"{model} comes with no example inputs; say what to feed it with --input SPEC",
            hint=f"e.g. {suggest_inputs(loaded.module)}",
        )
    if loaded.validate is not None:
        loaded.validate(probe_inputs)
    return loaded, probe_inputs


def probe_loaded(loaded: Any, inputs: Any, **options: Any) -> Any:
    """:func:`gradprobe.probe` on a :class:`~gradprobe.loading.LoadedModel`, with what the loader
    knows written into the report (original type names, notes, opaque layers). A model measured
    only as a whole gets an ``opaque_model`` warning, so that no gate passes it silently."""
    from gradprobe.errors import ProbeError
    from gradprobe.probing import probe

    try:
        report = probe(loaded.module, inputs, **options)
    except ProbeError as e:
        if loaded.kind == "export" and e.hint and "re-export" not in e.hint:
            e.hint = (
                "a torch.export program is specialised to the shapes it was exported with: omit --input to "
                "use the example inputs stored in the archive, or re-export with dynamic_shapes"
            )
        raise
    loaded.annotate(report)
    if loaded.opaque == ["model"] and report.verdict is not None:
        from gradprobe.diagnose.finding import Finding

        report.findings.append(
            Finding(
                code="opaque_model",
                severity="warning",
                layers=("model",),
                message="only the model's output could be measured (scripted forward): "
                "no per-layer profile, so depth problems cannot be seen",
                suggestion="probe the Python factory (file.py:factory) or a torch.export program (.pt2)",
            )
        )
    return report
