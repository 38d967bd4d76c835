"""The figures: structure (log axes, labels, one line per report, flagged layers marked, one panel per
layer, dead and symmetric units distinguishable), saving by extension, and import lightness.

Reports are built by hand from numpy arrays (no network run) except where the probe's own output is
the point.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradprobe.diagnose.finding import Finding
from gradprobe.errors import UsageError
from gradprobe.render import plots
from gradprobe.render.plots import (
    DEAD,
    NORMAL,
    SYMMETRIC,
    plot_compare,
    plot_histograms,
    plot_report,
    plot_units,
    select_layers,
    unit_status,
)
from gradprobe.report import LayerRecord, ParamRecord, Report, TensorStats
from gradprobe.stats import HIST_BINS, Moments

# --------------------------------------------------------------------------------------------
# hand-built reports
# --------------------------------------------------------------------------------------------


def moments(x: np.ndarray, histogram: np.ndarray | None = None) -> Moments:
    """Moments of ``x`` (rows × units), as the hooks would record them."""
    mean = x.mean(axis=0)
    return Moments(
        rows=x.shape[0],
        mean=mean,
        m2=((x - mean) ** 2).sum(axis=0),
        unit_max=x.max(axis=0),
        unit_min=x.min(axis=0),
        zeros=int((x == 0).sum()),
        saturated=None,
        nonfinite_units=0,
        nonfinite=0,
        calls=1,
        histogram=histogram,
    )


def record(
    name: str,
    kind: str,
    act: np.ndarray | None,
    grad: np.ndarray | None,
    *,
    index: int,
    weighted: bool = False,
    activation: str | None = None,
    histogram: bool = False,
    extra: dict | None = None,
) -> LayerRecord:
    width = (act if act is not None else grad).shape[1]  # type: ignore[union-attr]
    hist = None
    if histogram:
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        hist[[90, 96, 100 + index % 5]] = [3, 5 + index, 7]
    params = (
        [ParamRecord("weight", [width, width], width * width, True, 0.0, 1.0, 1.0, width, width, 1.0, 1)]
        if weighted
        else []
    )
    return LayerRecord(
        name=name,
        type=kind,
        index=index,
        calls=1,
        output_shape=[act.shape[0] if act is not None else 1, width],
        unit_axis=1,
        elements_per_sample=width,
        activation=activation,
        act=None if act is None else TensorStats.from_moments(moments(act, hist), width),
        grad=None if grad is None else TensorStats.from_moments(moments(grad, hist), width),
        params=params,
        extra=extra or {},
    )


def mlp_report(
    depth: int = 4,
    width: int = 8,
    gain: float = 1.0,
    *,
    init: str = "test-init",
    histogram: bool = False,
    seed: int = 0,
) -> Report:
    """Linear/ReLU pairs whose activation variance is multiplied by ``gain`` per Linear going forward
    and whose gradient energy is multiplied by it per Linear going backward; names "0", "1", … like nn.Sequential."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(depth):
        scale = math.sqrt(gain ** (i + 1))
        z = rng.standard_normal((64, width)) * scale
        g = rng.standard_normal((64, width)) / width * math.sqrt(gain ** (depth - i))
        layers.append(
            record(
                str(2 * i), "Linear", z, g, index=2 * i, weighted=True, activation="relu", histogram=histogram
            )
        )
        layers.append(
            record(
                str(2 * i + 1), "ReLU", np.maximum(z, 0), g * (z > 0), index=2 * i + 1, histogram=histogram
            )
        )
    return Report(layers=layers, meta={"model": "Sequential", "init": init})


def labelled(lines: list) -> list:
    return [x for x in lines if not x.get_label().startswith("_")]


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    yield
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == [], "a figure was registered with pyplot"


# --------------------------------------------------------------------------------------------
# plot_report
# --------------------------------------------------------------------------------------------


