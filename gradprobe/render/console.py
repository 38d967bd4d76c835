"""Terminal rendering with rich: pure functions from a Report (or several) to a rich renderable.

Nothing here prints; the caller hands the result to a ``rich.console.Console``. ``Report``'s
``__rich_console__`` delegates to :func:`render_report`.

The per-layer table shows the two numbers the diagnosis compares along depth, so that the table
explains the findings: the *signal variance* (between-sample variance of the output, mean over
units: PyTorch's default bias keeps the plain variance up while the part that tells inputs apart
vanishes) and the *gradient energy* (E[g²] × elements per sample: survives flatten, pooling and
heads, where per-element variance jumps).

The depth bars: each row's bar is the layer's value on a log scale shared by all rows of the table,
full at the largest value and empty at the smallest. The scale spans at least four decades (the
diagnosis's warning level) and at most twelve, so a healthy profile shows as a column of mostly full
bars and vanishing signal as bars that shrink with depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["render_report", "render_findings", "render_compare", "render_header", "depth_bar", "sparkline"]

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SEVERITY_MARK = {"error": "✗", "warning": "!", "info": "i"}
_EIGHTHS = " ▏▎▍▌▋▊▉█"
_SPARKS = "▁▂▃▄▅▆▇█"
_MIN_SPAN = 4.0  # decades: the smallest range a bar scale spans (the diagnosis warns at 1e-4)
_MAX_SPAN = 12.0  # decades: below this under the top, a bar is empty (keeps resolution where it matters)


CAPTION = (
    "signal: between-sample variance of the layer's output (mean over units). gradient: energy of the "
    "gradient at the output, E[g²] × elements per sample. The diagnosis compares both along depth; "
    "the JSON and CSV also carry per-element act_var and grad_var."
)


def signal_var(layer: Any) -> float | None:
    """Between-sample activation variance: per-unit offsets (a bias, a constant) carry no signal."""
    return None if layer.act is None else layer.act.signal_var


def grad_energy(layer: Any) -> float | None:
    """Per-sample gradient energy: survives flatten, pooling and heads, unlike per-element variance."""
    return None if layer.grad is None else layer.grad.energy


def _log10(v: float | None) -> float | None:
    if v is None or math.isnan(v):
        return None
    if v <= 0:
        return -math.inf
    return math.log10(v) if math.isfinite(v) else math.inf


def _scale(values: Sequence[float | None]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    hi = max(finite)
    lo = max(min(min(finite), hi - _MIN_SPAN), hi - _MAX_SPAN)
    return lo, hi


def depth_bar(log_value: float | None, lo: float, hi: float, width: int = 8) -> str:
    """A left-aligned bar in eighth blocks: ``log_value`` placed on the scale ``[lo, hi]``."""
    if log_value is None:
        return " " * width
    if log_value == -math.inf:
        return "·".ljust(width)
    if log_value == math.inf:
        return "█" * width
    fraction = 0.0 if hi <= lo else (log_value - lo) / (hi - lo)
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[rest] if rest else "")
    return (text or "▏").ljust(width)


def sparkline(logs: Sequence[float | None], lo: float, hi: float, width: int = 16) -> str:
    """Depth profile in one line: ``width`` samples of ``logs`` placed on ``[lo, hi]``."""
    points = [v for v in logs if v is not None]
    if not points:
        return ""
    if len(points) > width:
        points = [points[round(i * (len(points) - 1) / (width - 1))] for i in range(width)]
    out = []
    for v in points:
        if v == -math.inf:
            out.append("·")
            continue
        fraction = 1.0 if v == math.inf or hi <= lo else (v - lo) / (hi - lo)
        out.append(_SPARKS[round(max(0.0, min(1.0, fraction)) * (len(_SPARKS) - 1))])
    return "".join(out)


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.2e}"


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape) if shape else "—"


def _findings_by_layer(findings: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in findings:
        for name in f.layers:
            out.setdefault(name, []).append(f)
    return out


def _layer_flags(layer: Any, findings: Sequence[Any], opaque: set[str]) -> Text:
    text = Text()
    parts: list[tuple[str, str]] = []
    for f in findings:
        parts.append((f"{_SEVERITY_MARK.get(f.severity, '?')} {f.code}", _SEVERITY_STYLE.get(f.severity, "")))
    for stats in (layer.act, layer.grad):
        if stats is None:
            continue
        if (stats.nonfinite or 0) > 0 or (stats.moments is not None and stats.moments.nonfinite_units > 0):
            parts.append(("nan/inf", "bold red"))
            break
    if layer.act is not None and layer.grad is None and layer.grad_missing:
        parts.append(("no grad", "dim"))
    if layer.name in opaque:
        parts.append(("opaque", "magenta"))
    if layer.calls > 1:
        parts.append((f"{layer.calls} calls", "dim"))
    seen: set[str] = set()
    for i, (label, style) in enumerate(parts):
        if label in seen:
            continue
        seen.add(label)
        if i:
            text.append(", ")
        text.append(label, style=style)
    return text


def render_header(report: Any) -> Text:
    """Two lines: the verdict with finding counts; the model and how it was probed."""
    meta = report.meta
    text = Text()
    text.append("verdict ", style="dim")
    text.append_text(_verdict(report))
    text.append("\n")
    text.append(str(meta.get("model", "model")), style="bold")
    fields = [
        ("init", meta.get("init")),
        ("seed", meta.get("seed")),
        ("batch", meta.get("batch_size")),
        ("loss", meta.get("loss")),
        ("mode", meta.get("mode")),
        ("device", meta.get("device")),
    ]
    for key, value in fields:
        if value is not None:
            text.append(f" · {key} ", style="dim")
            text.append(str(value))
    return text


def _verdict(report: Any) -> Text:
    errors = sum(1 for f in report.findings if f.severity == "error")
    warnings = sum(1 for f in report.findings if f.severity == "warning")
    if report.verdict is None:
        return Text("not diagnosed", style="dim")
    style = (
        "bold red" if report.verdict == "unstable" else "bold green" if report.verdict == "stable" else "bold"
    )
    text = Text(str(report.verdict).upper(), style=style)
    text.append(
        f" ({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})", style="dim"
    )
    return text


def _layers_table(report: Any, width: int | None, max_rows: int | None) -> Table:
    layers = list(report.layers)
    act_values = [signal_var(x) for x in layers]
    grad_values = [grad_energy(x) for x in layers]
    act_logs = [_log10(v) for v in act_values]
    grad_logs = [_log10(v) for v in grad_values]
    act_lo, act_hi = _scale(act_logs)
    grad_lo, grad_hi = _scale(grad_logs)
    by_layer = _findings_by_layer(report.findings)
    opaque = set(report.meta.get("opaque_layers") or ())

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        width=width,
        expand=False,
        header_style="bold",
        caption=Text(CAPTION),
        caption_justify="left",
        caption_style="dim",
    )
    longest = max((len(x.name) for x in layers), default=5)
    table.add_column("layer", overflow="fold", min_width=min(28, longest))
    table.add_column("type", no_wrap=True, overflow="ellipsis", max_width=18)
    table.add_column("output", no_wrap=True)
    table.add_column("signal", justify="right", no_wrap=True)
    table.add_column("depth", no_wrap=True, style="green")
    table.add_column("gradient", justify="right", no_wrap=True)
    table.add_column("depth", no_wrap=True, style="blue")
    table.add_column("flags", overflow="fold")

    rows = list(range(len(layers)))
    hidden = 0
    if max_rows is not None and len(rows) > max_rows >= 2:
        head = max_rows // 2
        hidden = len(rows) - max_rows
        rows = rows[:head] + [-1] + rows[len(rows) - (max_rows - head) :]
    for i in rows:
        if i == -1:
            table.add_row(Text(f"⋮ {hidden} more", style="dim"), "", "", "", "", "", "", "")
            continue
        x = layers[i]
        table.add_row(
            Text(x.name),
            Text(x.type),
            _shape(x.output_shape),
            _num(act_values[i]),
            depth_bar(act_logs[i], act_lo, act_hi),
            _num(grad_values[i]),
            depth_bar(grad_logs[i], grad_lo, grad_hi),
            _layer_flags(x, by_layer.get(x.name, []), opaque),
        )
    return table


def render_findings(report: Any, findings: Sequence[Any] | None = None, *, title: str | None = None) -> Panel:
    """The findings panel: severity, code, layers, message and the suggested fix for each."""
    from gradprobe.api import layer_span

    items = list(report.findings if findings is None else findings)
    parts: list[RenderableType] = []
    if not items:
        parts.append(
            Text("No findings: signal propagates forward and backward within tolerance.", style="green")
        )
    for n, f in enumerate(items):
        if n:
            parts.append(Text(""))
        head = Text()
        head.append(
            f"{_SEVERITY_MARK.get(f.severity, '?')} {f.severity}", style=_SEVERITY_STYLE.get(f.severity, "")
        )
        head.append(f"  {f.code}", style="bold")
        if f.layers:
            head.append(f"  at {layer_span(list(f.layers))}", style="dim")
        parts.append(head)
        parts.append(Padding(Text(f.message), (0, 0, 0, 2)))
        if f.suggestion:
            fix = Text("→ ", style="bold")
            fix.append(f.suggestion)
            parts.append(Padding(fix, (0, 0, 0, 2)))
    counts = {s: sum(1 for f in items if f.severity == s) for s in ("error", "warning", "info")}
    summary = ", ".join(f"{n} {s}{'s' * (n != 1)}" for s, n in counts.items() if n) or "none"
    border = "red" if counts["error"] else "yellow" if counts["warning"] else "green"
    return Panel(
        Group(*parts),
        title=title or f"findings: {summary}",
        title_align="left",
        border_style=border,
        box=box.ROUNDED,
    )


def _notes(report: Any) -> Text | None:
    notes = report.meta.get("notes") or []
    kept = report.meta.get("kept_as_built") or []
    lines = list(notes)
    init = str(report.meta.get("init", "keep"))
    if kept and not init.startswith("keep"):
        shown = ", ".join(kept[:6]) + ("…" if len(kept) > 6 else "")
        lines.append(f"initializer did not apply to {len(kept)} module(s), kept as built: {shown}")
    if not lines:
        return None
    text = Text()
    for i, line in enumerate(lines):
        if i:
            text.append("\n")
        text.append("note: ", style="bold yellow")
        text.append(line)
    return text


def render_report(report: Any, width: int | None = None, *, max_rows: int | None = None) -> RenderableType:
    """Header with the verdict, notes, the per-layer table (name, type, output shape, activation and
    gradient variance each with a depth bar, flags) and the findings panel.

    ``width`` fixes the table width (None: fit the console); ``max_rows`` elides the middle of
    long tables.
    """
    parts: list[RenderableType] = [render_header(report)]
    notes = _notes(report)
    if notes is not None:
        parts.append(notes)
    parts.append(_layers_table(report, width, max_rows))
    if report.verdict is not None or report.findings:
        parts.append(render_findings(report))
    return Group(*parts)


def _forward_profile(report: Any) -> list[float | None]:
    """log10 of the diagnosis's forward ratios (signal variance at weighted layers relative to the
    first); the activation variance of every layer when there are no weighted layers."""
    from gradprobe.diagnose.profile import depth_profile

    _, ratios = depth_profile(report).forward()
    if len(ratios) >= 2:
        return [_log10(r) for r in ratios]
    return [_log10(signal_var(x)) for x in report.layers]


def render_compare(reports: Sequence[Any], *, labels: Sequence[str] | None = None) -> Table:
    """One table ranking the reports (best first): verdict, worst gain, finding counts and codes, and
    each one's forward signal profile (weighted layers, as the diagnosis reads it) on a shared scale."""
    from gradprobe.api import rank, worst_gain

    names = (
        list(labels) if labels is not None else [str(r.meta.get("init", i)) for i, r in enumerate(reports)]
    )
    label_of = {id(r): n for r, n in zip(reports, names)}
    ordered = rank(reports)
    all_logs = [_forward_profile(r) for r in ordered]
    lo, hi = _scale([v for logs in all_logs for v in logs])

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("init", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("worst gain", no_wrap=True)
    table.add_column("signal profile", no_wrap=True, style="green")
    table.add_column("findings", overflow="fold")
    for i, (report, logs) in enumerate(zip(ordered, all_logs), start=1):
        gain = worst_gain(report)
        verdict = report.verdict or "—"
        style = "bold red" if verdict == "unstable" else "bold green" if verdict == "stable" else ""
        codes = Text()
        for severity in ("error", "warning"):
            for code in dict.fromkeys(f.code for f in report.findings if f.severity == severity):
                if codes:
                    codes.append("\n")
                codes.append(f"{_SEVERITY_MARK[severity]} {code}", style=_SEVERITY_STYLE[severity])
        table.add_row(
            str(i),
            Text(label_of[id(report)]),
            Text(verdict, style=style),
            "—"
            if gain is None
            else f"{'act' if gain.direction == 'activation' else 'grad'} ×{gain.ratio:.1e}",
            sparkline(logs, lo, hi, width=12),
            codes if codes else "—",
        )
    return table
