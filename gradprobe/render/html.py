"""A report as one self-contained HTML fragment: the notebook display of :class:`Report`.

No JavaScript, no network, no external stylesheet. Everything that carries meaning (bar lengths,
badge colours) is in inline ``style`` attributes, so the table reads the same where a host strips
``<style>`` elements (GitHub's notebook viewer, sanitising renderers); the ``<style>`` block only
refines. Text inherits the page's colour, and the few fixed colours are mid-tones readable on light
and dark backgrounds (badges carry their own background), with a ``prefers-color-scheme`` refinement.

Each layer's bars show log10 of its value relative to the diagnosis's reference point (the first
weighted layer's activation signal variance, the last weighted layer's gradient energy): left of the
centre tick is smaller, right is larger, the tinted zone is the stable band.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from gradprobe.render.plots import (
    ACT_COLOUR,
    GRAD_COLOUR,
    POINTWISE_TYPES,
    RELU_FAMILY,
    activation_level,
    gradient_level,
    predicted_activation,
    predicted_gradient,
    references,
    stable_band,
    total_activation,
)

if TYPE_CHECKING:
    from gradprobe.report import LayerRecord, Report

__all__ = ["render_html"]

_BADGE = {
    # background, text: each pair ≥ 4.5:1, and the backgrounds stand out on white and on near-black
    "error": ("#C0162B", "#FFFFFF"),
    "warning": ("#E69F00", "#000000"),
    "info": ("#2F6DB5", "#FFFFFF"),
    "stable": ("#1A7F4B", "#FFFFFF"),
    "unstable": ("#C0162B", "#FFFFFF"),
    "unknown": ("#6B6B6B", "#FFFFFF"),
}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_TRACK_PX = 120  # width of one bar track
_BAR_RED = "#D7263D"  # a bar outside the stable band

_CSS = """
.gradprobe-report{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:12.5px;
 line-height:1.35;color:inherit;max-width:100%}
.gradprobe-report table.gp-table{border-collapse:collapse;margin:6px 0;color:inherit;background:transparent}
.gradprobe-report table.gp-table th,.gradprobe-report table.gp-table td{padding:2px 8px;text-align:left;
 border:none;border-bottom:1px solid rgba(127,127,127,.25);white-space:nowrap;vertical-align:middle;
 background:transparent;color:inherit}
.gradprobe-report table.gp-table th{font-weight:600;border-bottom:1px solid rgba(127,127,127,.6)}
.gradprobe-report table.gp-table tr.gp-pointwise td{opacity:.62}
.gradprobe-report td.gp-num{text-align:right;font-variant-numeric:tabular-nums}
.gradprobe-report code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.95em;
 background:transparent;color:inherit}
.gradprobe-report .gp-muted{opacity:.7}
.gradprobe-report .gp-badge{display:inline-block;font-size:11px;line-height:16px;vertical-align:middle;
 white-space:nowrap}
.gradprobe-report ul.gp-findings{margin:4px 0 2px 0;padding-left:1.2em}
.gradprobe-report ul.gp-findings li{margin:3px 0}
@media (prefers-color-scheme: dark){
 .gradprobe-report table.gp-table th,.gradprobe-report table.gp-table td{border-bottom-color:rgba(200,200,200,.22)}
}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _badge(kind: str, text: str | None = None) -> str:
    bg, fg = _BADGE.get(kind, _BADGE["unknown"])
    return (
        f'<span class="gp-badge gp-{_e(kind)}" style="background:{bg};color:{fg};padding:0 6px;'
        f'border-radius:8px;font-weight:600">{_e(text or kind)}</span>'
    )


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v == 0:
        return "0"
    if math.isinf(v):
        return "inf" if v > 0 else "−inf"
    return f"{v:.2e}"


def _track_css(cls: str, ref: float, decades: float, band: tuple[float, float]) -> str:
    """The track decoration of one column (stable band and centre tick), as a CSS rule: identical for
    every row, so it lives in the ``<style>`` block; without it the bars still read."""
    half = _TRACK_PX / 2
    grey, tint, tick = "rgba(127,127,127,.14)", "rgba(0,158,115,.25)", "rgba(127,127,127,.95)"
    stops = [f"{grey} 0"]
    if math.isfinite(ref) and ref > 0:
        lo = half + max(-decades, math.log10(band[0])) / decades * half
        hi = half + min(decades, math.log10(band[1])) / decades * half
        stops += [f"{grey} {lo:.0f}px", f"{tint} {lo:.0f}px", f"{tint} {hi:.0f}px", f"{grey} {hi:.0f}px"]
    return (
        f".gradprobe-report .{cls}{{background:"
        f"linear-gradient(to right,transparent {half - 0.5:.1f}px,{tick} {half - 0.5:.1f}px,"
        f"{tick} {half + 0.5:.1f}px,transparent {half + 0.5:.1f}px),"
        f"linear-gradient(to right,{','.join(stops)}) !important}}"
    )


