"""Symmetry facts per layer: which units are identical, and whether their gradients are too.

Called by the probe after its run, while it still holds the initialised parameters and the last
batch's gradients (:func:`analyse_units`). For every recorded module with a weight matrix it groups
*units* — output rows of Linear/Conv weights (with their bias), the rows of every gate chunk of an
RNN/LSTM/GRU layer, the q/k/v rows of attention's input projection — whose incoming weights and bias
are bitwise identical, then looks at their weight-gradient rows:

* **locked**: identical (nonzero) gradient rows. Identical incoming *and* outgoing connections give
  identical gradients, so every step keeps them identical: gradient descent can never separate them.
* **broken**: gradient rows differ (a zero-init head whose outputs get different loss gradients,
  duplicated rows with distinct outgoing weights): the first step separates them.
* **zero_gradient**: every gradient row is exactly zero (the layer sits behind a zero gate, or nothing
  can ever reach it). Step 0 cannot tell; the outgoing weights *and their gradients* are compared
  where they can be found (the columns of the next weighted layer in execution order whose input
  width equals this layer's units): identical columns with identical gradient columns stay identical,
  so the group is locked; and the rule also reads the probe's after-steps gradient.
* **frozen**: no gradient (parameters that do not require grad): never trained, never an error.

Gradient rows are compared with a relative tolerance (``rtol``, 1e-3 in float32, wider in half
precision): identical units give identical gradients only up to rounding, because BLAS kernels may
accumulate two identical rows in a different order depending on where they fall in a tile.

Everything recorded is a small JSON-able dict in ``layer.extra["symmetry"]``; the severities are
decided by :func:`gradprobe.diagnose.rules.symmetry_rule`. Cost: one pass over each weight and its
gradient (:mod:`gradprobe.diagnose.grouping`: exact integer signatures, then an exact check), O(n·d).
In a probe most layers cost less: the probe sums every weight's rows in its one read of the weights
(:func:`gradprobe.stats.sums_and_row_sums`), and a layer whose rows all have different sums (any
random init) has no identical units and is not read again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradprobe.diagnose.grouping import group_identical_units, sums_all_distinct
from gradprobe.report import Report

__all__ = [
    "analyse_units",
    "group_units",
    "UnitGroups",
    "unit_features",
    "group_rows",
    "gradient_rtol",
    "EXAMPLES",
]

EXAMPLES = 4  # example groups kept per layer
_EXAMPLE_UNITS = 8  # unit indices kept per example group


def gradient_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance for "identical" gradient rows: 1e-3, or 8 ulps of a coarser dtype."""
    return max(1e-3, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3


# --------------------------------------------------------------------------------------------
# Exact grouping
# --------------------------------------------------------------------------------------------


def group_rows(features: Sequence[torch.Tensor]) -> list[list[int]]:
    """Groups (size ≥ 2) of units identical in every feature matrix (rows = units), exactly:
    :func:`gradprobe.diagnose.grouping.group_identical_units` (−0.0 equals +0.0, NaN never matches)."""
    if not features or features[0].shape[0] < 2:
        return []
    return group_identical_units(*(f.detach() for f in features))


# --------------------------------------------------------------------------------------------
# Units of each kind of layer
# --------------------------------------------------------------------------------------------


@dataclass
class UnitSet:
    """One set of units: feature matrices (rows = units) of incoming parameters, by parameter name."""

    label: str
    units: int
    parts: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (param name, (units, d))


def _rows_of(name: str, t: torch.Tensor, units: int, chunks: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Rows of ``t`` for unit j: rows j, units + j, …, (chunks−1)·units + j, as one (units, d)
    view per chunk (gate, q/k/v). Side by side they are the unit's row; views, not a permuted copy."""
    return [(name, c) for c in t.reshape(chunks, units, -1).unbind(0)]


_RNN_PARAM = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def unit_features(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[UnitSet]:
    """The unit sets of ``module``, reading its parameters from ``tensors`` (name → tensor: the
    initialised parameters, or their gradients laid out the same way). Empty for modules whose rows
    are not units (Embedding) or that have no weight matrix."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return []
    if isinstance(module, nn.RNNBase):
        chunks = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        hidden = module.hidden_size
        sets: dict[str, UnitSet] = {}
        for name, t in tensors.items():
            m = _RNN_PARAM.match(name)
            if m is None:
                continue
            label = f"l{m.group(2)}{m.group(3) or ''}"
            s = sets.setdefault(label, UnitSet(label=label, units=hidden))
            s.parts.extend(_rows_of(name, t, hidden, chunks))
        return [sets[k] for k in sorted(sets)]
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        s = UnitSet(label="in_proj", units=e)
        if "in_proj_weight" in tensors:
            s.parts.extend(_rows_of("in_proj_weight", tensors["in_proj_weight"], e, 3))
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if name in tensors:
                    s.parts.append((name, tensors[name].reshape(e, -1)))
        if "in_proj_bias" in tensors:
            s.parts.extend(_rows_of("in_proj_bias", tensors["in_proj_bias"], e, 3))
        return [s] if s.parts else []
    weight = tensors.get("weight")
    if weight is None or weight.dim() < 2:
        return []
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        cin = weight.shape[0]
        out_g = weight.shape[1]
        rows = (
            weight.reshape(groups, cin // groups, out_g, -1).permute(0, 2, 1, 3).reshape(groups * out_g, -1)
        )
    else:
        rows = weight.reshape(weight.shape[0], -1)
    s = UnitSet(label="weight", units=rows.shape[0], parts=[("weight", rows)])
    bias = tensors.get("bias")
    if bias is not None and bias.numel() == rows.shape[0]:
        s.parts.append(("bias", bias.reshape(-1, 1)))
    return [s]


def _input_columns(module: nn.Module, tensors: Mapping[str, torch.Tensor], units: int) -> torch.Tensor | None:
    """Columns of ``module``'s input weights per input unit, (units, d), when its input width is ``units``."""
    if isinstance(module, nn.RNNBase):
        w = tensors.get("weight_ih_l0")
    elif isinstance(module, nn.MultiheadAttention):
        w = tensors.get("in_proj_weight")
    elif isinstance(module, nn.modules.conv._ConvTransposeNd | nn.Embedding | nn.EmbeddingBag):
        return None
    else:
        w = tensors.get("weight")
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
            return None
    if w is None or w.dim() < 2 or w.shape[1] != units:
        return None
    return w.transpose(0, 1).reshape(units, -1)


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


def _counter() -> dict[str, int]:
    return {"groups": 0, "units": 0}


_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # ≈ 16 MiB of float32 per chunk of gradient rows


def _classify(parts: Sequence[torch.Tensor], idx: torch.Tensor, rtol: float) -> str:
    """locked | broken | zero_gradient for the gradient rows ``idx`` (a group, size ≥ 2) of the
    feature matrices ``parts`` (rows = units), taken side by side.

    Locked when every row is within ``rtol`` (relative to the largest row norm) of the first row.
    Works through the rows in chunks without concatenating the parts, so a whole layer in one group
    (constant init) costs one pass over its gradient."""
    mats = [p.detach().reshape(p.shape[0], -1) for p in parts]
    mats = [m if m.is_floating_point() and m.element_size() >= 4 else m.float() for m in mats]
    whole = idx.numel() == mats[0].shape[0] and bool((idx == torch.arange(idx.numel())).all())
    firsts = [m[int(idx[0])].unsqueeze(0) for m in mats]
    width = max(1, sum(m.shape[1] for m in mats))
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // width)
    top = spread = 0.0
    for start in range(0, idx.numel(), step):
        norm_sq = diff_sq = None
        for m, first in zip(mats, firsts):
            chunk = m[start : start + step] if whole else m.index_select(0, idx[start : start + step])
            a = chunk.square().sum(dim=1)
            b = (chunk - first).square().sum(dim=1)
            norm_sq = a if norm_sq is None else norm_sq + a
            diff_sq = b if diff_sq is None else diff_sq + b
        assert norm_sq is not None and diff_sq is not None
        top = max(top, float(norm_sq.max()))
        spread = max(spread, float(diff_sq.max()))
    if top == 0.0:
        return "zero_gradient"
    return "locked" if spread <= rtol * rtol * top else "broken"


def _outgoing(
    columns: torch.Tensor | None, grad_columns: torch.Tensor | None, idx: torch.Tensor, rtol: float
) -> str:
    """identical | distinct | unknown: the group's outgoing weights (columns of the next weighted
    layer) and their gradients. Identical columns that get distinct gradient columns (a zero-init
    layer after a zero-init layer, as in Fixup) become distinct after one step."""
    if columns is None:
        return "unknown"
    c = columns[idx]
    if not bool((c == c[0:1]).all()):
        return "distinct"
    if grad_columns is None:
        return "identical"
    return "distinct" if _classify([grad_columns], idx, rtol) == "broken" else "identical"


Found = list[tuple[UnitSet, list[list[int]]]]


def _group_module(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    row_sums: Mapping[str, torch.Tensor | None] | None = None,
) -> Found:
    """The unit sets of ``module`` with their groups of identical units (weights alone). ``row_sums``:
    parameter name → the float64 sum of each of its rows (dim 0), where known: a set whose first part's
    rows all have different sums has no group, and its rows are not read again."""
    found: Found = []
    for s in unit_features(module, tensors):
        sums = _part_row_sums(s, tensors, row_sums) if row_sums else None
        found.append((s, [] if sums is not None and sums_all_distinct(sums) else group_rows([t for _, t in s.parts])))
    return found


def _part_row_sums(
    s: UnitSet, tensors: Mapping[str, torch.Tensor], row_sums: Mapping[str, torch.Tensor | None]
) -> torch.Tensor | None:
    """The row sums of the units of ``s``'s first part, when that part is a block of whole rows of its
    parameter (Linear, Conv, an RNN gate's or attention's q/k/v rows), else None."""
    name, part = s.parts[0]
    sums, t = row_sums.get(name), tensors.get(name)
    if sums is None or t is None or t.dim() < 2 or part.dim() != 2 or not t.is_contiguous() or t.shape[0] == 0:
        return None
    width = t.numel() // t.shape[0]
    offset = part.storage_offset() - t.storage_offset()
    if (
        width == 0
        or part.shape[1] != width
        or (part.shape[0] > 1 and part.stride(0) != width)
        or (width > 1 and part.stride(1) != 1)
        or offset % width
        or sums.shape[0] != t.shape[0]
    ):
        return None
    first = offset // width
    if first < 0 or first + s.units > sums.shape[0]:
        return None
    return sums[first : first + s.units]


def _analyse_module(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor | None],
    next_module: tuple[nn.Module, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor | None]] | None,
    found: Found | None = None,
) -> dict[str, Any] | None:
    if found is None:
        found = _group_module(module, tensors)
    if not found:
        return None
    sets = [s for s, _ in found]
    trainable = {k: g for k, g in gradients.items() if g is not None}
    # Gradient rows and the next layer's columns (a transposed copy of its weight) are read only
    # for layers that have identical units: most layers have none.
    grad_sets: dict[str, UnitSet] = {}
    if trainable and any(groups for _, groups in found):
        grad_tensors = {k: (trainable[k] if k in trainable else torch.zeros_like(t)) for k, t in tensors.items()}
        grad_sets = {s.label: s for s in unit_features(module, grad_tensors)}
    dtype = next(iter(tensors.values())).dtype
    rtol = gradient_rtol(dtype)
    units = distinct = n_groups = 0
    largest = 1
    counts = {"locked": _counter(), "broken": _counter(), "frozen": _counter()}
    zero_total = _counter()
    outgoing_counts = {kind: _counter() for kind in ("identical", "distinct", "unknown")}
    examples: list[dict[str, Any]] = []
    for s, groups in found:
        units += s.units
        distinct += s.units - sum(len(g) - 1 for g in groups)
        n_groups += len(groups)
        gset = grad_sets.get(s.label)
        columns = grad_columns = None
        if groups and next_module is not None and len(sets) == 1:
            following, weights, following_grads = next_module
            columns = _input_columns(following, weights, s.units)
            present = {k: g for k, g in following_grads.items() if g is not None}
            if columns is not None and present:
                grad_columns = _input_columns(following, present, s.units)
        for g in groups:
            largest = max(largest, len(g))
            idx = torch.tensor(g)
            if gset is None:
                status = "frozen"
            else:
                status = _classify([t for _, t in gset.parts], idx, rtol)
            example: dict[str, Any] = {"units": g[:_EXAMPLE_UNITS], "size": len(g), "status": status}
            if len(sets) > 1:
                example["set"] = s.label
            if status == "zero_gradient":
                outgoing = _outgoing(columns, grad_columns, idx, rtol)
                for counter in (zero_total, outgoing_counts[outgoing]):
                    counter["groups"] += 1
                    counter["units"] += len(g)
                example["outgoing"] = outgoing
            else:
                counts[status]["groups"] += 1
                counts[status]["units"] += len(g)
            if len(examples) < EXAMPLES:
                examples.append(example)
    return {
        "units": units,
        "distinct": distinct,
        "effective_width": distinct / units if units else 1.0,
        "groups": n_groups,
        "largest_group": largest,
        **counts,
        "zero_gradient": {**zero_total, **{f"outgoing_{k}": c for k, c in outgoing_counts.items()}},
        "examples": examples,
        "rtol": rtol,
        "parameters": sorted({name for s in sets for name, _ in s.parts}),
    }


def _named_tensors(
    module: nn.Module,
    params: Mapping[int, nn.Parameter] | None,
    grads: Mapping[int, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """``module``'s parameters as used (``params``) by name, and what ``grads`` holds for each used
    parameter by its id (its gradient, or its row sums: :func:`group_units`) by name, else None."""
    tensors: dict[str, torch.Tensor] = {}
    gradients: dict[str, torch.Tensor | None] = {}
    for name, p in module._parameters.items():
        if p is None:
            continue
        used = p if params is None else params.get(id(p), p)
        tensors[name] = used.detach()
        g = grads.get(id(used))
        gradients[name] = None if g is None else g.detach()
    return tensors, gradients


@dataclass
class UnitGroups:
    """The half of :func:`analyse_units` that needs no gradient, done by the probe before its passes.

    ``found``: per weighted layer, its unit sets and groups of identical units (from the weights).
    ``gradients_needed``: the layers whose gradients :func:`analyse_units` may read: those with
    identical units, and every weighted layer whose input width equals the units of such a layer
    (the one after it in execution order is among them: its columns are their outgoing weights).
    The probe keeps only those gradients and lets every other one go as autograd makes it.
    """

    found: dict[str, Found]
    gradients_needed: set[str]


@torch.no_grad()
def group_units(
    model: nn.Module,
    names: Iterable[str],
    params: Mapping[int, nn.Parameter] | None,
    row_sums: Mapping[int, torch.Tensor] | None = None,
) -> UnitGroups:
    """Group the identical units of every weighted layer among ``names`` (module names, ``"model"``
    for the root) from its weights alone; ``params`` as in :func:`analyse_units`. Layers whose
    weights hold no values (the ``meta`` device) are left out.

    ``row_sums``: ``id(parameter used) → the float64 sum of each of its rows`` (dim 0; the probe takes
    them in its one read of the weights, :func:`gradprobe.stats.sums_and_row_sums`). A layer whose
    rows all have different sums has no identical units and is not read again (the common case:
    any random init); the others are grouped from their rows."""
    modules = {(name or "model"): m for name, m in model.named_modules()}
    weighted = []
    for name in names:
        module = modules.get(name)
        if module is None:
            continue
        tensors, sums = _named_tensors(module, params, row_sums or {})  # row sums by name, as gradients
        if any(t.dim() >= 2 for t in tensors.values()) and not any(t.is_meta for t in tensors.values()):
            weighted.append((name, module, tensors, sums))
    found = {name: _group_module(module, tensors, sums) for name, module, tensors, sums in weighted}
    widths = {s.units for sets in found.values() for s, groups in sets if groups}
    needed = {name for name, sets in found.items() if any(groups for _, groups in sets)}
    for name, module, tensors, _ in weighted:
        if any(_input_columns(module, tensors, units) is not None for units in widths):
            needed.add(name)
    return UnitGroups(found=found, gradients_needed=needed)


@torch.no_grad()
def analyse_units(
    report: Report,
    model: nn.Module,
    params: Mapping[int, nn.Parameter] | None,
    grads: Mapping[int, torch.Tensor],
    groups: UnitGroups | None = None,
) -> None:
    """Attach ``layer.extra["symmetry"]`` to every recorded layer with a weight matrix.

    Args:
        report: the probe's report (its layers' ``extra`` is written; nothing else).
        model: the user's model, read only.
        params: ``id(original parameter) → the initialised parameter used``; None when the model's
            own parameters were used (``init="keep"``).
        grads: ``id(used parameter) → gradient of the last batch`` (absent for frozen/unused ones;
            with ``groups``, present at least for its ``gradients_needed``).
        groups: :func:`group_units` of the same weights, made earlier (by the probe, before its
            passes); a layer it does not cover is grouped here.
    """
    modules = {(name or "model"): m for name, m in model.named_modules()}
    weighted = []
    for layer in report.layers:
        module = modules.get(layer.name)
        if module is None:
            continue
        tensors, gradients = _named_tensors(module, params, grads)
        if any(t.dim() >= 2 for t in tensors.values()):
            weighted.append((layer, module, tensors, gradients))
    for i, (layer, module, tensors, gradients) in enumerate(weighted):
        following = None
        if i + 1 < len(weighted):
            following = (weighted[i + 1][1], weighted[i + 1][2], weighted[i + 1][3])
        found = None if groups is None else groups.found.get(layer.name)
        result = _analyse_module(module, tensors, gradients, following, found)
        if result is not None:
            layer.extra["symmetry"] = result
