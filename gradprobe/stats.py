"""Streaming per-unit moments: exact in float64, mergeable, and free of host synchronisation.

A *unit* is one output channel of a convolution-like tensor or one feature of the last dimension
(see :func:`unit_axis` in :mod:`gradprobe.hooks` for the rule). Every tensor a hook sees is viewed as
``(A, U, B)`` with the unit axis in the middle; per unit we keep the sample count ``n``, the mean and
``M2 = Σ (x - mean)²`` in float64, merged across calls, batches and processes with Chan et al.'s
pairwise formula, which is exact up to float64 rounding where float32 sum/sum-of-squares loses every
digit (mean 1e4, std 1).

Two layers live here:

* :class:`DeviceMoments` accumulates on the tensor's own device. Its ``add`` issues a handful of
  tensor ops and never calls ``.item()``/``.cpu()``, so a probe costs one host transfer at the end
  (``export``/``pack``), not one per layer.
* :class:`Moments` is the host-side result (numpy arrays), the form stored in a :class:`Report`.
  ``Moments.merge`` is the same exact merge, for combining reports from several processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Moments", "DeviceMoments", "Scratch", "chan_merge", "HIST_EDGES", "histogram_edges"]

# Bounded histograms: fixed signed log-magnitude bins, so that no per-layer range has to be known (a
# host sync) before binning, and histograms of any scale merge by adding counts. Bins, in order:
# negative values from -1e12 up to -1e-12 (HIST_PER_DECADE bins per decade, the outermost bins also
# take anything beyond), exact zeros (and |x| < 1e-12), then the positive mirror image.
HIST_LOG10_MIN = -12
HIST_LOG10_MAX = 12
HIST_PER_DECADE = 4
_HIST_SIDE = (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_PER_DECADE
HIST_BINS = 2 * _HIST_SIDE + 1


def histogram_edges() -> np.ndarray:
    """The magnitude edges of one side: ``10**(HIST_LOG10_MIN + k / HIST_PER_DECADE)``.

    Bin ``_HIST_SIDE + 1 + k`` of a histogram holds positive values in ``[edge[k], edge[k+1])``;
    bin ``_HIST_SIDE - 1 - k`` the negative values with magnitude in that range; bin ``_HIST_SIDE``
    zeros and magnitudes below ``edge[0]``.
    """
    return 10.0 ** (HIST_LOG10_MIN + np.arange(_HIST_SIDE + 1) / HIST_PER_DECADE)


HIST_EDGES = histogram_edges()

# Elements of the float64 scratch buffer: 2 Mi doubles = 16 MiB per device. Big enough that a
# typical activation needs one or a few chunks, small enough to be negligible beside the model.
_SCRATCH_ELEMENTS = 1 << 21


def chan_merge(n_a: Any, mean_a: Any, m2_a: Any, n_b: Any, mean_b: Any, m2_b: Any) -> tuple[Any, Any, Any]:
    """Merge two (count, mean, M2) summaries exactly (Chan, Golub & LeVeque 1979).

    ``n = n_a + n_b``; ``δ = mean_b − mean_a``; ``mean = mean_a + δ·n_b/n``;
    ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``. Works elementwise on numpy arrays, torch tensors or floats.
    """
    n = n_a + n_b
    if isinstance(n, np.ndarray):
        safe = np.where(n > 0, n, 1)
        delta = mean_b - mean_a
        return n, mean_a + delta * (n_b / safe), m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    if n == 0:
        return n, mean_a, m2_a
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


class Scratch:
    """A reusable float64 buffer per device, so statistics never page-fault fresh memory per call."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, numel: int) -> torch.Tensor:
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, _SCRATCH_ELEMENTS), dtype=torch.float64, device=device)
            self._buffers[device] = buf
        return buf[:numel]

    def clear(self) -> None:
        self._buffers.clear()