def test_report_profile_has_log_axes_labels_and_one_point_per_shown_layer():
    report = mlp_report(depth=5)
    fig = plot_report(report)
    ax_act, ax_grad = fig.axes
    for ax in (ax_act, ax_grad):
        assert ax.get_yscale() == "log"
        assert ax.get_ylabel().strip()
    assert "signal variance" in ax_act.get_ylabel()
    assert "gradient energy" in ax_grad.get_ylabel()
    assert "layer" in ax_grad.get_xlabel()
    # By default the ReLUs fold into their Linear: one point per Linear, named on the x axis.
    (act_line,) = [x for x in labelled(ax_act.lines) if x.get_label() == "measured activation"]
    assert list(act_line.get_xdata()) == [0, 1, 2, 3, 4]
    expected = [report[str(2 * i)].act.signal_var for i in range(5)]
    np.testing.assert_allclose(act_line.get_ydata(), expected)
    (grad_line,) = [x for x in labelled(ax_grad.lines) if x.get_label() == "measured gradient"]
    np.testing.assert_allclose(grad_line.get_ydata(), [report[str(2 * i)].grad.energy for i in range(5)])
    assert [t.get_text() for t in ax_grad.get_xticklabels()] == ["0", "2", "4", "6", "8"]


def test_report_profile_shades_the_stable_band_around_the_reference():
    report = mlp_report(depth=4, gain=0.1)
    fig = plot_report(report)
    ax_act = fig.axes[0]
    (band,) = [p for p in ax_act.patches if p.get_label().startswith("stable band")]
    (lo, hi), _ = plots.stable_band("activations")
    ref = report["0"].act.signal_var
    corners = band.get_transform().transform(band.get_path().vertices)  # display coordinates
    data_y = ax_act.transData.inverted().transform(corners)[:, 1]
    np.testing.assert_allclose([data_y.min(), data_y.max()], [ref * lo, ref * hi], rtol=1e-6)


def test_flagged_layers_are_marked_at_their_positions_by_severity():
    report = mlp_report(depth=6)
    report.findings = [
        Finding("vanishing_activations", "error", ("6", "8", "10"), "signal fell 1e-9", "use kaiming"),
        # A ReLU is not shown by default: its mark goes to the Linear before it (position 1).
        Finding("dead_units", "warning", ("3",), "half the units never fire", "He init"),
        Finding("vanishing_gradients", "warning", ("0",), "gradient fell", "He init"),
    ]
    fig = plot_report(report)
    ax_act, ax_grad = fig.axes
    act_marks = {
        c.get_gid(): sorted(c.get_offsets()[:, 0].tolist()) for c in ax_act.collections if c.get_gid()
    }
    grad_marks = {
        c.get_gid(): sorted(c.get_offsets()[:, 0].tolist()) for c in ax_grad.collections if c.get_gid()
    }
    assert act_marks == {"flags-error": [3, 4, 5], "flags-warning": [1]}
    assert grad_marks == {"flags-warning": [0]}  # gradient codes only on the gradient panel
    # On the curve, not somewhere arbitrary.
    error = next(c for c in ax_act.collections if c.get_gid() == "flags-error")
    np.testing.assert_allclose(
        error.get_offsets()[:, 1], [report[n].act.signal_var for n in ("6", "8", "10")]
    )
    legend = [t.get_text() for t in ax_act.get_legend().get_texts()]
    assert "error: vanishing_activations" in legend and "warning: dead_units" in legend


def test_deep_models_get_thinned_rotated_tick_labels():
    report = mlp_report(depth=60, width=4)
    fig = plot_report(report)
    labels = [t for t in fig.axes[1].get_xticklabels() if t.get_text()]
    assert 20 <= len(labels) <= 41
    assert all(t.get_rotation() == 90 for t in labels)
    assert labels[-1].get_text() == "118"  # the last layer is always named


def test_theory_predictions_are_dashed_lines_beside_what_they_predict():
    report = mlp_report(depth=3)
    for layer in report.layers:
        layer.predicted_act_var = 1.0
        layer.predicted_grad_var = 0.5
    fig = plot_report(report)
    ax_act, ax_grad = fig.axes
    for ax, expected in ((ax_act, 1.0), (ax_grad, 0.5 * 8)):  # gradient variance → energy (× 8 elements)
        (theory,) = [x for x in ax.lines if x.get_label() == "theory (mean field)"]
        assert theory.get_linestyle() == "--"
        np.testing.assert_allclose(theory.get_ydata(), expected)
    # The theory predicts act.var (between and within units), so that is drawn beside it.
    (total,) = [x for x in ax_act.lines if x.get_label() == "measured total variance"]
    np.testing.assert_allclose(total.get_ydata(), [report[n].act.var for n in ("0", "2", "4")])
    # Predictions from older reports in ``extra`` are read too; none means no theory line.
    plain = mlp_report(depth=3)
    plain.layers[0].extra["predicted_act_var"] = 2.0
    assert [x for x in plot_report(plain).axes[0].lines if x.get_label() == "theory (mean field)"]
    assert not [x for x in plot_report(mlp_report(depth=3)).axes[0].lines if "theory" in x.get_label()]