def _bar(value: float, ref: float, decades: float, band: tuple[float, float], colour: str, cls: str) -> str:
    """A diverging bar of log10(value / ref) on a track spanning ±``decades`` (centre = reference)."""
    half = _TRACK_PX / 2
    hatch = "repeating-linear-gradient(45deg,{c} 0 3px,transparent 3px 6px)"
    bar, title = "", ""
    if math.isnan(value) or not (math.isfinite(ref) and ref > 0):
        pass
    elif math.isinf(value):
        bar, title = _segment(half, half, hatch.format(c=_BAR_RED)), "not finite"
    elif value <= 0:
        bar, title = _segment(0, half, hatch.format(c=colour)), "exactly zero"
    else:
        r = math.log10(value / ref)
        clipped = max(-decades, min(decades, r))
        width = max(abs(clipped) / decades * half, 1.0)
        start = half if clipped >= 0 else half - width
        outside = not band[0] <= value / ref <= band[1]
        bar, title = _segment(start, width, _BAR_RED if outside else colour), f"{r:+.1f} decades"
    return (
        f'<span class="gp-bar {cls}" title="{_e(title)}" style="display:inline-block;position:relative;'
        f"width:{_TRACK_PX}px;height:10px;vertical-align:middle;margin-right:6px;"
        f'background:rgba(127,127,127,.14)">{bar}</span>'
    )


def _segment(left: float, width: float, background: str) -> str:
    return (
        f'<span style="position:absolute;top:1px;height:8px;left:{left:.0f}px;width:{width:.0f}px;'
        f'background:{background}"></span>'
    )


def _decades(values: Iterable[float], ref: float, band: tuple[float, float]) -> float:
    """Half-width of the bar tracks: the largest |log10 ratio| in the report, at least the band's."""
    spans = [abs(math.log10(band[0])), abs(math.log10(band[1]))]
    if math.isfinite(ref) and ref > 0:
        spans += [abs(math.log10(v / ref)) for v in values if math.isfinite(v) and v > 0]
    return max(1.0, min(40.0, max(spans)))


def _layer_span(names: Sequence[str]) -> str:
    if len(names) <= 3:
        return ", ".join(f"<code>{_e(n)}</code>" for n in names)
    return f"<code>{_e(names[0])}</code> … <code>{_e(names[-1])}</code> ({len(names)} layers)"


def _shape(layer: LayerRecord) -> str:
    return "×".join(str(d) for d in layer.output_shape[1:]) or "scalar"


def _units(layer: LayerRecord) -> str:
    if layer.act is None:
        return "—"
    text = str(layer.act.units)
    dead = layer.act.dead_units
    relu_like = layer.type in RELU_FAMILY or (layer.activation or "") in RELU_FAMILY
    if relu_like and dead:
        text += f' <span class="gp-muted">({dead} never positive)</span>'
    return text


def _value_cell(
    value: float,
    theory: str,
    ref: float,
    decades: float,
    band: tuple[float, float],
    colour: str,
    cls: str,
) -> str:
    note = f'<br><span class="gp-muted" style="font-size:11px">{theory}</span>' if theory else ""
    return f"<td>{_bar(value, ref, decades, band, colour, cls)}<code>{_fmt(value)}</code>{note}</td>"


def _theory_notes(layer: LayerRecord) -> tuple[str, str]:
    """The mean-field predictions beside the measurement they predict (like with like): the total
    activation variance ``act.var``, and the gradient variance as a per-sample energy."""
    act = ""
    predicted = predicted_activation(layer)
    if math.isfinite(predicted):
        act = f"var {_fmt(total_activation(layer))} · theory {_fmt(predicted)}"
    grad = ""
    predicted = predicted_gradient(layer)
    if math.isfinite(predicted):
        grad = f"theory {_fmt(predicted)}"
    return act, grad


def _header(report: Report) -> str:
    meta = report.meta
    errors = sum(1 for f in report.findings if f.severity == "error")
    warnings = sum(1 for f in report.findings if f.severity == "warning")
    verdict = report.verdict or "unknown"
    bits = [f"<strong>{_e(meta.get('model', 'model'))}</strong>"]
    if "init" in meta:
        bits.append(f"init <code>{_e(meta['init'])}</code>")
    for key, label in (("loss", "loss"), ("samples", "samples"), ("seed", "seed"), ("mode", "mode")):
        if key in meta:
            bits.append(f"{label} {_e(meta[key])}")
    counts = f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"
    return (
        f'<div style="margin:2px 0 4px 0">{_badge(verdict, "verdict: " + verdict if report.verdict else "not diagnosed")} '
        f'{" · ".join(bits)} · <span class="gp-muted">{len(report.layers)} layers, {counts}</span></div>'
    )


