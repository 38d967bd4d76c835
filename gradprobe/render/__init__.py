"""Renderers: pure functions of a Report (console, CSV, plots, HTML).

Imported lazily: ``import gradprobe.render`` loads neither matplotlib nor torch; each name below is
imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → module that defines it
_EXPORTS = {
    "render_report": "gradprobe.render.console",
    "render_findings": "gradprobe.render.console",
    "render_compare": "gradprobe.render.console",
    "to_csv": "gradprobe.render.csv",
    "write_csv": "gradprobe.render.csv",
    "render_html": "gradprobe.render.html",
    "plot_report": "gradprobe.render.plots",
    "plot_compare": "gradprobe.render.plots",
    "plot_histograms": "gradprobe.render.plots",
    "plot_units": "gradprobe.render.plots",
    "ReportFigure": "gradprobe.render.plots",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradprobe.render' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
