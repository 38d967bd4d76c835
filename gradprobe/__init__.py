"""gradprobe: will this network train from this initialization?

Probe a PyTorch model's signal propagation at initialization and get a verdict::

    >>> import torch, gradprobe
    >>> net = torch.nn.Sequential(*[m for _ in range(12) for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())])
    >>> report = gradprobe.probe(net, torch.randn(128, 64), init="kaiming_normal")
    >>> report.verdict
    'stable'

The public names are imported lazily, so ``import gradprobe`` (and ``gradprobe --help``) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → module that defines it
_EXPORTS = {
    "probe": "gradprobe.probing",
    "Inputs": "gradprobe.probing",
    "Report": "gradprobe.report",
    "LayerRecord": "gradprobe.report",
    "TensorStats": "gradprobe.report",
    "ParamRecord": "gradprobe.report",
    "Moments": "gradprobe.stats",
    "diagnose": "gradprobe.diagnose",
    "Finding": "gradprobe.diagnose.finding",
    "GradprobeError": "gradprobe.errors",
    "UsageError": "gradprobe.errors",
    "ProbeError": "gradprobe.errors",
    "INITIALIZERS": "gradprobe.initializers",
    "Initializer": "gradprobe.initializers",
    "resolve_initializer": "gradprobe.initializers",
    "assert_stable": "gradprobe.api",
    "compare": "gradprobe.api",
    "plot_compare": "gradprobe.render.plots",
    "plot_report": "gradprobe.render.plots",
    "plot_histograms": "gradprobe.render.plots",
    "plot_units": "gradprobe.render.plots",
    "render_html": "gradprobe.render.html",
    "fix": "gradprobe.fixing",
    "width_sweep": "gradprobe.widths",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
