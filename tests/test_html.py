"""The notebook display: every layer and every finding present, escaped, self-contained, readable on
light and dark backgrounds, bars that say which way and how far each layer is from its reference."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest

from gradprobe.diagnose.finding import Finding
from gradprobe.render import html as html_module
from gradprobe.render.html import render_html
from gradprobe.report import LayerRecord, ParamRecord, Report, TensorStats
from gradprobe.stats import Moments


def stats(x: np.ndarray) -> TensorStats:
    mean = x.mean(axis=0)
    m = Moments(
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
    )
    return TensorStats.from_moments(m, x.shape[1])


def layer(
    name: str, kind: str, act: np.ndarray | None, grad: np.ndarray | None, i: int, weighted: bool
) -> LayerRecord:
    width = (act if act is not None else grad).shape[1]  # type: ignore[union-attr]
    params = [ParamRecord("weight", [width, width], width**2, True, 0.0, 1.0, 1.0, width, width, 1.0, 1)]
    return LayerRecord(
        name=name,
        type=kind,
        index=i,
        calls=1,
        output_shape=[act.shape[0] if act is not None else 1, width],
        unit_axis=1,
        elements_per_sample=width,
        activation="relu" if kind == "Linear" else None,
        act=None if act is None else stats(act),
        grad=None if grad is None else stats(grad),
        params=params if weighted else [],
    )


@pytest.fixture
def report() -> Report:
    rng = np.random.default_rng(0)
    layers = []
    names = ["encoder.0", "encoder.1", "blocks.<0>.fc & co", "blocks.<0>.act", "head"]
    for i, name in enumerate(names):
        kind = "ReLU" if name.endswith(("1", "act")) else "Linear"
        scale = 10.0 ** (-3 * i)  # vanishing forward
        act = rng.standard_normal((32, 4)) * math.sqrt(scale)
        grad = rng.standard_normal((32, 4))
        if kind == "ReLU":
            act = np.maximum(act, 0)
        layers.append(layer(name, kind, act, grad, i, kind == "Linear"))
    layers.append(layer("aux", "Linear", rng.standard_normal((32, 4)), None, 5, True))  # no gradient
    rep = Report(
        layers=layers, meta={"model": "Net<T>", "init": "normal:std=0.01", "loss": "randn", "samples": 32}
    )
    rep.findings = [
        Finding(
            "vanishing_activations",
            "error",
            ("blocks.<0>.fc & co", "head"),
            "signal variance fell to 1e-12 of the first layer's <fast>",
            "Use kaiming_normal (He) for ReLU layers.",
            {"ratio": 1e-12},
        ),
        Finding("dead_units", "warning", ("encoder.1",), "3 of 4 units never fire", "Lower the bias."),
        Finding("gated_signal", "info", (), "a zero gate downstream", ""),
    ]
    rep.verdict = "unstable"
    return rep


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("br",):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(markup: str) -> _Collector:
    c = _Collector()
    c.feed(markup)
    c.close()
    assert c.stack == [], f"unclosed tags: {c.stack}"
    return c


def test_every_layer_and_every_finding_is_in_the_html(report: Report):
    markup = render_html(report)
    doc = parse(markup)
    text = "".join(doc.text)
    rows = [a["data-layer"] for tag, a in doc.tags if tag == "tr" and "data-layer" in a]
    assert rows == [x.name for x in report.layers]
    for x in report.layers:
        assert x.name in text
    for f in report.findings:
        assert f.code in text and f.message in text
        if f.suggestion:
            assert f"Fix: {f.suggestion}" in text
    assert "verdict: unstable" in text
    assert "Net<T>" in text and "normal:std=0.01" in text


def test_names_and_messages_are_escaped(report: Report):
    markup = render_html(report)
    assert "blocks.&lt;0&gt;.fc &amp; co" in markup
    assert "<0>" not in markup and "<fast>" not in markup and "Net<T>" not in markup


def test_self_contained_no_scripts_no_network(report: Report):
    markup = render_html(report).lower()
    for banned in (
        "<script",
        "javascript:",
        "http://",
        "https://",
        "@import",
        "url(",
        "<link",
        "<img",
        " on",
    ):
        if banned == " on":
            assert not re.search(r"\son[a-z]+\s*=", markup), "inline event handler"
        else:
            assert banned not in markup, banned


def test_severity_badges_per_layer_and_per_finding(report: Report):
    doc = parse(render_html(report))
    badges = [a["class"] for tag, a in doc.tags if tag == "span" and "gp-badge" in (a.get("class") or "")]
    assert badges.count("gp-badge gp-error") == 1 + 2  # the finding + its two layers
    assert badges.count("gp-badge gp-warning") == 1 + 1
    assert badges.count("gp-badge gp-info") == 1
    assert badges.count("gp-badge gp-unstable") == 1


def _bars(markup: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(layer, column) → the bar's left, width and colour, from the inline styles."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in re.finditer(r'<tr[^>]*data-layer="([^"]*)"(.*?)</tr>', markup, flags=re.S):
        for col, track in enumerate(
            re.finditer(
                r'class="gp-bar[^"]*"[^>]*>(.*?)</span></span>|class="gp-bar[^"]*"[^>]*></span>', row.group(2)
            )
        ):
            inner = track.group(1) or ""
            m = re.search(r"left:(\d+)px;width:(\d+)px;background:([^\"]+)\"", inner)
            out[(row.group(1), col)] = (
                {"left": float(m.group(1)), "width": float(m.group(2)), "background": m.group(3)} if m else {}
            )
    return out


def _row(markup: str, name: str) -> str:
    match = re.search(rf'data-layer="{re.escape(name)}".*?</tr>', markup, flags=re.S)
    assert match is not None, f"no row for {name!r}"
    return match.group(0)


def test_bars_point_the_way_and_turn_red_outside_the_stable_band(report: Report):
    markup = render_html(report)
    bars = _bars(markup)
    half = html_module._TRACK_PX / 2
    ref = bars[("encoder.0", 0)]  # the forward reference: a hairline at the centre
    assert ref["left"] == pytest.approx(half, abs=1) and ref["width"] <= 1.5
    assert ref["background"] == html_module.ACT_COLOUR
    head = bars[("head", 0)]  # 1e-12 of the reference: left of the centre, outside the band, red
    assert head["left"] + head["width"] == pytest.approx(half, abs=1) and head["width"] > 20
    assert head["background"] == html_module._BAR_RED
    assert bars[("head", 1)]["background"] == html_module.GRAD_COLOUR  # gradients stay in the band
    assert bars[("aux", 1)] == {}  # no gradient: no bar, a dash
    assert "—" in _row(markup, "aux")


def test_theory_is_shown_beside_the_measurement_it_predicts(report: Report):
    report["encoder.0"].predicted_act_var = 0.5
    report["encoder.0"].predicted_grad_var = 0.25
    row = _row(render_html(report), "encoder.0")
    measured = report["encoder.0"].act.var
    assert f"var {measured:.2e} · theory 5.00e-01" in row
    assert "theory 1.00e+00" in row  # gradient variance 0.25 × 4 elements per sample
    assert "theory" not in _row(render_html(report), "head")


def test_zero_and_non_finite_values():
    z = np.zeros((8, 3))
    layers = [
        layer("a", "Linear", np.random.default_rng(0).standard_normal((8, 3)), np.ones((8, 3)), 0, True),
        layer("b", "Linear", z, z, 1, True),
    ]
    with np.errstate(invalid="ignore"):
        layers.append(layer("c", "Linear", np.full((8, 3), np.nan), np.full((8, 3), np.inf), 2, True))
    markup = render_html(Report(layers=layers, meta={}))
    row_b, row_c = _row(markup, "b"), _row(markup, "c")
    assert "<code>0</code>" in row_b and 'title="exactly zero"' in row_b
    assert "<code>inf</code>" in row_c and 'title="not finite"' in row_c
    assert "not diagnosed" in markup


def _luminance(colour: str) -> float:
    rgb = [int(colour.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


@pytest.mark.parametrize("page", ["#FFFFFF", "#111111", "#1E1E1E"])
def test_readable_on_light_and_dark_pages(report: Report, page: str):
    """Text inherits the page's colour; every fixed colour stands out on white and on dark pages
    (≥ 3:1 for graphics, WCAG 1.4.11) and badge text on its badge meets 4.5:1."""
    markup = render_html(report)
    for bg, fg in html_module._BADGE.values():
        assert contrast(bg, fg) >= 4.5
    for colour in (html_module.ACT_COLOUR, html_module.GRAD_COLOUR, html_module._BAR_RED):
        assert contrast(colour, page) >= 3.0, colour
    for bg, _ in html_module._BADGE.values():
        assert contrast(bg, page) >= 2.0  # the badge's own text carries the contrast
    # The only fixed text colours are on badges, which carry their own background.
    for m in re.finditer(r'style="([^"]*)"', markup):
        style = m.group(1)
        if re.search(r"(?<![-\w])color:#", style):
            assert "background:#" in style, style
    assert "color:inherit" in markup and "prefers-color-scheme: dark" in markup


def test_real_probe_renders_every_layer():
    torch = pytest.importorskip("torch")
    import gradprobe

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    rep = gradprobe.probe(net, torch.randn(32, 8), diagnose=False)
    markup = render_html(rep)
    rows = re.findall(r'data-layer="([^"]*)"', markup)
    assert rows == [x.name for x in rep.layers] == ["0", "1", "2"]
    if hasattr(rep, "_repr_html_"):
        assert rep._repr_html_() == markup