def test_zero_and_non_finite_values_are_marked_off_scale():
    report = mlp_report(depth=3)
    report.layers[2] = record("2", "Linear", np.zeros((8, 8)), np.zeros((8, 8)), index=2, weighted=True)
    report.layers[4] = record("4", "Linear", np.full((8, 8), np.nan), np.ones((8, 8)), index=4, weighted=True)
    fig = plot_report(report)
    ax_act = fig.axes[0]
    zero = [c for c in ax_act.collections if c.get_label() == "exactly zero (off scale)"]
    bad = [c for c in ax_act.collections if c.get_label() == "non-finite (off scale)"]
    assert zero and zero[0].get_offsets()[:, 0].tolist() == [1]
    assert bad and bad[0].get_offsets()[:, 0].tolist() == [2]


def test_layer_selection():
    report = mlp_report(depth=2)
    assert [x.name for x in select_layers(report)] == ["0", "2"]
    assert [x.name for x in select_layers(report, "all")] == ["0", "1", "2", "3"]
    assert [x.name for x in select_layers(report, ["1", "3"])] == ["1", "3"]
    assert [x.name for x in select_layers(report, lambda x: x.type == "ReLU")] == ["1", "3"]
    with pytest.raises(UsageError, match="no layer named 'nope'"):
        select_layers(report, ["nope"])
    with pytest.raises(UsageError, match="valid: 'auto', 'all'"):
        select_layers(report, "every")


# --------------------------------------------------------------------------------------------
# plot_compare
# --------------------------------------------------------------------------------------------


def test_compare_draws_one_labelled_line_per_report_on_each_log_axis():
    reports = [
        mlp_report(depth=6, gain=g, init=name)
        for g, name in ((0.01, "normal:std=0.01"), (0.5, "xavier_normal"), (1.0, "kaiming_normal"))
    ]
    fig = plot_compare(reports)
    ax_act, ax_grad = fig.axes
    for ax in (ax_act, ax_grad):
        assert ax.get_yscale() == "log"
        assert ax.get_ylabel().strip()
        assert [x.get_label() for x in labelled(ax.lines)] == [
            "normal:std=0.01",
            "xavier_normal",
            "kaiming_normal",
        ]
    # Relative to each report's reference: the forward lines start at 1, the backward lines end at 1.
    for line in labelled(ax_act.lines):
        assert line.get_ydata()[0] == pytest.approx(1.0)
    for line in labelled(ax_grad.lines):
        assert line.get_ydata()[-1] == pytest.approx(1.0)
    assert labelled(ax_act.lines)[0].get_ydata()[-1] == pytest.approx(
        reports[0]["10"].act.signal_var / reports[0]["0"].act.signal_var
    )


def test_compare_labels_mapping_and_errors():
    a, b = mlp_report(init="a"), mlp_report(init="b", gain=2.0)
    fig = plot_compare({"first": a, "second": b}, relative=False)
    assert [x.get_label() for x in labelled(fig.axes[0].lines)] == ["first", "second"]
    fig = plot_compare([a, b], labels=["x", "y"])
    assert [x.get_label() for x in labelled(fig.axes[1].lines)] == ["x", "y"]
    with pytest.raises(UsageError, match="2 reports"):
        plot_compare([a, b], labels=["only one"])
    with pytest.raises(UsageError, match="no reports"):
        plot_compare([])


