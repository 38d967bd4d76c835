"""The CI gate behind ``gradprobe check``: configuration, running the checks, baseline drift, and the
reports CI systems read (GitHub annotations, the job summary's Markdown, JUnit XML).

Configuration lives in ``[tool.gradprobe]`` of ``pyproject.toml`` (documented in docs/cli.md)::

    [tool.gradprobe]
    init = "keep"                  # default initializer: "keep" checks the model as built
    inputs = ["32x64"]             # default inputs for models that name none
    fail-on = "error"              # lowest severity that fails the gate: error | warning | info
    allow = ["dead_units"]         # finding codes that never fail the gate (still reported)
    baseline = "gradprobe-baseline.json"
    drift-decades = 1.0            # a layer's variance may move this many decades from the baseline

    [tool.gradprobe.thresholds]    # diagnosis thresholds (gradprobe.diagnose.Thresholds fields)
    vanishing_gradients_error = 1e-8

    [[tool.gradprobe.models]]
    model = "models.py:make_mlp"   # any MODEL form of `gradprobe probe`
    name = "mlp"                   # label in reports (default: the model spec)
    args = { depth = 8 }
    inputs = ["32x64"]

Every key of the top-level table except ``models``, ``baseline`` and ``drift-decades`` may also be
set per model; a model's ``thresholds`` are merged over the global ones. Keys may be spelt with
``-`` or ``_``; unknown keys are an error (a typo must not silently weaken a gate).
"""

from __future__ import annotations

import json
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gradprobe.errors import GradprobeError, UsageError

__all__ = [
    "ModelCheck",
    "GateConfig",
    "CheckResult",
    "find_pyproject",
    "read_config",
    "run_checks",
    "drift_findings",
    "read_baseline",
    "write_baseline",
    "github_annotations",
    "step_summary",
    "junit_xml",
    "exit_code",
    "BASELINE_SCHEMA",
]

BASELINE_SCHEMA = "gradprobe.baseline/1"

_MODEL_KEYS = (
    "model",
    "name",
    "inputs",
    "args",
    "init",
    "overrides",
    "seed",
    "loss",
    "mode",
    "dtype",
    "device",
    "trust_pickle",
    "allow",
    "fail_on",
    "thresholds",
)
_GLOBAL_KEYS = tuple(k for k in _MODEL_KEYS if k not in ("model", "name", "args")) + (
    "models",
    "baseline",
    "drift_decades",
)


@dataclass(frozen=True)
class ModelCheck:
    """One model the gate probes, with every option resolved (per-model over global over default)."""

    model: str  # any MODEL form of `gradprobe probe`
    name: str = ""  # label in reports; the model spec when empty
    inputs: tuple[str, ...] = ()  # input SPECs; empty: the model's own example inputs
    args: Mapping[str, Any] = field(default_factory=dict)  # factory keyword arguments
    init: str = "keep"  # "keep": check the model as it will be trained
    overrides: Mapping[str, str] = field(default_factory=dict)  # module glob → initializer
    seed: int = 0  # seeds inputs, initializer and loss
    loss: str = "randn"  # how the backward pass is seeded (see gradprobe.probe)
    mode: str = "train"  # BatchNorm batch statistics and dropout on, as in training
    dtype: str | None = None  # cast model and floating inputs (None: as built)
    device: str | None = None  # probe on this device (None: the model's)
    trust_pickle: bool = False  # never unpickle a model file unless the project says so
    allow: tuple[str, ...] = ()  # finding codes that never fail the gate
    fail_on: str = "error"  # lowest failing severity
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # diagnosis thresholds

    @property
    def label(self) -> str:
        return self.name or self.model


@dataclass(frozen=True)
class GateConfig:
    """The resolved ``[tool.gradprobe]`` table."""

    checks: tuple[ModelCheck, ...]
    root: Path  # relative paths (models, inputs, baseline) resolve against this directory
    baseline: Path | None = None  # stored profiles to compare against
    drift_decades: float = 1.0  # allowed |log10(variance / baseline variance)| per layer
    source: Path | None = None  # the pyproject.toml read, if any