def as_units(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``(A, U, B)`` with the unit axis in the middle (no copy for contiguous input).

    ``axis=None`` means the whole tensor is one unit.
    """
    if axis is None or x.dim() == 0:
        return x.reshape(-1, 1, 1)
    axis = axis % x.dim()
    shape = x.shape
    a = math.prod(shape[:axis])
    b = math.prod(shape[axis + 1 :])
    return x.reshape(a, shape[axis], b)


@dataclass
class Moments:
    """Host-side streaming summary of one tensor stream (a module's outputs or their gradients).

    Attributes:
        rows: samples seen per unit (the same for every unit of a module).
        mean, m2: per-unit mean and sum of squared deviations, float64 arrays of length ``units``.
        unit_max, unit_min: per-unit extremes (a unit whose maximum is ≤ 0 never fired).
        zeros: elements exactly zero.
        saturated: elements whose activation derivative is small (bounded activations only), or None.
        nonfinite: elements that were NaN or ±inf, or None when only known to be > 0 (see flag).
        nonfinite_units: units whose sums were not finite (a cheap exact flag; 0 means all finite).
        calls: how many tensors were merged in.
        histogram: counts in the fixed signed log-magnitude bins (see :func:`histogram_edges`),
            when the probe was asked for histograms; non-finite values are not counted.
    """

    rows: int
    mean: np.ndarray
    m2: np.ndarray
    unit_max: np.ndarray
    unit_min: np.ndarray
    zeros: int
    saturated: int | None
    nonfinite_units: int
    nonfinite: int | None
    calls: int
    histogram: np.ndarray | None = None

    @property
    def units(self) -> int:
        return int(self.mean.shape[0])

    @property
    def count(self) -> int:
        return self.rows * self.units

    def global_mean_var(self) -> tuple[float, float]:
        """Mean and population variance over all elements, merged exactly from the per-unit moments."""
        if self.count == 0:
            return math.nan, math.nan
        mean = float(self.mean.mean())
        m2 = float(self.m2.sum() + self.rows * np.square(self.mean - mean).sum())
        return mean, m2 / self.count

    def unit_var(self) -> np.ndarray:
        return self.m2 / self.rows if self.rows else np.full_like(self.m2, math.nan)

    def merge(self, other: Moments) -> Moments:
        """Exact merge of two summaries of the same module (e.g. from two processes)."""
        if other.units != self.units:
            raise ValueError(f"cannot merge moments of {self.units} and {other.units} units")
        n, mean, m2 = chan_merge(
            float(self.rows), self.mean, self.m2, float(other.rows), other.mean, other.m2
        )
        return Moments(
            rows=self.rows + other.rows,
            mean=np.asarray(mean),
            m2=np.asarray(m2),
            unit_max=np.maximum(self.unit_max, other.unit_max),
            unit_min=np.minimum(self.unit_min, other.unit_min),
            zeros=self.zeros + other.zeros,
            saturated=None
            if self.saturated is None or other.saturated is None
            else self.saturated + other.saturated,
            nonfinite_units=max(self.nonfinite_units, other.nonfinite_units),
            nonfinite=None
            if self.nonfinite is None or other.nonfinite is None
            else self.nonfinite + other.nonfinite,
            calls=self.calls + other.calls,
            histogram=None
            if self.histogram is None or other.histogram is None
            else self.histogram + other.histogram,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "histogram": None if self.histogram is None else [int(c) for c in self.histogram],
            "rows": self.rows,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "unit_max": self.unit_max.tolist(),
            "unit_min": self.unit_min.tolist(),
            "zeros": self.zeros,
            "saturated": self.saturated,
            "nonfinite_units": self.nonfinite_units,
            "nonfinite": self.nonfinite,
            "calls": self.calls,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        from gradprobe.report import decode_float  # local: report imports this module

        def arr(values: list[Any]) -> np.ndarray:
            return np.array([decode_float(v) for v in values], dtype=np.float64)

        return cls(
            rows=int(d["rows"]),
            mean=arr(d["mean"]),
            m2=arr(d["m2"]),
            unit_max=arr(d["unit_max"]),
            unit_min=arr(d["unit_min"]),
            zeros=int(d["zeros"]),
            saturated=d["saturated"],
            nonfinite_units=int(d["nonfinite_units"]),
            nonfinite=d["nonfinite"],
            calls=int(d["calls"]),
            histogram=None if d.get("histogram") is None else np.asarray(d["histogram"], dtype=np.int64),
        )


def _histogram(v: torch.Tensor) -> torch.Tensor:
    """Counts of ``v`` in the fixed signed log-magnitude bins (non-finite values skipped)."""
    a = v.detach().reshape(-1).float()
    finite = torch.isfinite(a)
    mag = torch.log10(a.abs().clamp_min(10.0**HIST_LOG10_MIN * 0.5))
    k = ((mag - HIST_LOG10_MIN) * HIST_PER_DECADE).floor_().clamp_(-1, _HIST_SIDE - 1).long()
    small = k < 0
    k = k.clamp_(min=0)
    idx = torch.where(a < 0, _HIST_SIDE - 1 - k, _HIST_SIDE + 1 + k)
    idx = torch.where(small, torch.full_like(idx, _HIST_SIDE), idx)
    idx = torch.where(finite, idx, torch.full_like(idx, HIST_BINS))
    return torch.bincount(idx, minlength=HIST_BINS + 1)[:HIST_BINS]


class DeviceMoments:
    """Accumulates :class:`Moments` on the data's device without any host synchronisation.

    ``add`` reads the tensor once in float64 chunks through a shared scratch buffer (per-unit sum, then
    the sum of squared deviations from the chunk's unit means, so no cancellation), plus one pass each
    for per-unit max/min and the count of zeros. Everything stays a tensor until :meth:`pack`.
    """

    def __init__(self, scratch: Scratch) -> None:
        self._scratch = scratch
        self.rows = 0
        self.calls = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.unit_max: torch.Tensor | None = None
        self.unit_min: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None
        self.saturated: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None

    @torch.no_grad()
    def add(
        self,
        x: torch.Tensor,
        axis: int | None,
        saturation: tuple[float, float] | None = None,
        count_nonfinite: bool = False,
        histogram: bool = False,
    ) -> None:
        """Merge one tensor in.

        Args:
            x: the tensor (any floating dtype; read only).
            axis: the unit axis, or None for a single unit.
            saturation: ``(centre, threshold)``: count elements with ``|x − centre| > threshold``.
            count_nonfinite: also count NaN/inf elements exactly (one more pass; the probe asks for it
                only when the cheap per-unit flag fired).
            histogram: also count values in the fixed signed log-magnitude bins (a few more passes).
        """
        v = as_units(x.detach(), axis)
        a, u, b = v.shape
        rows = a * b
        if rows == 0 or u == 0:
            return
        mean, m2 = self._chunked_moments(v)
        vmax = v.amax(dim=(0, 2)).to(torch.float64)
        vmin = v.amin(dim=(0, 2)).to(torch.float64)
        zeros = v.numel() - torch.count_nonzero(v)
        if self.mean is None:
            self.rows, self.mean, self.m2 = rows, mean, m2
            self.unit_max, self.unit_min, self.zeros = vmax, vmin, zeros
        else:
            assert self.m2 is not None and self.unit_max is not None and self.unit_min is not None
            if self.mean.shape[0] != u:
                raise ValueError(f"unit count changed between calls: {self.mean.shape[0]} then {u}")
            n, self.mean, self.m2 = chan_merge(self.rows, self.mean, self.m2, rows, mean, m2)
            self.rows = n
            self.unit_max = torch.maximum(self.unit_max, vmax)
            self.unit_min = torch.minimum(self.unit_min, vmin)
            self.zeros = self.zeros + zeros
        if saturation is not None:
            centre, threshold = saturation
            sat = (
                torch.count_nonzero((v - centre).abs_() > threshold)
                if centre
                else torch.count_nonzero(v.abs() > threshold)
            )
            self.saturated = sat if self.saturated is None else self.saturated + sat
        if count_nonfinite:
            bad = v.numel() - torch.count_nonzero(torch.isfinite(v))
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        if histogram:
            h = _histogram(v)
            self.hist = h if self.hist is None else self.hist + h
        self.calls += 1

    def _chunked_moments(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit mean and M2 of ``v`` (A, U, B), in float64 chunks along A."""
        a, u, b = v.shape
        per_a = u * b
        step = max(1, _SCRATCH_ELEMENTS // per_a)
        n_total = 0
        mean = m2 = None
        for start in range(0, a, step):
            chunk = v[start : start + step]
            buf = self._scratch.get(v.device, chunk.numel()).view(chunk.shape)
            buf.copy_(chunk)
            n = chunk.shape[0] * b
            c_mean = buf.sum(dim=(0, 2)) / n
            buf.sub_(c_mean.view(1, u, 1))
            c_m2 = buf.square_().sum(dim=(0, 2))
            if mean is None:
                n_total, mean, m2 = n, c_mean, c_m2
            else:
                n_total, mean, m2 = chan_merge(n_total, mean, m2, n, c_mean, c_m2)
        assert mean is not None and m2 is not None
        return mean, m2

    def pack(self) -> list[torch.Tensor]:
        """The accumulated tensors in a fixed order, as float64, for one batched host transfer."""
        assert self.mean is not None and self.m2 is not None
        assert self.unit_max is not None and self.unit_min is not None and self.zeros is not None
        dev = self.mean.device
        scalars = torch.stack(
            [
                self.zeros.to(torch.float64),
                (self.saturated if self.saturated is not None else torch.tensor(-1, device=dev)).to(
                    torch.float64
                ),
                (self.nonfinite if self.nonfinite is not None else torch.tensor(-1, device=dev)).to(
                    torch.float64
                ),
            ]
        )
        parts = [self.mean, self.m2, self.unit_max, self.unit_min, scalars]
        if self.hist is not None:
            parts.append(self.hist.to(torch.float64))
        return parts

    @staticmethod
    def unpack(parts: list[np.ndarray], rows: int, calls: int) -> Moments:
        mean, m2, unit_max, unit_min, scalars = parts[:5]
        hist = parts[5].astype(np.int64) if len(parts) > 5 else None
        finite = np.isfinite(mean) & np.isfinite(m2)
        nonfinite_units = int((~finite).sum())
        zeros, saturated, nonfinite = (int(s) for s in scalars)
        if nonfinite < 0:
            nonfinite = 0 if nonfinite_units == 0 else -1
        return Moments(
            rows=rows,
            mean=mean,
            m2=np.maximum(m2, 0.0),
            unit_max=unit_max,
            unit_min=unit_min,
            zeros=zeros,
            saturated=None if saturated < 0 else saturated,
            nonfinite_units=nonfinite_units,
            nonfinite=None if nonfinite < 0 else nonfinite,
            calls=calls,
            histogram=hist,
        )

    @property
    def empty(self) -> bool:
        return self.mean is None