def _findings(report: Report) -> str:
    if not report.findings:
        return '<div class="gp-muted" style="margin:4px 0">No findings.</div>' if report.verdict else ""
    items = []
    for f in sorted(report.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 9)):
        where = f" at {_layer_span(list(f.layers))}" if f.layers else ""
        fix = f'<br><span style="margin-left:1em">Fix: {_e(f.suggestion)}</span>' if f.suggestion else ""
        items.append(
            f'<li class="gp-finding" style="margin:3px 0">{_badge(f.severity)} <code><strong>{_e(f.code)}</strong></code>'
            f"{where}: {_e(f.message)}{fix}</li>"
        )
    suggestion = report.meta.get("suggestion")
    if isinstance(suggestion, dict) and suggestion.get("init"):
        items.append(
            f'<li style="margin:3px 0">{_badge(str(suggestion.get("verdict", "unknown")), "re-probed")} '
            f"with <code>{_e(suggestion['init'])}</code>: {_e(suggestion.get('verdict', '?'))}</li>"
        )
    return f'<ul class="gp-findings" style="margin:4px 0;padding-left:1.2em">{"".join(items)}</ul>'


def render_html(report: Report) -> str:
    """The report as a self-contained HTML fragment (inline CSS, no scripts, no network).

    A header with the verdict and run metadata; a per-layer table (name, type, output shape, units,
    activation signal variance and gradient energy, each with a bar of its log10 ratio to the
    reference point and the theory's prediction when attached, and badges of the findings that name
    the layer); then the findings with their suggestions.
    """
    refs = references(report)
    act_band, _ = stable_band("activations")
    grad_band, _ = stable_band("gradients")
    acts = [activation_level(x) for x in report.layers]
    grads = [gradient_level(x) for x in report.layers]
    act_decades = _decades(acts, refs.act, act_band)
    grad_decades = _decades(grads, refs.grad, grad_band)
    flagged: dict[str, dict[str, list[str]]] = {}
    for f in report.findings:
        for name in f.layers:
            codes = flagged.setdefault(name, {}).setdefault(f.severity, [])
            if f.code not in codes:
                codes.append(f.code)

    rows = []
    for i, layer in enumerate(report.layers):
        badges = []
        by_severity = flagged.get(layer.name, {})
        for severity in sorted(by_severity, key=lambda s: _SEVERITY_ORDER.get(s, 9)):
            for code in by_severity[severity]:
                badges.append(_badge(severity, code))
        theory = _theory_notes(layer)
        worst = min(by_severity, key=lambda s: _SEVERITY_ORDER.get(s, 9)) if by_severity else None
        edge = f"box-shadow:inset 3px 0 0 {_BADGE[worst][0]};" if worst in _BADGE else ""
        css = ' class="gp-pointwise"' if layer.type in POINTWISE_TYPES else ""
        ref_mark = []
        if layer.name == refs.act_layer:
            ref_mark.append("forward reference")
        if layer.name == refs.grad_layer:
            ref_mark.append("backward reference")
        name_note = (
            f' <span class="gp-muted" style="font-size:11px">({", ".join(ref_mark)})</span>'
            if ref_mark
            else ""
        )
        rows.append(
            f'<tr{css} data-layer="{_e(layer.name)}">'
            f'<td class="gp-num" style="{edge}text-align:right">{i}</td>'
            f"<td><code>{_e(layer.name)}</code>{name_note}</td>"
            f"<td>{_e(layer.type)}{' → ' + _e(layer.activation) if layer.activation else ''}</td>"
            f'<td class="gp-num" style="text-align:right">{_e(_shape(layer))}</td>'
            f'<td class="gp-num" style="text-align:right">{_units(layer)}</td>'
            f"{_value_cell(acts[i], theory[0], refs.act, act_decades, act_band, ACT_COLOUR, 'gp-track-act')}"
            f"{_value_cell(grads[i], theory[1], refs.grad, grad_decades, grad_band, GRAD_COLOUR, 'gp-track-grad')}"
            f'<td class="gp-flags" style="white-space:normal;min-width:140px">{" ".join(badges)}</td></tr>'
        )
    head = (
        "<thead><tr><th>#</th><th>layer</th><th>type</th><th>output</th><th>units</th>"
        f'<th title="mean over units of each unit\'s variance across samples">activation signal variance'
        f' <span class="gp-muted">(±{act_decades:.0f} decades)</span></th>'
        f'<th title="E[g²] × elements per sample">gradient energy per sample'
        f' <span class="gp-muted">(±{grad_decades:.0f} decades)</span></th><th>findings</th></tr></thead>'
    )
    table = f'<table class="gp-table" style="border-collapse:collapse">{head}<tbody>{"".join(rows)}</tbody></table>'
    if len(report.layers) > 40:
        table = f'<div style="max-height:560px;overflow:auto">{table}</div>'
    legend = (
        '<div class="gp-muted" style="font-size:11px;margin:0 0 4px 0">Bars: log10 of each value over the '
        "reference (first weighted layer forward, last weighted layer backward); the centre tick is the "
        "reference, the tinted zone the stable band, red bars lie outside it, hatched bars are exactly "
        "zero (left) or not finite (right).</div>"
    )
    tracks = _track_css("gp-track-act", refs.act, act_decades, act_band) + _track_css(
        "gp-track-grad", refs.grad, grad_decades, grad_band
    )
    return (
        f'<div class="gradprobe-report" style="color:inherit;font-size:12.5px;line-height:1.35">'
        f"<style>{_CSS}{tracks}</style>{_header(report)}{table}{legend}{_findings(report)}</div>"
    )