@dataclass
class CheckResult:
    """What the gate found for one model."""

    check: ModelCheck
    report: Any = None  # the Report, None when the model could not be loaded or probed
    findings: list[Any] = field(default_factory=list)  # the report's findings + the gate's own
    failing: list[Any] = field(default_factory=list)  # those that fail the gate
    error: str | None = None  # a usage/loading/probe error (exit 2)
    location: tuple[str, int] | None = None  # factory source, for annotations
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failing


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` (default: the current directory) or its parents."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError("reading pyproject.toml needs Python ≥ 3.11 or the tomli package") from None
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from e


def _normalise(table: Mapping[str, Any], valid: Sequence[str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        norm = key.replace("-", "_")
        if norm not in valid:
            raise UsageError(
                f"unknown key {key!r} in {where}",
                hint=f"valid keys: {', '.join(k.replace('_', '-') for k in valid)}",
            )
        out[norm] = value
    return out


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{key} in {where} must be a string or a list of strings, got {value!r}")


def _typed(value: Any, kind: type | tuple[type, ...], key: str, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{key} in {where} has the wrong type ({type(value).__name__}): {value!r}")
    return value


def _check_from(base: dict[str, Any], entry: Mapping[str, Any], where: str) -> ModelCheck:
    merged = dict(base)
    thresholds = dict(base.get("thresholds", {}))
    for key, value in entry.items():
        if key == "thresholds":
            thresholds.update(_typed(value, dict, key, where))
        else:
            merged[key] = value
    merged["thresholds"] = thresholds
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key in ("inputs", "allow"):
            kwargs[key] = _strings(value, key, where)
        elif key in ("args", "overrides", "thresholds"):
            kwargs[key] = dict(_typed(value, dict, key, where))
        elif key == "seed":
            kwargs[key] = _typed(value, int, key, where)
        elif key == "trust_pickle":
            kwargs[key] = _typed(value, bool, key, where)
        elif key in ("model", "name", "init", "loss", "mode", "dtype", "device", "fail_on"):
            kwargs[key] = _typed(value, str, key, where)
    if "model" not in kwargs:
        raise UsageError(f"{where} has no model", hint='add model = "path/to/file.py:factory"')
    return ModelCheck(**kwargs)


def read_config(
    path: Path | None, *, models: Sequence[str] = (), cli: Mapping[str, Any] | None = None
) -> GateConfig:
    """Resolve the gate's configuration.

    ``path``: a pyproject.toml (None: run with built-in defaults). ``models``: MODEL specs from the
    command line; when given they replace the table's models (the table's defaults still apply).
    ``cli``: options given on the command line, which override the table (keys as in ModelCheck,
    plus ``baseline`` and ``drift_decades``).
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    table: dict[str, Any] = {}
    root = Path.cwd()
    if path is not None:
        data = _load_toml(path)
        raw = data.get("tool", {}).get("gradprobe")
        if raw is None and not models:
            raise UsageError(
                f"no [tool.gradprobe] table in {path}",
                hint="add one (see docs/cli.md, 'gradprobe check') or name models: gradprobe check file.py:factory",
            )
        table = _normalise(raw or {}, _GLOBAL_KEYS, "[tool.gradprobe]")
        root = path.parent
    where = f"[tool.gradprobe] of {path}" if path is not None else "the command line"
    defaults = {k: v for k, v in table.items() if k not in ("models", "baseline", "drift_decades")}
    # Command-line options beat the table for every model.
    cli_model_opts = {k: v for k, v in cli.items() if k in _MODEL_KEYS and k not in ("model", "name")}
    entries: list[tuple[dict[str, Any], str]] = []
    if models:
        entries = [({"model": m}, "the command line") for m in models]
    else:
        raw_models = table.get("models")
        if not raw_models:
            raise UsageError(f"no models in {where}", hint='add models = ["path/to/file.py:factory"]')
        if not isinstance(raw_models, list):
            raw_models = [raw_models]
        for i, item in enumerate(raw_models):
            label = f"[[tool.gradprobe.models]] #{i + 1}"
            if isinstance(item, str):
                entries.append(({"model": item}, label))
            elif isinstance(item, dict):
                entries.append((_normalise(item, _MODEL_KEYS, label), label))
            else:
                raise UsageError(f"{label} must be a string or a table, got {item!r}")
    checks = []
    for entry, label in entries:
        merged_entry = {**entry, **{k: v for k, v in cli_model_opts.items() if k != "thresholds"}}
        check = _check_from(defaults, merged_entry, label)
        if "thresholds" in cli_model_opts:
            check = replace(check, thresholds={**check.thresholds, **cli_model_opts["thresholds"]})
        checks.append(check)
    names = [c.label for c in checks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(
            f"two models share the name {duplicates[0]!r}", hint='give each a distinct name = "…"'
        )
    # A table's baseline is keyed by the table's model names: it does not apply to models named
    # on the command line unless --baseline says so.
    baseline = cli.get("baseline", None if models else table.get("baseline"))
    drift = cli.get("drift_decades", table.get("drift_decades", 1.0))
    if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not drift > 0:
        raise UsageError(f"drift-decades must be a positive number, got {drift!r}")
    baseline_path = None
    if baseline is not None:
        baseline_path = Path(baseline) if "baseline" in cli else root / str(baseline)
    return GateConfig(
        checks=tuple(checks), root=root, baseline=baseline_path, drift_decades=float(drift), source=path
    )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _gate_finding(
    code: str, severity: str, layers: Iterable[str], message: str, suggestion: str, **evidence: Any
) -> Any:
    from gradprobe.diagnose.finding import Finding

    return Finding(
        code=code,
        severity=severity,  # type: ignore[arg-type]
        layers=tuple(layers),
        message=message,
        suggestion=suggestion,
        evidence=evidence,
    )


def run_one(check: ModelCheck, root: Path) -> CheckResult:
    """Load, probe and diagnose one model; a GradprobeError becomes ``result.error``."""
    from gradprobe.api import load_target, probe_loaded

    result = CheckResult(check=check)
    start = time.perf_counter()
    try:
        loaded, inputs = load_target(
            check.model,
            check.inputs,
            args=check.args,
            seed=check.seed,
            dtype=check.dtype,
            trust_pickle=check.trust_pickle,
            base=root,
        )
        result.location = loaded.location
        result.report = probe_loaded(
            loaded,
            inputs,
            init=check.init,
            overrides=check.overrides or None,
            seed=check.seed,
            loss=check.loss,
            mode=check.mode,
            device=check.device,
            thresholds=check.thresholds or None,
        )
        result.findings = list(result.report.findings)
    except GradprobeError as e:
        result.error = " ".join(str(e).split())
    result.seconds = time.perf_counter() - start
    return result


def evaluate(result: CheckResult) -> CheckResult:
    """Fill ``result.failing`` from its findings and the check's fail_on/allow."""
    from gradprobe.api import gate_findings

    result.failing = gate_findings(result.findings, fail_on=result.check.fail_on, allow=result.check.allow)
    return result


def run_checks(
    config: GateConfig,
    *,
    baseline: Mapping[str, Mapping[str, Any]] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every check; compare with ``baseline`` profiles (model label → report dict) when given."""
    results = []
    for check in config.checks:
        result = run_one(check, config.root)
        if result.report is not None and baseline is not None:
            stored = baseline.get(check.label)
            if stored is None and len(baseline) == 1 and len(config.checks) == 1:
                stored = next(iter(baseline.values()))
            if stored is None:
                result.findings.append(
                    _gate_finding(
                        "baseline_missing",
                        "warning",
                        (),
                        f"the baseline has no profile for {check.label!r}",
                        "record one with gradprobe check --update-baseline",
                    )
                )
            else:
                result.findings.extend(drift_findings(result.report, stored, config.drift_decades))
        evaluate(result)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def exit_code(results: Sequence[CheckResult]) -> int:
    """2 when a model could not be loaded or probed, else 1 when a finding fails the gate, else 0."""
    if any(r.error is not None for r in results):
        return 2
    return 1 if any(r.failing for r in results) else 0


# --------------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------------


def read_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """Model label → stored report dict. Accepts a baseline written by ``--update-baseline`` or a
    single report JSON (``gradprobe probe --json``), which then applies to a single model."""
    if not path.is_file():
        raise UsageError(
            f"baseline file not found: {path}", hint="create it with gradprobe check --update-baseline"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"baseline {path} is not JSON: {e}") from e
    schema = str(data.get("schema", "")) if isinstance(data, dict) else ""
    if schema == BASELINE_SCHEMA:
        return dict(data["reports"])
    if schema.startswith("gradprobe.report/"):
        return {str(data.get("meta", {}).get("model_source") or "report"): data}
    raise UsageError(
        f"{path} is neither a gradprobe baseline nor a report (schema {schema!r})",
        hint="create it with gradprobe check --update-baseline",
    )


def write_baseline(path: Path, results: Sequence[CheckResult]) -> int:
    """Store the profile of every model that ran; returns how many."""
    reports = {
        r.check.label: r.report.to_dict(include_moments=False) for r in results if r.report is not None
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": BASELINE_SCHEMA, "reports": reports}
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    return len(reports)


def _decades(now: float | None, then: float | None) -> float | None:
    """|log10(now/then)|; None when neither exists, inf when only one does or one is zero."""
    if now is None and then is None:
        return None
    if now is None or then is None or math.isnan(now) or math.isnan(then):
        return math.inf
    if now == then:
        return 0.0
    if now <= 0 or then <= 0 or math.isinf(now) or math.isinf(then):
        return math.inf
    return abs(math.log10(now / then))


def _stored_metric(layer: Mapping[str, Any], key: str) -> float | None:
    """A stored layer's signal variance (``key="act"``) or gradient energy (``key="grad"``)."""
    stats = layer.get(key)
    if stats is None:
        return None
    field_name = "signal_var" if key == "act" else "energy"
    value = stats.get(field_name)
    return None if value is None else float(value)  # "nan"/"inf" strings included


def drift_findings(report: Any, stored: Mapping[str, Any], decades: float) -> list[Any]:
    """``baseline_drift`` (error) for layers whose signal variance or gradient energy (the numbers the
    diagnosis compares along depth) moved more than ``decades`` from the stored report;
    ``baseline_layers_changed`` (warning) when layers were added or removed (the architecture
    changed: update the baseline)."""
    then = {x["name"]: x for x in stored.get("layers", [])}
    now = {x.name: x for x in report.layers}
    findings = []
    drifted: list[tuple[float, str, str, float | None, float | None]] = []
    for name, layer in now.items():
        if name not in then:
            continue
        current = {
            "act": None if layer.act is None else layer.act.signal_var,
            "grad": None if layer.grad is None else layer.grad.energy,
        }
        for key, value in current.items():
            d = _decades(value, _stored_metric(then[name], key))
            if d is not None and d > decades:
                drifted.append((d, name, key, value, _stored_metric(then[name], key)))
    if drifted:
        layers = list(
            dict.fromkeys(name for _, name, _, _, _ in sorted(drifted, key=lambda t: now[t[1]].index))
        )
        d, name, key, value, old = max(drifted, key=lambda t: t[0])
        what = "signal variance" if key == "act" else "gradient energy"
        amount = "∞" if math.isinf(d) else f"{d:.1f}"
        findings.append(
            _gate_finding(
                "baseline_drift",
                "error",
                layers,
                f"{len(layers)} layer(s) drifted more than {decades:g} decade(s) from the baseline; worst: "
                f"{what} of `{name}` {_fmt(old)} → {_fmt(value)} ({amount} decades)",
                "if the change is intended, record a new baseline with gradprobe check --update-baseline",
                worst_layer=name,
                worst_metric="signal_var" if key == "act" else "grad_energy",
                worst_decades=d,
                baseline=old,
                current=value,
                allowed_decades=decades,
            )
        )
    added = [n for n in now if n not in then]
    removed = [n for n in then if n not in now]
    if added or removed:
        findings.append(
            _gate_finding(
                "baseline_layers_changed",
                "warning",
                added,
                f"the layers differ from the baseline: {len(added)} added, {len(removed)} removed"
                + (
                    f" (removed: {', '.join(removed[:5])}{'…' if len(removed) > 5 else ''})"
                    if removed
                    else ""
                ),
                "if the architecture changed on purpose, record a new baseline with gradprobe check --update-baseline",
                added=added,
                removed=removed,
            )
        )
    return findings


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.2e}"


# --------------------------------------------------------------------------------------------
# CI outputs
# --------------------------------------------------------------------------------------------


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _relative(file: str, root: Path) -> str:
    workspace = Path(os.environ.get("GITHUB_WORKSPACE") or root)
    try:
        return str(Path(file).resolve().relative_to(workspace.resolve()))
    except ValueError:
        return file


def github_annotations(results: Sequence[CheckResult], root: Path) -> list[str]:
    """``::error``/``::warning`` workflow commands: one per failing finding (error), per other error
    or warning finding (warning), and per model that could not be probed (error). Placed on the
    model's factory when its source is known."""
    lines = []
    for r in results:
        props = []
        if r.location is not None:
            props.append(f"file={_escape_property(_relative(r.location[0], root))}")
            props.append(f"line={r.location[1]}")
        if r.error is not None:
            title = f"gradprobe {r.check.label}: could not probe"
            lines.append(
                f"::error {','.join([*props, 'title=' + _escape_property(title)])}::{_escape_data(r.error)}"
            )
            continue
        failing = {id(f) for f in r.failing}
        for f in r.findings:
            if id(f) in failing:
                level = "error"
            elif f.severity in ("error", "warning"):
                level = "warning"
            else:
                continue
            title = f"gradprobe {r.check.label}: {f.code}"
            where = f" [layers {_span(f.layers)}]" if f.layers else ""
            message = f"{f.message}{where}" + (f" Fix: {f.suggestion}" if f.suggestion else "")
            lines.append(
                f"::{level} {','.join([*props, 'title=' + _escape_property(title)])}::{_escape_data(message)}"
            )
    return lines


def _span(layers: Sequence[str]) -> str:
    from gradprobe.api import layer_span

    return layer_span(list(layers))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def step_summary(results: Sequence[CheckResult]) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: a table of models, then the failing findings."""
    from gradprobe.api import worst_gain

    code = exit_code(results)
    status = {0: "passed", 1: "failed", 2: "could not run"}[code]
    lines = [
        f"## gradprobe check: {status}",
        "",
        "| model | init | result | verdict | errors | warnings | worst gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| `{_md(r.check.label)}` | {_md(r.check.init)} | ⚠️ not probed | — | — | — | — |")
            continue
        errors = sum(1 for f in r.findings if f.severity == "error")
        warnings = sum(1 for f in r.findings if f.severity == "warning")
        gain = worst_gain(r.report)
        mark = "✅ pass" if r.passed else "❌ fail"
        gain_text = "—" if gain is None else f"{gain.direction} ×{gain.ratio:.1e}"
        init = str(r.report.meta.get("init", r.check.init))
        lines.append(
            f"| `{_md(r.check.label)}` | {_md(init)} | {mark} | {r.report.verdict or '—'} | {errors} | {warnings} | {gain_text} |"
        )
    for r in results:
        if r.error is not None:
            lines += ["", f"### `{_md(r.check.label)}`: could not be probed", "", f"> {_md(r.error)}"]
        elif r.failing:
            lines += ["", f"### `{_md(r.check.label)}`: failing findings", ""]
            for f in r.failing:
                where = f" at {_span(f.layers)}" if f.layers else ""
                fix = f" **Fix:** {_md(f.suggestion)}" if f.suggestion else ""
                lines.append(f"- **{f.severity}** `{f.code}`{_md(where)}: {_md(f.message)}{fix}")
    return "\n".join(lines) + "\n"


def junit_xml(results: Sequence[CheckResult]) -> str:
    """JUnit XML: one test case per model; failing findings are a ``<failure>``, a model that could
    not be probed an ``<error>``; other findings go to ``<system-out>``."""
    from gradprobe.api import format_findings

    suite = ET.Element(
        "testsuite",
        name="gradprobe",
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.error is None and r.failing)),
        errors=str(sum(1 for r in results if r.error is not None)),
        skipped="0",
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname="gradprobe.check", name=r.check.label, time=f"{r.seconds:.3f}"
        )
        if r.error is not None:
            ET.SubElement(case, "error", message=r.error, type="GradprobeError").text = r.error
            continue
        if r.failing:
            first = r.failing[0]
            summary = f"{len(r.failing)} failing finding(s); first: {first.code}: {first.message}"
            ET.SubElement(case, "failure", message=summary, type=first.code).text = format_findings(
                r.report, r.failing
            )
        others = [f for f in r.findings if all(f is not g for g in r.failing)]
        if others:
            ET.SubElement(case, "system-out").text = format_findings(r.report, others)
    root = ET.Element("testsuites", name="gradprobe")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
