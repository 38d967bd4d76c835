"""Figures of a :class:`~gradprobe.report.Report`: depth profile, comparison, histograms, unit map.

Every function is a pure function of reports and returns a :class:`ReportFigure`, a matplotlib
``Figure`` with :meth:`~ReportFigure.save` (png, svg or pdf, chosen by the file's extension). The
figures are built without pyplot, rendered by the Agg backend whatever the display, and never
registered with pyplot's global figure list: a notebook shows one when it is a cell's value, a
script saves it. matplotlib is imported only when a figure is drawn.

What is plotted is what the diagnosis reads (see :mod:`gradprobe.diagnose.thresholds`):

* forward, each layer's **signal variance** (``TensorStats.signal_var``: the mean over units of each
  unit's variance across samples, so constant per-unit offsets such as a bias carry no weight);
* backward, each layer's **gradient energy** per sample (``TensorStats.energy``:
  ``E[g²]·elements per sample``), which survives flatten, pooling and heads.

Both are judged relative to the network's own reference points: the first weighted layer forward, the
last weighted layer backward. The shaded *stable band* spans the diagnosis's warning thresholds
around that reference; dotted lines mark its error thresholds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradprobe.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradprobe.report import LayerRecord, Report, TensorStats

    class ReportFigure(Figure):
        """What the plotting functions return (built at run time by :func:`_figure_class`)."""

        def save(self, path: str | Path, *, dpi: float = 150, transparent: bool = False) -> Path: ...


__all__ = [
    "ReportFigure",  # built on first use (see __getattr__), so that importing this module skips matplotlib
    "SAVE_FORMATS",
    "POINTWISE_TYPES",
    "plot_report",
    "plot_compare",
    "plot_histograms",
    "plot_units",
    "select_layers",
    "unit_status",
    "references",
    "References",
    "stable_band",
    "activation_level",
    "gradient_level",
    "predicted_activation",
    "predicted_gradient",
    "total_activation",
    "RELU_FAMILY",
]

SAVE_FORMATS = ("png", "svg", "pdf")

# Parameter-free (or per-element) modules that only transform a layer's output in place. The depth
# profile folds them into the layer before them by default: a ReLU after every Linear would otherwise
# make every profile a zig-zag, and the theory predicts pre-activations.
POINTWISE_TYPES = frozenset(
    {
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
        "Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "Softshrink",
        "Hardshrink", "Tanhshrink", "LogSigmoid", "Threshold", "Dropout", "Dropout1d", "Dropout2d",
        "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity", "Flatten", "Unflatten",
    }
)  # fmt: skip

# Activations (tracer names and module types) after which a unit that is never positive passes
# neither signal nor gradient: "dead". Leaky variants still pass a gradient, so they are not here.
RELU_FAMILY = frozenset({"relu", "relu6", "ReLU", "ReLU6"})

# Fallbacks for the diagnosis's defaults, used only when gradprobe.diagnose cannot be imported.
_BAND_FALLBACK = (1e-4, 1e4)
_ERROR_FALLBACK = (1e-8, 1e8)

# Colours: readable on white, distinct for the common colour-vision deficiencies (Okabe & Ito).
ACT_COLOUR = "#0072B2"
GRAD_COLOUR = "#D55E00"
SEVERITY_COLOURS = {"error": "#C0162B", "warning": "#E69F00", "info": "#3A7DC9"}
SEVERITY_MARKERS = {"error": "X", "warning": "D", "info": "o"}
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
_BAND_COLOUR = "#009E73"
DEAD_COLOUR = "#000000"
SYMMETRIC_COLOUR = "#F0E442"
_MISSING_COLOUR = "#D9D9D9"
# Qualitative palette for comparisons (Okabe & Ito, then tab10 for more).
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000", "#E69F00", "#56B4E9", "#999999")
# Markers cycle with the colours, so that lines lying on top of each other stay distinguishable.
_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")

LayerSelection = str | Sequence[str] | Callable[["LayerRecord"], bool] | None


# --------------------------------------------------------------------------------------------
# The figure class
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _figure_class() -> type[ReportFigure]:
    from matplotlib.figure import Figure

    class ReportFigure(Figure):
        """A matplotlib ``Figure`` that saves itself by extension and displays itself in notebooks."""

        def save(self, path: str | Path, *, dpi: float = 150, transparent: bool = False) -> Path:
            """Write the figure to ``path`` as png, svg or pdf, chosen by the extension.

            Raises :class:`~gradprobe.errors.UsageError` for any other extension.
            """
            path = Path(path)
            fmt = path.suffix.lower().lstrip(".")
            if fmt not in SAVE_FORMATS:
                raise UsageError(
                    f"cannot save a figure as {path.name!r}: unknown format {fmt or '(no extension)'!r}",
                    hint=f"valid extensions: {', '.join('.' + f for f in SAVE_FORMATS)}",
                )
            self.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", transparent=transparent)
            return path

        def _repr_png_(self) -> bytes:
            # Shown in Jupyter even when pyplot (and with it the inline backend) was never imported.
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            return buf.getvalue()

    # Picklable by name through the module's __getattr__.
    ReportFigure.__module__ = __name__
    ReportFigure.__qualname__ = "ReportFigure"
    return ReportFigure  # type: ignore[return-value]


def __getattr__(name: str) -> Any:
    if name == "ReportFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _new_figure(width: float, height: float) -> ReportFigure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure_class()(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg whatever the display: no GUI, no pyplot state
    return fig


# --------------------------------------------------------------------------------------------
# What is plotted
# --------------------------------------------------------------------------------------------


def _is_weighted(layer: LayerRecord) -> bool:
    """A layer with a weight matrix or kernel (not a norm's 1-d scale)."""
    return any(len(p.shape) >= 2 for p in layer.params)


def select_layers(report: Report, layers: LayerSelection = "auto") -> list[LayerRecord]:
    """The layers a figure shows, in execution order.

    ``"auto"`` (default): every recorded layer except pointwise ones (activations, dropout, identity,
    flatten; see :data:`POINTWISE_TYPES`), which only transform the layer before them; all layers when
    that leaves none. ``"all"``: every layer. ``"weighted"``: layers with a weight matrix or kernel.
    A sequence of names, or a predicate ``LayerRecord -> bool``, picks them explicitly.
    """
    if layers is None or layers == "auto":
        chosen = [x for x in report.layers if x.type not in POINTWISE_TYPES]
        return chosen or list(report.layers)
    if layers == "all":
        return list(report.layers)
    if layers == "weighted":
        return [x for x in report.layers if _is_weighted(x)] or list(report.layers)
    if isinstance(layers, str):
        raise UsageError(
            f"unknown layer selection {layers!r}",
            hint="valid: 'auto', 'all', 'weighted', a list of layer names, or a predicate",
        )
    if callable(layers):
        return [x for x in report.layers if layers(x)]
    names = list(layers)
    known = {x.name: x for x in report.layers}
    missing = [n for n in names if n not in known]
    if missing:
        shown = ", ".join(list(known)[:8]) + ("…" if len(known) > 8 else "")
        raise UsageError(f"no layer named {', '.join(map(repr, missing))}; layers: {shown}")
    wanted = set(names)
    return [x for x in report.layers if x.name in wanted]


def activation_level(layer: LayerRecord) -> float:
    """Signal variance; NaN where nothing was recorded, +inf where the values were not finite."""
    if layer.act is None:
        return math.nan
    v = layer.act.signal_var
    return math.inf if math.isnan(v) else v


def gradient_level(layer: LayerRecord) -> float:
    """Gradient energy; NaN where no gradient was recorded, +inf where it was not finite."""
    if layer.grad is None:
        return math.nan
    v = layer.grad.energy
    return math.inf if math.isnan(v) else v


def _prediction(layer: LayerRecord, name: str) -> float:
    """``layer.<name>`` (the report field) or ``layer.extra[name]``, NaN when absent."""
    v = getattr(layer, name, None)
    if v is None:
        v = layer.extra.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def predicted_activation(layer: LayerRecord) -> float:
    """The mean-field prediction of the activation's *total* variance ``act.var`` (which includes the
    spread of the per-unit means, so it is compared with :func:`total_activation`, not with the
    signal variance)."""
    return _prediction(layer, "predicted_act_var")


def total_activation(layer: LayerRecord) -> float:
    """The measured ``act.var``, what the theory predicts; NaN where nothing was recorded."""
    return math.nan if layer.act is None else layer.act.var


def predicted_gradient(layer: LayerRecord) -> float:
    """The theory's gradient variance as a per-sample energy (× elements per sample), comparable with
    ``grad.energy`` (gradients have mean ≈ 0 at init)."""
    return _prediction(layer, "predicted_grad_var") * layer.elements_per_sample


def _usable(v: float) -> bool:
    return math.isfinite(v) and v > 0


@dataclass(frozen=True)
class References:
    """The levels the diagnosis judges against: forward and backward reference, with their layers."""

    act: float
    act_layer: str | None
    grad: float
    grad_layer: str | None


def references(report: Report) -> References:
    """First weighted layer's signal variance; last weighted layer's gradient energy (the diagnosis's
    reference points), falling back to the first/last layer with a usable value."""
    weighted = [x for x in report.layers if _is_weighted(x)]

    def first(
        layers: Iterable[LayerRecord], level: Callable[[LayerRecord], float]
    ) -> tuple[str | None, float]:
        return next(((x.name, level(x)) for x in layers if _usable(level(x))), (None, math.nan))

    act = first(weighted, activation_level)
    if act[0] is None:
        act = first(report.layers, activation_level)
    grad = first(reversed(weighted), gradient_level)
    if grad[0] is None:
        grad = first(reversed(report.layers), gradient_level)
    return References(act=act[1], act_layer=act[0], grad=grad[1], grad_layer=grad[0])


def stable_band(direction: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(warning band, error band) as cumulative ratios for ``"activations"`` or ``"gradients"``, from
    the diagnosis's defaults (per-direction names first, then shared ones, then the fallbacks)."""
    try:
        from gradprobe.diagnose.thresholds import Thresholds

        t: Any = Thresholds()
    except Exception:  # the diagnosis is optional for plotting
        t = None

    def read(kind: str, level: str, fallback: float) -> float:
        for name in (f"{kind}_{direction}_{level}", f"{kind}_{level}"):
            value = getattr(t, name, None)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
        return fallback

    return (
        (read("vanishing", "warning", _BAND_FALLBACK[0]), read("exploding", "warning", _BAND_FALLBACK[1])),
        (read("vanishing", "error", _ERROR_FALLBACK[0]), read("exploding", "error", _ERROR_FALLBACK[1])),
    )


def _panels_of(code: str) -> tuple[str, ...]:
    """Which depth-profile panels a finding code belongs on: gradient codes on the gradient panel,
    forward ones (activations, dead and saturated units) on the activation panel, the rest on both."""
    if "grad" in code:
        return ("gradients",)
    if any(word in code for word in ("activation", "dead", "saturat")):
        return ("activations",)
    return ("activations", "gradients")


Flags = dict[int, dict[str, list[str]]]  # x position → severity → codes


def _flag_positions(report: Report, shown: Sequence[LayerRecord], panel: str | None = None) -> Flags:
    """Every finding's layers as x positions in ``shown``, with the severities and codes there.

    A flagged layer that is not shown (a ReLU folded into its Linear) is marked at the nearest shown
    layer at or before it in execution order (the first shown layer when none precedes it). With
    ``panel`` only the findings that belong on that panel (see :func:`_panels_of`).
    """
    order = {x.name: i for i, x in enumerate(report.layers)}
    shown_order = [order.get(x.name, -1) for x in shown]
    position = {x.name: i for i, x in enumerate(shown)}
    flags: Flags = {}
    for f in report.findings:
        if panel is not None and panel not in _panels_of(f.code):
            continue
        for name in getattr(f, "layers", ()):
            if name in position:
                x = position[name]
            elif name in order and shown_order:
                before = [i for i, o in enumerate(shown_order) if o <= order[name]]
                x = before[-1] if before else 0
            else:
                continue
            codes = flags.setdefault(x, {}).setdefault(f.severity, [])
            if f.code not in codes:
                codes.append(f.code)
    return flags


def _worst(severities: Iterable[str]) -> str:
    return min(severities, key=lambda s: _SEVERITY_RANK.get(s, 9))


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


def _shorten(name: str, limit: int = 28) -> str:
    if len(name) <= limit:
        return name
    keep = (limit - 1) // 2
    return name[:keep] + "…" + name[-(limit - 1 - keep) :]


def _layer_ticks(ax: Axes, names: Sequence[str], always: Iterable[int] = (), max_labels: int = 40) -> None:
    """Layer names on the x axis, rotated, thinned to at most ``max_labels`` (flagged layers kept)."""
    n = len(names)
    step = max(1, math.ceil(n / max_labels))
    ticks = sorted(set(range(0, n, step)) | {n - 1} | set(always)) if n else []
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [_shorten(names[i]) for i in ticks],
        rotation=90 if n > 12 else 45,
        ha="center" if n > 12 else "right",
        rotation_mode="default" if n > 12 else "anchor",
        fontsize=7 if n > 24 else 8,
    )
    ax.set_xlim(-0.6, max(n - 0.4, 0.6))


def _log_limits(values: Iterable[float], extra: Iterable[float] = ()) -> tuple[float, float]:
    v = np.asarray([x for x in [*values, *extra] if _usable(x)], dtype=float)
    if v.size == 0:
        return 1e-3, 1e3
    lo, hi = float(v.min()), float(v.max())
    lo_d, hi_d = math.floor(math.log10(lo) - 0.3), math.ceil(math.log10(hi) + 0.3)
    if hi_d - lo_d < 2:
        lo_d, hi_d = lo_d - 1, hi_d + 1
    return 10.0**lo_d, 10.0**hi_d


def _positive(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Values for a log axis: zero, negative and non-finite values become gaps in the line."""
    a = np.asarray(values, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _off_scale(
    ax: Axes, x: np.ndarray, values: Sequence[float] | np.ndarray, colour: str, with_label: bool
) -> None:
    """Mark exact zeros at the bottom of a log axis and non-finite values at the top."""
    a = np.asarray(values, dtype=float)
    lo, hi = ax.get_ylim()
    zero = a == 0
    if zero.any():
        ax.scatter(
            x[zero], np.full(int(zero.sum()), lo), marker="v", s=30, facecolors="none", edgecolors=colour,
            clip_on=False, zorder=4, label="exactly zero (off scale)" if with_label else "_nolegend_",
        )  # fmt: skip
    bad = np.isinf(a)  # NaN means "not recorded" (a layer without gradient): nothing to mark
    if bad.any():
        ax.scatter(
            x[bad], np.full(int(bad.sum()), hi), marker="^", s=30, color=colour, clip_on=False, zorder=4,
            label="non-finite (off scale)" if with_label else "_nolegend_",
        )  # fmt: skip


def _power(v: float) -> str:
    """``1e-05`` → ``10⁻⁵`` (mathtext), other numbers as ``g``."""
    k = math.log10(v) if v > 0 else math.nan
    if math.isfinite(k) and abs(k - round(k)) < 1e-9:
        return f"$10^{{{round(k)}}}$"
    return f"{v:g}"


def _band(ax: Axes, ref: float, where: str | None, direction: str) -> None:
    """Shade the stable band around ``ref`` and dot the error thresholds."""
    if not _usable(ref):
        return
    (w_lo, w_hi), (e_lo, e_hi) = stable_band(direction)
    label = f"stable band ({_power(w_lo)}…{_power(w_hi)} × {where})" if where else "stable band (no warning)"
    ax.axhspan(ref * w_lo, ref * w_hi, color=_BAND_COLOUR, alpha=0.09, lw=0, zorder=0, label=label)
    ax.axhline(ref, color=_BAND_COLOUR, lw=0.8, ls=(0, (1, 2)), zorder=1)
    for level in (ref * e_lo, ref * e_hi):
        ax.axhline(level, color=SEVERITY_COLOURS["error"], lw=0.8, ls=(0, (1, 3)), alpha=0.7, zorder=1)


def _mark_flags(ax: Axes, flags: Flags, y: np.ndarray) -> None:
    """One scatter per severity at the flagged x positions (each x in its worst severity), on the
    curve, or at the axis bottom where the curve has no value; the legend names the codes."""
    lo, _ = ax.get_ylim()
    for severity in ("error", "warning", "info"):
        xs = sorted(x for x, by in flags.items() if _worst(by) == severity)
        if not xs:
            continue
        codes = sorted({c for by in flags.values() for c in by.get(severity, [])})
        label = f"{severity}: {', '.join(codes[:3])}{'…' if len(codes) > 3 else ''}"
        ys = [y[x] if x < len(y) and _usable(float(y[x])) else lo for x in xs]
        ax.scatter(
            xs, ys, marker=SEVERITY_MARKERS[severity], s=70, color=SEVERITY_COLOURS[severity],
            edgecolors="white", linewidths=0.8, zorder=5, clip_on=False, label=label, gid=f"flags-{severity}",
        )  # fmt: skip
        for x in xs:
            ax.axvline(x, color=SEVERITY_COLOURS[severity], alpha=0.12, lw=4, zorder=0)


def _title(report: Report) -> str:
    meta = report.meta
    parts = [str(meta.get("model", "model")), f"init {meta.get('init', '?')}"]
    if report.verdict:
        parts.append(f"verdict: {report.verdict}")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# plot_report
# --------------------------------------------------------------------------------------------


def plot_report(
    report: Report,
    *,
    layers: LayerSelection = "auto",
    band: bool = True,
    width: float | None = None,
) -> ReportFigure:
    """Depth profile: activation signal variance (top) and gradient energy (bottom) per layer.

    Both on log axes, layers in execution order on the shared x axis. The stable band (the
    diagnosis's warning thresholds around the first weighted layer forward and the last weighted
    layer backward) is shaded and its error thresholds dotted; layers named by a finding are marked by
    severity; theory predictions (``layer.predicted_act_var``, ``layer.predicted_grad_var``) are
    drawn dashed, the activation one beside the measured total variance it predicts. Exact zeros are marked at the bottom edge (``v``), non-finite values at the top.

    Args:
        report: the probe's report.
        layers: which layers to show (see :func:`select_layers`); flagged layers that are not shown
            are marked at the layer before them.
        band: shade the stable band.
        width: figure width in inches (default: grows with depth).
    """
    shown = select_layers(report, layers)
    if not shown:
        raise UsageError("the report has no layers to plot")
    n = len(shown)
    names = [x.name for x in shown]
    x = np.arange(n)
    act = [activation_level(layer) for layer in shown]
    grad = [gradient_level(layer) for layer in shown]
    pred_act = [predicted_activation(layer) for layer in shown]
    pred_grad = [predicted_gradient(layer) for layer in shown]
    totals = [total_activation(layer) for layer in shown]
    refs = references(report)
    flags = {panel: _flag_positions(report, shown, panel) for panel in ("activations", "gradients")}
    fig = _new_figure(width or min(16.0, max(7.0, 3.0 + 0.16 * n)), 6.8 if n > 12 else 6.2)
    ax_act, ax_grad = fig.subplots(2, 1, sharex=True)
    fig.suptitle(_title(report), fontsize=10)

    panels = (
        (ax_act, act, pred_act, ACT_COLOUR, refs.act, refs.act_layer,
         "activation signal variance\n(between samples, mean over units)", "measured activation", "activations"),
        (ax_grad, grad, pred_grad, GRAD_COLOUR, refs.grad, refs.grad_layer,
         "gradient energy per sample\n(E[g²] × elements per sample)", "measured gradient", "gradients"),
    )  # fmt: skip
    for ax, values, predicted, colour, ref, ref_layer, ylabel, label, direction in panels:
        ax.set_yscale("log")
        ax.set_ylim(*_log_limits(values, [*predicted, ref]))
        if band:
            _band(ax, ref, f"layer {_shorten(ref_layer or '?', 18)}", direction)
        ax.plot(x, _positive(values), color=colour, marker="o", ms=3.5, lw=1.6, label=label, zorder=3)
        if any(_usable(v) for v in predicted):
            if direction == "activations":
                # The theory predicts the total variance: show the measured one beside it, like with like.
                ax.plot(x, _positive(totals), color=colour, marker="s", ms=2.5, lw=0.8, alpha=0.55,
                        label="measured total variance", zorder=2)  # fmt: skip
            ax.plot(
                x, _positive(predicted), color="0.25", ls="--", lw=1.1, label="theory (mean field)", zorder=4
            )
        _off_scale(ax, x, values, colour, with_label=True)
        _mark_flags(ax, flags[direction], _positive(values))
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    _layer_ticks(ax_grad, names, always=[*flags["activations"], *flags["gradients"]])
    ax_act.tick_params(labelbottom=False)
    ax_grad.set_xlabel("layer (execution order)", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# plot_compare
# --------------------------------------------------------------------------------------------


def plot_compare(
    reports: Sequence[Report] | Mapping[str, Report],
    labels: Sequence[str] | None = None,
    *,
    layers: LayerSelection = "auto",
    relative: bool = True,
    band: bool = True,
    mark_findings: bool = True,
    title: str | None = None,
    width: float | None = None,
    floor: float | None = None,
) -> ReportFigure:
    """Several reports (typically one model under several initializers) on one depth axis.

    One line per report in each panel: activation signal variance (top) and gradient energy
    (bottom), log scale. With ``relative=True`` (default) each report is divided by its own reference
    (first weighted layer forward, last weighted layer backward), the ratios the diagnosis judges, so
    every line starts (forward) or ends (backward) at 1 and the stable band is common to all.

    Args:
        reports: reports, or a mapping ``label -> report``.
        labels: one per report; default ``report.meta["init"]``.
        layers: layer selection applied to every report (see :func:`select_layers`).
        relative: plot ratios to each report's reference rather than absolute values.
        band: shade the stable band (``relative=True`` only).
        mark_findings: mark each report's error findings in its colour.
        title: figure title (default: the model's class name).
        width: figure width in inches.
        floor: the lowest value the y axes show (default: everything). A line that falls below it
            leaves the axes, marked by a ▼ at the bottom edge where it leaves, so that one vanishing
            initializer does not flatten the differences between the others.
    """
    from matplotlib.lines import Line2D

    if isinstance(reports, Mapping):
        if labels is None:
            labels = [str(k) for k in reports]
        reports = list(reports.values())
    reports = list(reports)
    if not reports:
        raise UsageError("no reports to compare")
    if labels is None:
        labels = [str(r.meta.get("init", f"report {i}")) for i, r in enumerate(reports)]
    labels = list(labels)
    if len(labels) != len(reports):
        raise UsageError(f"got {len(labels)} labels for {len(reports)} reports")
    shown = [select_layers(r, layers) for r in reports]
    n = max(len(s) for s in shown)
    if n == 0:
        raise UsageError("the reports have no layers to plot")
    fig = _new_figure(width or min(16.0, max(7.5, 3.5 + 0.16 * n)), 7.0 if n > 12 else 6.4)
    ax_act, ax_grad = fig.subplots(2, 1, sharex=True)
    model = reports[0].meta.get("model", "model")
    fig.suptitle(title or f"{model}: {len(reports)} initializations compared", fontsize=10)

    panel_values: dict[int, list[float]] = {0: [], 1: []}
    curves: list[tuple[int, np.ndarray, np.ndarray, str, str, str, list[int]]] = []
    for k, (report, layer_list, label) in enumerate(zip(reports, shown, labels)):
        refs = references(report)
        colour = _PALETTE[k] if k < len(_PALETTE) else f"C{k % 10}"
        marker = _MARKERS[k % len(_MARKERS)]
        for p, (getter, ref) in enumerate(((activation_level, refs.act), (gradient_level, refs.grad))):
            flags = _flag_positions(report, layer_list, "activations" if p == 0 else "gradients")
            errors = sorted(x for x, by in flags.items() if "error" in by) if mark_findings else []
            values = np.asarray([getter(x) for x in layer_list], dtype=float)
            if relative:
                values = values / ref if _usable(ref) else np.full_like(values, math.nan)
            panel_values[p].extend(values.tolist())
            curves.append((p, np.arange(len(layer_list)), values, colour, marker, label, errors))

    for p, ax in enumerate((ax_act, ax_grad)):
        ax.set_yscale("log")
        lo, hi = _log_limits(panel_values[p], [1.0] if relative else [])
        if floor is not None and floor > 0:
            lo = max(lo, floor)
        ax.set_ylim(lo, hi)
        if band and relative:
            _band(ax, 1.0, None, "activations" if p == 0 else "gradients")
    for k, (p, x, values, colour, marker, label, errors) in enumerate(curves):
        ax = ax_act if p == 0 else ax_grad
        ax.plot(
            x, _positive(values), color=colour, lw=1.6, marker=marker, ms=3.2, label=label, zorder=3 + k / 100
        )
        _off_scale(ax, x, values, colour, with_label=False)
        lo, _ = ax.get_ylim()
        visible = np.isfinite(values) & (values >= lo)
        below = np.isfinite(values) & (values > 0) & (values < lo)
        # One ▼ per stretch below the floor, at its end next to the visible part of the line.
        exits = [
            i
            for i in np.flatnonzero(below)
            if (i > 0 and visible[i - 1]) or (i + 1 < len(values) and visible[i + 1])
        ]
        if exits:
            ax.scatter(x[exits], np.full(len(exits), lo), marker="v", s=40, color=colour, clip_on=False, zorder=6,
                       label="_nolegend_", gid=f"leaves-{label}")  # fmt: skip
        shown_errors = [i for i in errors if visible[i]]
        if shown_errors:
            ax.scatter(shown_errors, values[shown_errors], marker="X", s=45, color=colour, edgecolors="white",
                       linewidths=0.6, zorder=5, label="_nolegend_", gid=f"flags-{label}")  # fmt: skip

    what = "÷ reference" if relative else ""
    ax_act.set_ylabel(f"activation signal variance {what}\n(first weighted layer = 1)" if relative
                      else "activation signal variance", fontsize=9)  # fmt: skip
    ax_grad.set_ylabel(f"gradient energy per sample {what}\n(last weighted layer = 1)" if relative
                       else "gradient energy per sample", fontsize=9)  # fmt: skip
    for ax in (ax_act, ax_grad):
        ax.grid(True, which="major", axis="y", alpha=0.3)
    names = [x.name for x in max(shown, key=len)]
    _layer_ticks(ax_grad, names)
    ax_act.tick_params(labelbottom=False)
    ax_grad.set_xlabel("layer (execution order)", fontsize=9)
    handles, texts = ax_act.get_legend_handles_labels()
    if any(
        c.get_gid() and c.get_gid().startswith("flags-") for ax in (ax_act, ax_grad) for c in ax.collections
    ):
        handles.append(Line2D([], [], marker="X", ls="none", color="0.35", markeredgecolor="white"))
        texts.append("layer with an error finding")
    if any(
        c.get_gid() and c.get_gid().startswith("leaves-") for ax in (ax_act, ax_grad) for c in ax.collections
    ):
        handles.append(Line2D([], [], marker="v", ls="none", color="0.35"))
        texts.append("the line continues below the axis")
    # Outside the axes: with lines spanning dozens of decades there is no empty corner to put it in.
    fig.legend(handles, texts, loc="outside right upper", fontsize=7.5, frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# plot_histograms
# --------------------------------------------------------------------------------------------


def _stats(layer: LayerRecord, kind: str) -> TensorStats | None:
    return layer.act if kind == "act" else layer.grad


def _check_kind(kind: str) -> None:
    if kind not in ("act", "grad"):
        raise UsageError(f"unknown kind {kind!r}; valid: 'act' (activations), 'grad' (gradients)")


def plot_histograms(
    report: Report,
    kind: str = "act",
    *,
    layers: LayerSelection = "all",
    max_panels: int = 48,
    columns: int | None = None,
) -> ReportFigure:
    """One panel per layer: the normalised histogram of its activations (``kind="act"``) or gradients.

    In the style of Glorot & Bengio (2010, Fig. 6), from the bounded histograms the hooks collect
    (``probe(..., histograms=True)``): fixed signed log-magnitude bins, four per decade. The x axis is
    symmetric-logarithmic: negative values on the left, exact zeros (and |x| < 1e-12) in the middle
    bin, positive values on the right, magnitudes growing outwards; only the occupied range is shown.
    Bar heights are the fraction of the layer's finite elements in each bin.

    Args:
        report: a report probed with ``histograms=True``.
        kind: ``"act"`` or ``"grad"``.
        layers: layer selection (see :func:`select_layers`); default every layer.
        max_panels: deeper selections are thinned evenly (first and last kept).
        columns: panels per row (default: up to 4).
    """
    from gradprobe.stats import HIST_BINS, HIST_LOG10_MIN, HIST_PER_DECADE

    _check_kind(kind)
    side = (HIST_BINS - 1) // 2
    chosen = [
        x for x in select_layers(report, layers)
        if (s := _stats(x, kind)) is not None and s.moments.histogram is not None
    ]  # fmt: skip
    if not chosen:
        any_hist = any(
            s is not None and s.moments.histogram is not None
            for x in report.layers for s in (x.act, x.grad)
        )  # fmt: skip
        if any_hist:
            raise UsageError(
                f"no layer in this selection has {'activation' if kind == 'act' else 'gradient'} histograms"
            )
        raise UsageError("this report has no histograms", hint="probe with histograms=True to collect them")
    total = len(chosen)
    if total > max_panels:
        keep = sorted({round(i) for i in np.linspace(0, total - 1, max_panels)})
        chosen = [chosen[i] for i in keep]
    counts = np.stack([np.asarray(_stats(x, kind).moments.histogram, dtype=float) for x in chosen])  # type: ignore[union-attr]
    # Fold to magnitude bins to find the occupied range, shared by every panel.
    neg = counts[:, :side][:, ::-1]  # magnitude bin k of the negative side
    pos = counts[:, side + 1 :]
    occupied = np.flatnonzero((neg + pos).sum(axis=0) > 0)
    k_lo, k_hi = (int(occupied[0]), int(occupied[-1])) if occupied.size else (side // 2 - 4, side // 2 + 4)
    k_lo, k_hi = max(0, k_lo - 1), min(side - 1, k_hi + 1)
    span = k_hi - k_lo + 1
    # Display order: negative from large to small magnitude, zero, positive from small to large.
    cols = (
        [side - 1 - k for k in range(k_hi, k_lo - 1, -1)]
        + [side]
        + [side + 1 + k for k in range(k_lo, k_hi + 1)]
    )
    edges = np.arange(-span - 0.5, span + 1.5, 1.0)  # unit-width bins, zero bin centred on 0
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)[:, cols]

    ncol = columns or min(4, len(chosen))
    nrow = math.ceil(len(chosen) / ncol)
    fig = _new_figure(2.6 * ncol + 0.6, 1.55 * nrow + 1.1)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, sharex=True, squeeze=False)).ravel()
    colour = ACT_COLOUR if kind == "act" else GRAD_COLOUR
    what = "activations" if kind == "act" else "gradients"
    note = f" ({len(chosen)} of {total} layers)" if len(chosen) < total else ""
    fig.suptitle(f"{_title(report)}\nnormalised histograms of {what}{note}", fontsize=10)

    # Decade ticks: magnitude edge k sits at x = 0.5 + (k - k_lo) on the right, mirrored on the left.
    # At most three labelled decades a side, the largest kept, none crowding the zero label.
    decade_ks = [k for k in range(k_hi + 1, k_lo - 1, -1) if k % HIST_PER_DECADE == 0]
    decade_ks = [k for k in decade_ks if 0.5 + k - k_lo >= 0.3 * span] or decade_ks[:1]
    step = max(1, math.ceil(len(decade_ks) / 3))
    decade_ks = sorted(decade_ks[::step])
    tick_x = [-(0.5 + k - k_lo) for k in reversed(decade_ks)] + [0.0] + [0.5 + k - k_lo for k in decade_ks]

    def power(k: int, sign: str) -> str:
        return f"${sign}10^{{{HIST_LOG10_MIN + k // HIST_PER_DECADE}}}$"

    tick_labels = [power(k, "-") for k in reversed(decade_ks)] + ["0"] + [power(k, "") for k in decade_ks]
    for i, ax in enumerate(axes):
        if i >= len(chosen):
            ax.set_visible(False)
            continue
        layer = chosen[i]
        ax.stairs(fractions[i], edges, fill=True, color=colour, alpha=0.85)
        ax.axvline(0, color="0.5", lw=0.5, zorder=0)
        ax.set_title(f"{_shorten(layer.name, 22)} ({layer.type})", fontsize=7.5, pad=2)
        zero_frac = fractions[i][span]
        if zero_frac > 0:
            ax.text(
                0.98,
                0.95,
                f"{zero_frac:.0%} zero",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=6.5,
            )
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(0, max(float(fractions[i].max()) * 1.15, 1e-3))
        ax.tick_params(labelsize=6.5)
        ax.set_xticks(tick_x)
        ax.set_xticklabels(tick_labels, fontsize=6.5)
    fig.supxlabel(f"{what[:-1]} value (signed log-magnitude; ¼-decade bins)", fontsize=9)
    fig.supylabel("fraction of elements", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# plot_units
# --------------------------------------------------------------------------------------------

NORMAL, DEAD, SYMMETRIC = 0, 1, 2


def _locked(example: Mapping[str, Any]) -> bool:
    """An example group training cannot separate: identical gradients ("locked"), or no gradient yet
    with identical outgoing weights. Groups whose gradients differ separate at the first step."""
    status = example.get("status", "locked")
    return status == "locked" or (status == "zero_gradient" and example.get("outgoing") == "identical")


def _symmetry_facts(layer: LayerRecord, units: int) -> tuple[bool | None, list[int]]:
    """What the diagnosis's weight analysis (``layer.extra["symmetry"]``) says about ``units`` units:
    (True when every unit's incoming weights are distinct, None when unknown; example units known to
    be in a group that training cannot separate). Ignored when it counted a different number of units (gate
    chunks of an RNN, q/k/v rows of attention)."""
    sym = layer.extra.get("symmetry")
    if not isinstance(sym, Mapping) or sym.get("units") != units:
        return None, []
    all_distinct = sym.get("distinct") == units if isinstance(sym.get("distinct"), int) else None
    members: list[int] = []
    for example in sym.get("examples") or []:
        if not isinstance(example, Mapping) or not _locked(example):
            continue
        group = example.get("units")
        if isinstance(group, (list, tuple)) and len(group) >= 2:
            members += [int(u) for u in group if isinstance(u, (int, np.integer)) and 0 <= u < units]
    return all_distinct, members


def _identical_units(stats: Sequence[TensorStats | None], units: int) -> np.ndarray:
    """Units whose per-unit moments (mean, M2, max, min) equal another unit's in every given stream."""
    keys: list[np.ndarray] = []
    for s in stats:
        if s is None or s.units != units:
            continue
        m = s.moments
        for a in (m.mean, m.m2, m.unit_max, m.unit_min):
            # 6 significant digits: identical units may be computed in a different order (BLAS tiles),
            # so their sums can differ in the last bits; distinct units differ in the first few.
            a = np.asarray(a, dtype=float) + 0.0  # canonicalise -0.0
            keys.append(np.array([float(f"{v:.6g}") if math.isfinite(v) else np.nan for v in a]))
    if not keys:
        return np.zeros(units, dtype=bool)
    table = np.stack(keys, axis=1)
    if np.isnan(table).any():  # NaN never matches
        valid = ~np.isnan(table).any(axis=1)
    else:
        valid = np.ones(units, dtype=bool)
    _, inverse, counts = np.unique(
        np.where(np.isnan(table), 0, table), axis=0, return_inverse=True, return_counts=True
    )
    return (counts[inverse.ravel()] >= 2) & valid


def unit_status(layer: LayerRecord, kind: str = "act") -> np.ndarray:
    """Per-unit category: ``NORMAL`` (0), ``DEAD`` (1) or ``SYMMETRIC`` (2).

    Dead: never positive over everything seen (``unit_max ≤ 0``) on a ReLU-family layer or a layer a
    ReLU-family activation follows. Symmetric: units whose activation and
    gradient moments are all equal (what the statistics can see of identical incoming and outgoing
    weights), unless the diagnosis's weight analysis (``layer.extra["symmetry"]``) found every unit's
    incoming weights distinct; its example groups are marked too. Dead takes precedence.
    """
    _check_kind(kind)
    stats = _stats(layer, kind)
    if stats is None:
        return np.zeros(0, dtype=np.int8)
    units = stats.units
    status = np.zeros(units, dtype=np.int8)
    all_distinct, members = _symmetry_facts(layer, units)
    if not all_distinct:
        status[_identical_units([layer.act, layer.grad], units)] = SYMMETRIC
    status[members] = SYMMETRIC
    relu_like = layer.type in RELU_FAMILY or (layer.activation or "") in RELU_FAMILY
    if relu_like and kind == "act":
        status[np.asarray(stats.moments.unit_max) <= 0] = DEAD
    return status


def _status_handles(status: np.ndarray) -> list[Any]:
    from matplotlib.patches import Patch

    return [
        Patch(facecolor=DEAD_COLOUR, label=f"dead: never positive ({int((status == DEAD).sum())} units)"),
        Patch(
            facecolor=SYMMETRIC_COLOUR,
            edgecolor="0.4",
            label=f"symmetric: identical to another unit ({int((status == SYMMETRIC).sum())} units)",
        ),
    ]


def _unit_spread(stats: TensorStats) -> np.ndarray:
    """log10 of each unit's variance over the layer's median unit variance (−inf for zero)."""
    var = np.asarray(stats.moments.unit_var(), dtype=float)
    positive = var[np.isfinite(var) & (var > 0)]
    if positive.size == 0:
        return np.full(var.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(var / float(np.median(positive)))


def plot_units(
    report: Report,
    layer: str | None = None,
    *,
    kind: str = "act",
    layers: LayerSelection = "auto",
    max_units: int = 256,
    decades: float = 2.0,
) -> ReportFigure:
    """Unit-level heat map that makes dead and symmetric units visible.

    Without ``layer``: units (rows) × layers (columns). Each cell is the unit's variance relative to
    its layer's median unit variance (log10, clipped to ±``decades``): a healthy layer is pale and
    speckled, a layer with a few dominant units shows dark cells. Dead units (never positive after a
    ReLU-family activation) are black; symmetric units (identical to another unit of the same layer)
    are yellow; cells past a layer's width are grey.

    With ``layer="name"``: units (columns) × statistics (rows: activation mean, std, min, max and,
    when recorded, gradient mean and std), each row scaled by its largest magnitude, with the same
    dead/symmetric overlay, for a close look at one layer.

    Args:
        report: the probe's report.
        layer: a layer name for the per-layer view.
        kind: ``"act"`` or ``"grad"``: whose variance colours the units × layers map.
        layers: layer selection for the units × layers map (see :func:`select_layers`).
        max_units: show at most this many units per layer (the first ones).
        decades: colour range of the units × layers map, ± this many decades.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    _check_kind(kind)
    if layer is not None:
        return _plot_layer_units(report, layer, max_units)
    chosen = [x for x in select_layers(report, layers) if _stats(x, kind) is not None]
    if not chosen:
        raise UsageError(
            f"no layer in this report has {'activation' if kind == 'act' else 'gradient'} statistics"
        )
    widest = max(_stats(x, kind).units for x in chosen)  # type: ignore[union-attr]
    rows = min(widest, max_units)
    values = np.full((rows, len(chosen)), np.nan)
    status = np.zeros((rows, len(chosen)), dtype=np.int8)
    present = np.zeros((rows, len(chosen)), dtype=bool)
    for j, x in enumerate(chosen):
        s = _stats(x, kind)
        assert s is not None
        u = min(s.units, rows)
        spread = _unit_spread(s)[:u]
        # Zero variance (constant units) sits at the bottom of the scale; NaN only where nothing was seen.
        values[:u, j] = np.where(np.isneginf(spread), -decades, spread)
        status[:u, j] = unit_status(x, kind)[:u]
        present[:u, j] = True

    n = len(chosen)
    fig = _new_figure(min(16.0, max(6.5, 2.8 + 0.22 * n)), 5.6 if rows > 32 else 4.6)
    ax = fig.subplots()
    ax.set_facecolor(_MISSING_COLOUR)
    shown_values = np.ma.masked_where(~present | (status != NORMAL), values)
    image = ax.imshow(
        shown_values, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-decades, vmax=decades,
        origin="upper", gid="unit-values",
    )  # fmt: skip
    overlay = np.ma.masked_where(~present | (status == NORMAL), status.astype(float))
    ax.imshow(
        overlay, aspect="auto", interpolation="nearest", origin="upper", vmin=DEAD - 0.5, vmax=SYMMETRIC + 0.5,
        cmap=ListedColormap([DEAD_COLOUR, SYMMETRIC_COLOUR]), gid="unit-status",
    )  # fmt: skip
    cbar = fig.colorbar(image, ax=ax, extend="both", pad=0.01)
    cbar.set_label(f"log10 unit variance ÷ layer median\n({'activations' if kind == 'act' else 'gradients'})",
                   fontsize=8)  # fmt: skip
    cbar.ax.tick_params(labelsize=7)
    _layer_ticks(ax, [x.name for x in chosen])
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer (execution order)", fontsize=9)
    ax.set_ylabel(f"unit (first {rows} of {widest})" if rows < widest else "unit", fontsize=9)
    handles = _status_handles(status)
    if not present.all():
        handles.append(Patch(facecolor=_MISSING_COLOUR, edgecolor="0.4", label="no such unit"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7.5, frameon=False)
    fig.suptitle(f"{_title(report)}\nunits: variance spread, dead and symmetric units", fontsize=10)
    return fig


def _plot_layer_units(report: Report, name: str, max_units: int) -> ReportFigure:
    from matplotlib.colors import ListedColormap

    try:
        layer = report[name]
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    if layer.act is None:
        raise UsageError(f"layer {name!r} has no activation statistics")
    rows_named: list[tuple[str, np.ndarray]] = []
    for label, s in (("activation", layer.act), ("gradient", layer.grad)):
        if s is None:
            continue
        m = s.moments
        rows_named.append((f"{label} mean", np.asarray(m.mean, dtype=float)))
        rows_named.append((f"{label} std", np.sqrt(np.maximum(np.asarray(m.unit_var(), dtype=float), 0))))
        if label == "activation":
            rows_named.append((f"{label} min", np.asarray(m.unit_min, dtype=float)))
            rows_named.append((f"{label} max", np.asarray(m.unit_max, dtype=float)))
    units = min(layer.act.units, max_units)
    table = np.stack([r[:units] for _, r in rows_named])
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.nanmax(np.where(np.isfinite(table), np.abs(table), np.nan), axis=1, keepdims=True)
        scaled = np.where(scale > 0, table / scale, 0.0)
    status = unit_status(layer, "act")[:units]
    fig = _new_figure(min(14.0, max(6.5, 2.5 + 0.05 * units)), 3.6)
    ax = fig.subplots()
    image = ax.imshow(
        np.ma.masked_where(np.broadcast_to(status != NORMAL, scaled.shape), scaled), aspect="auto",
        interpolation="nearest", cmap="RdBu_r", vmin=-1, vmax=1, gid="unit-values",
    )  # fmt: skip
    overlay = np.broadcast_to(status.astype(float), scaled.shape)
    ax.imshow(
        np.ma.masked_where(overlay == NORMAL, overlay), aspect="auto", interpolation="nearest",
        vmin=DEAD - 0.5, vmax=SYMMETRIC + 0.5, cmap=ListedColormap([DEAD_COLOUR, SYMMETRIC_COLOUR]),
        gid="unit-status",
    )  # fmt: skip
    ax.set_yticks(range(len(rows_named)))
    ax.set_yticklabels([r for r, _ in rows_named], fontsize=8)
    ax.set_xlabel(
        f"unit (first {units} of {layer.act.units})" if units < layer.act.units else "unit", fontsize=9
    )
    cbar = fig.colorbar(image, ax=ax, pad=0.01)
    cbar.set_label("value ÷ largest |value| in the row", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    fig.legend(
        handles=_status_handles(status), loc="outside lower center", ncol=2, fontsize=7.5, frameon=False
    )
    fig.suptitle(f"{_title(report)}\nlayer {name} ({layer.type}): per-unit statistics", fontsize=10)
    return fig