def test_compare_floor_lets_a_vanishing_line_leave_the_axes():
    reports = [mlp_report(depth=8, gain=1e-4, init="tiny"), mlp_report(depth=8, gain=0.5, init="xavier")]
    fig = plot_compare(reports, floor=1e-10)
    ax_act, ax_grad = fig.axes
    assert ax_act.get_ylim()[0] == pytest.approx(1e-10)
    # "tiny" loses 4 decades per Linear: 1e-12 at the 4th (position 3), where the line leaves.
    (leaves,) = [c for c in ax_act.collections if c.get_gid() == "leaves-tiny"]
    assert leaves.get_offsets()[:, 0].tolist() == [3]
    (enters,) = [c for c in ax_grad.collections if c.get_gid() == "leaves-tiny"]
    assert enters.get_offsets()[:, 0].tolist() == [4]  # backward it comes back into view at 5
    assert not [c for c in ax_act.collections if c.get_gid() == "leaves-xavier"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[1:3] == ["tiny", "xavier"] and "the line continues below the axis" in legend


def test_compare_marks_error_findings_in_the_report_colour():
    a, b = mlp_report(init="a"), mlp_report(init="b")
    b.findings = [Finding("vanishing_gradients", "error", ("0", "2"), "gone", "")]
    fig = plot_compare([a, b])
    marks = [c for c in fig.axes[1].collections if c.get_gid() == "flags-b"]
    assert len(marks) == 1 and sorted(marks[0].get_offsets()[:, 0].tolist()) == [0, 1]
    assert not [c for c in fig.axes[0].collections if c.get_gid() == "flags-b"]


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_save_writes_the_format_of_the_extension(tmp_path: Path, fmt: str):
    fig = plot_report(mlp_report(depth=2))
    path = fig.save(tmp_path / f"profile.{fmt.upper() if fmt == 'pdf' else fmt}")
    data = path.read_bytes()
    if fmt == "svg":
        assert b"<svg" in data[:2000]
    else:
        assert data.startswith(MAGIC[fmt])


def test_save_rejects_other_extensions(tmp_path: Path):
    fig = plot_compare([mlp_report(depth=2)])
    for name in ("profile.txt", "profile"):
        with pytest.raises(UsageError, match=r"valid extensions: \.png, \.svg, \.pdf"):
            fig.save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_figures_display_in_notebooks_and_pickle():
    fig = plot_report(mlp_report(depth=2))
    assert fig._repr_png_().startswith(MAGIC["png"])
    again = pickle.loads(pickle.dumps(fig))
    assert type(again).__name__ == "ReportFigure" and hasattr(again, "save")


def test_importing_the_renderers_does_not_import_matplotlib_or_torch():
    code = (
        "import sys, gradprobe.render, gradprobe.render.plots, gradprobe.render.html;"
        "bad = [m for m in ('matplotlib', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# plot_histograms
# --------------------------------------------------------------------------------------------


def test_histogram_grid_has_one_panel_per_layer():
    report = mlp_report(depth=3, histogram=True)
    fig = plot_histograms(report)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == [x.name for x in report.layers]
    # Normalised: each panel's bars sum to 1; the zero bin sits at x = 0.
    for ax, layer in zip(panels, report.layers):
        (bars,) = ax.patches
        heights = bars.get_data().values
        assert heights.sum() == pytest.approx(1.0)
        edges = bars.get_data().edges
        centre = np.flatnonzero((edges[:-1] < 0) & (edges[1:] > 0))
        total = layer.act.moments.histogram.sum()
        assert heights[centre[0]] == pytest.approx(layer.act.moments.histogram[96] / total)
    assert "fraction" in fig._supylabel.get_text()
    fig = plot_histograms(report, kind="grad", layers=["0", "2"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2


def test_histograms_need_a_probe_with_histograms():
    with pytest.raises(UsageError, match="histograms=True"):
        plot_histograms(mlp_report(depth=2))
    with pytest.raises(UsageError, match="valid: 'act'"):
        plot_histograms(mlp_report(depth=2, histogram=True), kind="weights")


def test_histograms_of_a_real_probe():
    torch = pytest.importorskip("torch")
    import gradprobe

    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    report = gradprobe.probe(net, torch.randn(64, 16), diagnose=False, histograms=True)
    fig = plot_histograms(report, kind="grad")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3


# --------------------------------------------------------------------------------------------
# plot_units
# --------------------------------------------------------------------------------------------


def test_unit_map_shows_a_dead_unit_as_its_own_value():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((64, 6))
    z[:, 2] = -np.abs(z[:, 2]) - 0.1  # never positive
    report = Report(
        layers=[
            record(
                "fc", "Linear", z, rng.standard_normal((64, 6)), index=0, weighted=True, activation="relu"
            ),
            record("relu", "ReLU", np.maximum(z, 0), rng.standard_normal((64, 6)), index=1),
        ],
        meta={"model": "M", "init": "x"},
    )
    assert unit_status(report["fc"]).tolist() == [NORMAL, NORMAL, DEAD, NORMAL, NORMAL, NORMAL]
    fig = plot_units(report, layers="all")
    ax = fig.axes[0]
    status = next(im for im in ax.images if im.get_gid() == "unit-status")
    values = next(im for im in ax.images if im.get_gid() == "unit-values")
    data = status.get_array()
    assert data[2, 0] == DEAD and data[2, 1] == DEAD  # the unit is dead in both layers
    assert data.mask[[0, 1, 3, 4, 5], :].all()  # only the dead unit is overlaid
    assert values.get_array().mask[2, :].all() and not values.get_array().mask[0, :].any()
    # Its colour differs from every colour of the value scale.
    dead_rgba = status.cmap(status.norm(DEAD))
    scale = values.cmap(np.linspace(0, 1, 256))
    assert np.abs(scale - np.asarray(dead_rgba)).sum(axis=1).min() > 0.3
    assert "unit" in ax.get_ylabel() and "layer" in ax.get_xlabel()


def test_unit_map_shows_symmetric_units():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((32, 5))
    g = rng.standard_normal((32, 5))
    z[:, 3], g[:, 3] = z[:, 1], g[:, 1]  # units 1 and 3 identical forward and backward
    layer = record("fc", "Linear", z, g, index=0, weighted=True, activation="tanh")
    assert unit_status(layer).tolist() == [NORMAL, SYMMETRIC, NORMAL, SYMMETRIC, NORMAL]
    # Identical activations but different gradients: a tie the first step breaks, not symmetric.
    g2 = g.copy()
    g2[:, 3] = rng.standard_normal(32)
    assert (unit_status(record("fc", "Linear", z, g2, index=0, weighted=True)) == NORMAL).all()
    # The diagnosis's weight analysis found every unit distinct: trust it.
    layer.extra["symmetry"] = {"units": 5, "distinct": 5, "groups": 0, "examples": []}
    assert (unit_status(layer) == NORMAL).all()
    layer.extra["symmetry"] = {
        "units": 5,
        "distinct": 3,
        "groups": 2,
        "examples": [{"units": [0, 4], "size": 2, "status": "locked"}, {"units": [1, 3], "status": "broken"}],
    }
    # A locked example group is marked; a group whose gradients differ is left to the statistics.
    assert unit_status(layer).tolist() == [SYMMETRIC, SYMMETRIC, NORMAL, SYMMETRIC, SYMMETRIC]
    layer.extra["symmetry"]["examples"][0]["status"] = "broken"
    assert unit_status(layer).tolist() == [NORMAL, SYMMETRIC, NORMAL, SYMMETRIC, NORMAL]
    layer.extra["symmetry"]["examples"][0]["status"] = "locked"
    fig = plot_units(Report(layers=[layer], meta={}), layer="fc")
    status = next(im for im in fig.axes[0].images if im.get_gid() == "unit-status")
    assert (status.get_array()[:, 0] == SYMMETRIC).all() and status.get_array().mask[:, 2].all()


def test_unit_map_pads_narrow_layers_and_caps_wide_ones():
    rng = np.random.default_rng(3)
    report = Report(
        layers=[
            record("wide", "Linear", rng.standard_normal((16, 300)), None, index=0, weighted=True),
            record("narrow", "Linear", rng.standard_normal((16, 4)), None, index=1, weighted=True),
        ],
        meta={},
    )
    fig = plot_units(report, max_units=100)
    values = next(im for im in fig.axes[0].images if im.get_gid() == "unit-values")
    assert values.get_array().shape == (100, 2)
    assert values.get_array().mask[4:, 1].all()
    assert "first 100 of 300" in fig.axes[0].get_ylabel()
    with pytest.raises(UsageError, match="no layer named"):
        plot_units(report, layer="missing")
