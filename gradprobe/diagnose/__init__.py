"""Diagnosis: a probe's numbers become findings a user can act on.

``diagnose(report, **thresholds)`` runs every rule of :data:`~gradprobe.diagnose.rules.RULES` on a
:class:`~gradprobe.report.Report` and returns the findings, errors first, then by position in the
network. Rules read only the report; the symmetry facts they use are attached during the probe by
:func:`gradprobe.diagnose.units.analyse_units`. Every code is listed in :data:`CODES` and documented,
with its default thresholds and their reasons, in docs/findings.md.

>>> from gradprobe.diagnose import CODES, Thresholds
>>> "vanishing_gradients" in CODES and Thresholds().vanishing_gradients_error
1e-08
"""

from __future__ import annotations

import sys
import types
from typing import Any

from gradprobe.diagnose.finding import SEVERITIES, Finding
from gradprobe.diagnose.profile import DepthProfile, analysis_scope, depth_profile
from gradprobe.diagnose.rules import RULES
from gradprobe.diagnose.suggest import suggested_init
from gradprobe.diagnose.thresholds import Thresholds, resolve_thresholds
from gradprobe.report import Report

__all__ = [
    "diagnose",
    "Thresholds",
    "CODES",
    "Finding",
    "suggested_init",
    "depth_profile",
    "DepthProfile",
]

# Every finding code (public contract: users' CI allow-lists name them) → what it means.
CODES: dict[str, str] = {
    "vanishing_activations": "between-sample signal variance falls along depth (inputs become indistinguishable)",
    "exploding_activations": "between-sample signal variance grows along depth",
    "vanishing_gradients": "per-sample gradient energy falls from the output towards the input",
    "exploding_gradients": "per-sample gradient energy grows from the output towards the input",
    "symmetry": "units with identical incoming weights and identical gradients: training cannot separate them",
    "dead_units": "ReLU-family units ≤ 0 for every sample, beyond what random init produces",
    "saturated_units": "bounded activations mostly where their derivative is < 1/10 of its value at 0",
    "non_finite": "the first module whose output (or output gradient) turns NaN/Inf",
    "zero_gate": "signal held back by a zero or small multiplicative gate by design (info), not vanishing",
    "tie_broken_by_gradients": "identical units at init whose gradients differ: the first steps separate them",
}


def diagnose(report: Report, thresholds: Thresholds | None = None, **overrides: Any) -> list[Finding]:
    """Findings for a report, errors first, then warnings, then info, each by position.

    Args:
        report: a probe's :class:`~gradprobe.report.Report` (read only).
        thresholds: a :class:`Thresholds` to start from (default: the documented defaults).
        **overrides: threshold fields by name, e.g. ``vanishing_gradients_error=1e-10``; an unknown
            name raises :class:`~gradprobe.errors.UsageError` listing the valid ones.

    Returns:
        a list of :class:`Finding`; the report itself is not modified.
    """
    thr = resolve_thresholds(thresholds, overrides)
    findings: list[Finding] = []
    with analysis_scope(report):  # what several rules read (the depth profile, …) is computed once
        for rule in RULES.values():
            findings.extend(rule(report, thr))
    position = {layer.name: i for i, layer in enumerate(report.layers)}

    def key(f: Finding) -> tuple[int, int]:
        first = min((position.get(n, len(position)) for n in f.layers), default=len(position))
        return SEVERITIES.index(f.severity), first

    return sorted(findings, key=key)


class _CallableModule(types.ModuleType):
    """``gradprobe.diagnose`` is both this package and the public function: once the package is
    imported, Python binds the *module* to the ``gradprobe.diagnose`` attribute, shadowing the lazy
    export of the function. Calling the module calls :func:`diagnose`, so
    ``gradprobe.diagnose(report, **thresholds)`` works either way."""

    def __call__(
        self, report: Report, thresholds: Thresholds | None = None, **overrides: Any
    ) -> list[Finding]:
        return diagnose(report, thresholds, **overrides)


sys.modules[__name__].__class__ = _CallableModule
