"""Streaming per-unit moments: exact in float64, mergeable, and free of host synchronisation.

A *unit* is one output channel of a convolution-like tensor or one feature of the last dimension
(see :func:`unit_axis` in :mod:`gradprobe.hooks` for the rule). Every tensor a hook sees is viewed as
``(A, U, B)`` with the unit axis in the middle; per unit we keep the sample count ``n``, the mean and
``M2 = Σ (x - mean)²`` in float64, merged across calls, batches and processes with Chan et al.'s
pairwise formula, which is exact up to float64 rounding where float32 sum/sum-of-squares loses every
digit (mean 1e4, std 1).

Two layers live here:

* :class:`DeviceMoments` accumulates on the tensor's own device. Its ``add`` issues a handful of
  tensor ops per cache-sized chunk and never calls ``.item()``/``.cpu()``, so a probe costs one host
  transfer at the end (``pack``), not one per layer.
* :class:`Moments` is the host-side result (numpy arrays), the form stored in a :class:`Report`.
  ``Moments.merge`` is the same exact merge, for combining reports from several processes.

How ``add`` stays cheap and exact (measurements in docs/performance.md). The tensor is read from
memory once, in chunks of :data:`CHUNK_ELEMENTS`. Each chunk is copied into a float64 scratch
buffer; the per-unit maximum and minimum and the zero count (``Σ sign(x)²``, a dot product) are
taken from the source chunk while it is in cache; then the per-unit moments, in float64, in cache:

* ``(rows, units)`` chunks (units on the last axis: Linear, attention, LayerNorm, embeddings) go
  through ``torch.batch_norm_update_stats``, one fused two-pass mean/variance kernel per channel;
  chunks are merged with Chan's formula.
* Other layouts (channels with spatial positions) are shifted by a per-unit *centre* ``c``, the
  mean of the unit's first chunk, and the shifted sums ``S1 = Σ(x − c)`` and ``S2 = Σ(x − c)²``
  (matrix-vector products) accumulate over the chunks: ``mean = c + S1/n``, ``M2 = S2 − S1²/n``.
  Since ``c`` is the mean of the first chunk's ``n₁`` samples, ``(c − mean)² ≤ M2/n₁``, so
  ``S2 ≤ M2·(1 + n/n₁)`` and the cancellation costs at most ``1 + n/n₁`` (about the number of
  chunks) float64 ulps, where the naive ``Σx² − (Σx)²/n`` loses every digit at mean 1e4, std 1.

The summaries of successive calls (batches, repeated modules) are queued and merged with Chan's
formula when read. A tensor recorded twice (an ``nn.Identity``'s output) is read once.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:  # the optional one-read C kernel (gradprobe/_kernel.c), built at install when a compiler exists
    from gradprobe import _kernel as _kernel_module
except ImportError:  # pragma: no cover - depends on the install
    _kernel_module = None

# The kernel in use, or None: the pure-PyTorch path. GRADPROBE_KERNEL=0 switches it off (both paths
# give the same statistics; tests run both).
KERNEL: Any = None if os.environ.get("GRADPROBE_KERNEL", "1") == "0" else _kernel_module
# Elements per tile of the kernel: two passes over a tile stay in a core's L2 (measured: 16-64 Ki
# alike here, docs/performance.md).
KERNEL_TILE = 1 << 15
_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1}


def kernel_info() -> str:
    """How the statistics are computed here: ``"C kernel (avx2)"``, ``"C kernel (portable)"``, or
    ``"PyTorch operations"`` (no kernel built, or ``GRADPROBE_KERNEL=0``)."""
    return "PyTorch operations" if KERNEL is None else f"C kernel ({KERNEL.info()})"

__all__ = [
    "KERNEL",
    "kernel_info",
    "CHUNK_ELEMENTS",
    "HIST_EDGES",
    "DeviceMoments",
    "Moments",
    "Scratch",
    "chan_merge",
    "histogram_edges",
    "square_sum",
    "sum_and_square_sum",
    "sums_of",
    "sums_and_row_sums",
]

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

# Elements per chunk: 256 Ki values (a 2 MiB float64 buffer). Measured on the 2-core CPU (1 and 2
# threads): 64 Ki chunks, which fit one core's L2, lose to the per-op overhead of ~8 tensor ops per
# chunk (a few µs each); above 256 Ki the buffer spills to memory. 2.4-3x faster than whole-tensor
# passes at 2 Mi.
CHUNK_ELEMENTS = 1 << 18


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
    """Reusable per-device buffers for the statistics: the float64 chunk buffer and a second buffer
    (the signs for zero counting).

    It also remembers the summary of the last tensor summarised, so that a tensor recorded twice (an
    ``nn.Identity`` returns its input; two tensor hooks on one output receive one gradient) is read
    once. The memo is keyed by identity, version counter, unit axis and options, and holds only a
    weak reference to the tensor.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        if not 1 <= chunk_elements < 1 << 24:  # zero counts are float32 dot products of ±1/0
            raise ValueError(f"chunk_elements must be in [1, 2**24), got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._aux: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._memo: tuple[Any, weakref.ref[torch.Tensor], _Summary] | None = None
        # _Views per (device, dtype, chunk shape): built once per probe, not once per tensor
        self.views: dict[tuple[torch.device, torch.dtype, torch.Size], _Views] = {}
        self._minus_one: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, numel: int) -> torch.Tensor:
        """A float64 buffer of ``numel`` elements on ``device`` (contents undefined)."""
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.chunk_elements), dtype=torch.float64, device=device)
            self._buffers[device] = buf
            self.views.clear()  # views of the old buffer
        return buf[:numel]

    def aux(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A second buffer of ``numel`` elements of ``dtype`` (contents undefined)."""
        key = (device, dtype)
        buf = self._aux.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.chunk_elements), dtype=dtype, device=device)
            self._aux[key] = buf
            self.views.clear()
        return buf[:numel]

    def minus_one(self, device: torch.device) -> torch.Tensor:
        """A shared ``[-1.0]`` on ``device`` (read only): "not counted" in packed statistics."""
        t = self._minus_one.get(device)
        if t is None:
            t = self._minus_one[device] = torch.full((1,), -1.0, dtype=torch.float64, device=device)
        return t

    def clear(self) -> None:
        self._buffers.clear()
        self._aux.clear()
        self.views.clear()
        self._memo = None

    def recall(self, x: torch.Tensor, key: Any) -> _Summary | None:
        memo = self._memo
        if memo is None or memo[0] != key or memo[1]() is not x:
            return None
        return memo[2]

    def remember(self, x: torch.Tensor, key: Any, summary: _Summary) -> None:
        self._memo = (key, weakref.ref(x), summary)


def as_units(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``(A, U, B)`` with the unit axis in the middle (no copy for contiguous input).

    ``axis=None`` means the whole tensor is one unit. A tensor that is a permutation of a
    contiguous one (channels-last activations, the ``(T, N, E)`` outputs of batch-first attention,
    transposed views) is viewed, without a copy, with its dimensions in memory order: the
    statistics do not depend on the order of the samples. Anything else is copied.
    """
    if axis is None or x.dim() == 0:
        return x.reshape(-1, 1, 1)
    axis = axis % x.dim()
    shape = x.shape
    if not x.is_contiguous():
        order = sorted(range(x.dim()), key=lambda d: (x.stride(d), shape[d]), reverse=True)
        permuted = x.permute(order)
        if permuted.is_contiguous():
            p = order.index(axis)
            a = math.prod(permuted.shape[:p])
            return permuted.view(a, shape[axis], -1)
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
        """Mean and population variance over all elements, merged exactly from the per-unit moments:
        ``(ΣM2 + rows·Σ(mean_u − mean)²) / count``.

        Every Σ is numpy's pairwise sum of a 1-D array (``Σd²`` too, not BLAS's ``d @ d``), which is
        what a sum along one row of a 2-D array gives: :meth:`TensorStats.from_packed` takes these
        sums for many summaries at once, bit-equal (``tests/test_stats.py``).
        """
        units = self.mean.shape[0]
        count = self.rows * units
        if count == 0:
            return math.nan, math.nan
        if self.nonfinite_units == 0:  # the common case: no errstate (~2 µs)
            return self._mean_var(units, count)
        # ±inf means (a −inf mask's output) give NaN, as they should, without numpy's warnings
        with np.errstate(invalid="ignore", over="ignore"):
            return self._mean_var(units, count)

    def _mean_var(self, units: int, count: int) -> tuple[float, float]:
        mean = float(self.mean.sum()) / units
        d = self.mean - mean
        np.multiply(d, d, out=d)
        return mean, (float(self.m2.sum()) + self.rows * float(d.sum())) / count

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


@dataclass
class _Summary:
    """Per-unit summary of one tensor (one ``add`` call), still on the tensor's device."""

    rows: int
    mean: torch.Tensor  # (U,) float64
    m2: torch.Tensor  # (U,) float64
    unit_max: torch.Tensor  # (U,) in the source dtype (exact)
    unit_min: torch.Tensor
    # 0-d count of nonzero elements, a floating tensor holding an exact integer (float32 from one
    # chunk's dot product, < 2^24; float64 once added up). Zeros = rows·units − nonzero, formed on
    # the host: converting on the device costs four tensor ops per recorded tensor.
    nonzero: torch.Tensor
    saturated: torch.Tensor | None  # 0-d count (int64; float64 holding an exact integer from the kernel)
    # the kernel's output, already in the packed layout (see DeviceMoments.pack), when this summary
    # is exactly what the kernel wrote
    packed: torch.Tensor | None = None

    @property
    def units(self) -> int:
        return int(self.mean.shape[0])

    @property
    def zeros(self) -> torch.Tensor:
        """0-d int64 count of zero elements (a device tensor; for tests and merges)."""
        return (self.rows * self.mean.shape[0] - self.nonzero.to(torch.float64)).to(torch.int64)


class _KernelSummary(_Summary):
    """The C kernel's summary: its packed output (see :meth:`DeviceMoments.pack`); the per-statistic
    views are made only when something reads them (a merge, a test), not for every tensor."""

    def __init__(self, rows: int, units: int, packed: torch.Tensor, saturation: bool) -> None:
        self.rows = rows
        self._units = units
        self.packed = packed
        self._saturation = saturation

    @property
    def units(self) -> int:
        return self._units

    mean = property(lambda self: self.packed[: self._units])  # type: ignore[assignment]
    m2 = property(lambda self: self.packed[self._units : 2 * self._units])  # type: ignore[assignment]
    unit_max = property(lambda self: self.packed[2 * self._units : 3 * self._units])  # type: ignore[assignment]
    unit_min = property(lambda self: self.packed[3 * self._units : 4 * self._units])  # type: ignore[assignment]
    nonzero = property(lambda self: self.packed[4 * self._units])  # type: ignore[assignment]
    saturated = property(  # type: ignore[assignment]
        lambda self: self.packed[4 * self._units + 1] if self._saturation else None
    )


def _count_saturated(chunk: torch.Tensor, saturation: tuple[float, float]) -> torch.Tensor:
    centre, threshold = saturation
    if centre:
        return torch.count_nonzero((chunk - centre).abs_() > threshold)
    return torch.count_nonzero(chunk.abs() > threshold)


# Rows at least this long are summed along the row first (see _Views).
_LONG_ROW = 64
# (rows, units) chunks with at least this many units use the fused per-channel statistics kernel
# (with very few units it is no faster than the matrix-vector sums).
_FUSED_MIN_UNITS = 16
# Devices with a kernel for it (not meta, say): elsewhere the matrix-vector path, which any backend has.
_FUSED_DEVICES = ("cpu", "cuda")


class _Views:
    """Views of the scratch buffers for one chunk shape ``(k, u, b)``, built once per shape."""

    def __init__(self, scratch: Scratch, device: torch.device, dtype: torch.dtype, shape: torch.Size) -> None:
        k, u, b = shape
        n = k * u * b
        self.buf = scratch.get(device, n).view(k, u, b)
        # Per-unit sums as reductions of 2-D views along one dimension. Reductions of (k, u, b) over
        # dims (0, 2) take a slow strided path in torch on CPU (5-10x slower for b = 16), so with
        # several samples of several elements per unit the sum goes in two stages: along the rows of
        # b elements first when rows are long, else over the samples first (a column sum over k rows
        # of u·b values). Matrix-vector products with a vector of ones read the same bytes but MKL's
        # gemv runs on one thread: 1.7x slower than torch.sum at 2 threads.
        self.stages = 0 if k == 1 or b == 1 or u == 1 else 1 if b >= _LONG_ROW else 2
        self.flat = u == 1
        self.fused = b == 1 and u >= _FUSED_MIN_UNITS and device.type in _FUSED_DEVICES
        self.buf2d = self.buf.view(k, u * b)
        self.shape = (k, u, b)
        if u == 1:
            self.first, self.dim = self.buf.view(1, k * b), 1
        elif b == 1:
            self.first, self.dim = self.buf.view(k, u), 0
        elif k == 1:
            self.first, self.dim = self.buf.view(u, b), 1
        elif self.stages == 1:  # rows first: (k·u, b) → (k, u), then over k
            self.first, self.dim = self.buf.view(k * u, b), 1
        else:  # samples first: (k, u·b) → (u, b), then along b
            self.first, self.dim = self.buf.view(k, u * b), 0
        # zero counting as Σ sign(x)²: signs of float32/float64 chunks straight from the source
        # (in cache), of half-precision chunks from the float64 copy
        sign_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64
        self.signs_from_source = sign_dtype == dtype
        self.signs = scratch.aux(device, sign_dtype, n).view(k, u, b)
        self.signs_flat = self.signs.view(-1)

    def unit_sum(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-unit sum of the float64 buffer, added into ``out`` when given."""
        total = self.first.sum(dim=self.dim)
        k, u, b = self.shape
        if self.stages == 1:
            total = total.view(k, u).sum(dim=0)
        elif self.stages == 2:
            total = total.view(u, b).sum(dim=1)
        return total if out is None else out.add_(total)

    def extremes(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit maximum and minimum of a source chunk."""
        if self.stages == 1:
            return chunk.amax(dim=2).amax(dim=0), chunk.amin(dim=2).amin(dim=0)
        if self.stages == 2:
            return chunk.amax(dim=0).amax(dim=1), chunk.amin(dim=0).amin(dim=1)
        if self.flat:
            flat = chunk.reshape(1, -1)
            return flat.amax(dim=1), flat.amin(dim=1)
        return chunk.amax(dim=(0, 2)), chunk.amin(dim=(0, 2))


def _chan(
    n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan's merge with counts as Python ints (no tensor made from host data, so no transfer)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a.add(delta, alpha=n_b / n)
    m2 = (m2_a + m2_b).add_(delta.square_(), alpha=n_a * n_b / n)
    return n, mean, m2


def _summarize_chunks(
    chunks: Iterable[torch.Tensor], scratch: Scratch, saturation: tuple[float, float] | None
) -> _Summary:
    """Summary of a stream of ``(k, u, b)`` chunks that all hold the same ``u`` units.

    Per chunk: one copy into the float64 buffer (the only read from memory), max, min and zero
    count from the source while it is in cache, then the per-unit moments in cache: for
    ``(rows, units)`` chunks (the last axis holds the units: Linear, attention, LayerNorm outputs)
    one fused kernel, ``torch.batch_norm_update_stats`` in float64 (a two-pass mean and variance per
    channel, 2-5x faster than the matrix-vector sums; chunks merged with Chan's formula); otherwise
    shift, square and two per-unit sums. About eight tensor ops per chunk; views of the buffers are
    built once per chunk shape.
    """
    views = scratch.views
    maxima: list[torch.Tensor] = []
    minima: list[torch.Tensor] = []
    nonzero: list[torch.Tensor] = []
    saturated: list[torch.Tensor] = []
    centre = centre_view = s1 = s2 = chunk_mean = chunk_m2 = None
    rows = chunk_rows = 0
    for chunk in chunks:
        shape = chunk.shape
        view_key = (chunk.device, chunk.dtype, shape)
        w = views.get(view_key)
        if w is None:
            w = views[view_key] = _Views(scratch, chunk.device, chunk.dtype, shape)
        k, u, b = shape
        rows += k * b
        buf = w.buf
        buf.copy_(chunk)
        hi, lo = w.extremes(chunk)
        maxima.append(hi)
        minima.append(lo)
        torch.sign(chunk if w.signs_from_source else buf, out=w.signs)
        nonzero.append(torch.dot(w.signs_flat, w.signs_flat))
        if saturation is not None:
            saturated.append(_count_saturated(chunk, saturation))
        if w.fused:
            # one fused two-pass kernel for the per-unit mean and variance of a (rows, units) chunk;
            # chunks merged with Chan's formula
            c_mean, c_var = torch.batch_norm_update_stats(w.buf2d, None, None, 0.0)
            c_m2 = c_var.mul_(k)
            if chunk_mean is None:
                chunk_rows, chunk_mean, chunk_m2 = k, c_mean, c_m2
            else:
                assert chunk_m2 is not None
                chunk_rows, chunk_mean, chunk_m2 = _chan(chunk_rows, chunk_mean, chunk_m2, k, c_mean, c_m2)
        elif centre_view is None:
            centre = w.unit_sum().div_(k * b)
            centre_view = centre.view(1, u, 1)
            buf.sub_(centre_view).mul_(buf)
            s2 = w.unit_sum()
        else:
            buf.sub_(centre_view)
            s1 = w.unit_sum(s1)
            buf.mul_(buf)
            w.unit_sum(s2)
    if chunk_mean is not None and chunk_m2 is not None:
        mean, m2 = chunk_mean, chunk_m2
    else:
        assert centre is not None and s2 is not None
        if s1 is None:
            mean, m2 = centre, s2
        else:
            mean = centre.add(s1, alpha=1.0 / rows)
            m2 = s2.sub_(s1.mul_(s1), alpha=1.0 / rows)
    return _Summary(
        rows=rows,
        mean=mean,
        m2=m2,
        unit_max=maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(dim=0),
        unit_min=minima[0] if len(minima) == 1 else torch.stack(minima).amin(dim=0),
        nonzero=nonzero[0] if len(nonzero) == 1 else torch.stack(nonzero).sum(dtype=torch.float64),
        saturated=None
        if saturation is None
        else saturated[0]
        if len(saturated) == 1
        else torch.stack(saturated).sum(),
    )


def _summarize(v: torch.Tensor, scratch: Scratch, saturation: tuple[float, float] | None) -> _Summary:
    """Per-unit count, mean, M2, max, min, and the zero (and saturated) counts of ``v`` (A, U, B).

    Chunks hold whole samples ``v[a0:a1]`` when a sample fits the chunk budget; otherwise the units
    are summarised in blocks ``v[a0:a1, u0:u1]`` that do, and their summaries concatenated; a single
    unit's sample longer than the budget (volumes, long signals) is cut along its elements.
    """
    a, u, b = v.shape
    if KERNEL is not None and _kernel_can_read(v):
        return _summarize_kernel(v, scratch, saturation)
    budget = scratch.chunk_elements
    if a * u * b <= budget:  # the common case: one chunk
        return _summarize_chunks((v,), scratch, saturation)
    if u * b <= budget:
        step = budget // (u * b)
        return _summarize_chunks((v[a0 : a0 + step] for a0 in range(0, a, step)), scratch, saturation)
    if b <= budget:
        su = budget // b
        step = budget // (su * b)
        blocks = [
            _summarize_chunks(
                (v[a0 : a0 + step, u0 : u0 + su] for a0 in range(0, a, step)), scratch, saturation
            )
            for u0 in range(0, u, su)
        ]
    else:
        blocks = [
            _summarize_chunks(
                (v[a0 : a0 + 1, u0 : u0 + 1, b0 : b0 + budget] for a0 in range(a) for b0 in range(0, b, budget)),
                scratch,
                saturation,
            )
            for u0 in range(u)
        ]
    first = blocks[0]
    return _Summary(
        rows=first.rows,
        mean=torch.cat([s.mean for s in blocks]),
        m2=torch.cat([s.m2 for s in blocks]),
        unit_max=torch.cat([s.unit_max for s in blocks]),
        unit_min=torch.cat([s.unit_min for s in blocks]),
        nonzero=torch.stack([s.nonzero.to(torch.float64) for s in blocks]).sum(),
        saturated=None if saturation is None else torch.stack([s.saturated for s in blocks]).sum(),  # type: ignore[misc]
    )


def _kernel_can_read(v: torch.Tensor) -> bool:
    """Whether the C kernel can read ``v`` through its data pointer: a plain strided float32/float64
    tensor in host memory (not a subclass such as a fake or functional tensor, not a lazy negation)."""
    # [perf] cheapest checks first (~0.5 µs for a contiguous tensor; called for every recorded
    # tensor and every parameter): `is_cpu`, not `device.type`, and strides only when not contiguous
    return (
        (type(v) is torch.Tensor or type(v) is torch.nn.Parameter)
        and v.is_cpu
        and v.dtype in _KERNEL_DTYPES
        and v.layout == torch.strided
        and not v.is_neg()
        and (v.is_contiguous() or min(v.stride(), default=0) >= 0)
    )


def _summarize_kernel(v: torch.Tensor, scratch: Scratch, saturation: tuple[float, float] | None) -> _Summary:
    """The C kernel's summary of ``v`` (A, U, B): one read, every statistic, float64 accumulation."""
    a, u, b = v.shape
    # shape and strides passed are v's own (torch keeps every view inside its storage)
    return _kernel_summary(v.data_ptr(), v.dtype, a, u, b, v.stride(), v.is_contiguous(), scratch, saturation)


def _kernel_summary(
    data: int,
    dtype: torch.dtype,
    a: int,
    u: int,
    b: int,
    strides: tuple[int, ...],
    contiguous: bool,
    scratch: Scratch,
    saturation: tuple[float, float] | None,
) -> _Summary:
    if u == 1 and a > 1 and contiguous:
        a, b, strides = 1, a * b, (a * b, a * b, 1)  # one unit: a single run, not a column
    out = torch.empty(4 * u + 3, dtype=torch.float64)
    centre, threshold = saturation if saturation is not None else (0.0, 0.0)
    KERNEL.unit_stats(
        data,
        _KERNEL_DTYPES[dtype],
        a,
        u,
        b,
        *strides,
        out.data_ptr(),
        max(1, min(scratch.chunk_elements, KERNEL_TILE)),
        saturation is not None,
        float(centre),
        float(threshold),
        torch.get_num_threads(),  # [perf] a large tensor is read by torch's own OpenMP threads
    )
    return _KernelSummary(a * b, u, out, saturation is not None)


def _merge_summaries(a: _Summary, b: _Summary) -> _Summary:
    """Chan's exact merge of two summaries of the same stream (new tensors; inputs untouched)."""
    n, mean, m2 = chan_merge(float(a.rows), a.mean, a.m2, float(b.rows), b.mean, b.m2)
    return _Summary(
        rows=a.rows + b.rows,
        mean=mean,
        m2=m2,
        unit_max=torch.maximum(a.unit_max, b.unit_max),
        unit_min=torch.minimum(a.unit_min, b.unit_min),
        nonzero=a.nonzero.to(torch.float64) + b.nonzero.to(torch.float64),
        saturated=None if a.saturated is None or b.saturated is None else a.saturated + b.saturated,
    )


def _collapse(s: _Summary) -> _Summary:
    """The exact single-unit summary of a per-unit summary (all units have ``s.rows`` samples)."""
    units = s.mean.shape[0]
    mean = s.mean.mean().view(1)
    m2 = (s.m2.sum() + s.rows * (s.mean - mean).square().sum()).view(1)
    return _Summary(
        rows=s.rows * units,
        mean=mean,
        m2=m2,
        unit_max=s.unit_max.amax().view(1),
        unit_min=s.unit_min.amin().view(1),
        nonzero=s.nonzero,
        saturated=s.saturated,
    )


def _memo_key(x: torch.Tensor, axis: int | None, saturation: tuple[float, float] | None) -> Any:
    """What identifies one summary of ``x`` (:meth:`Scratch.recall`): the tensor, its version and the
    options; None for inference tensors, which have no version counter (not memoised)."""
    try:
        return (id(x), x._version, axis, saturation, tuple(x.shape), x.dtype)
    except RuntimeError:
        return None


# Summaries kept per accumulator before they are merged (bounds memory for long loops).
_MAX_PENDING = 16


class DeviceMoments:
    """Accumulates :class:`Moments` on the data's device without any host synchronisation.

    ``add`` reads the tensor once, in cache-sized float64 chunks (see the module docstring). Its
    summary is queued; queued summaries are merged exactly (Chan) when a statistic is read, so a
    module called once per probe never pays for a merge. Everything stays a tensor until
    :meth:`pack`.
    """

    def __init__(self, scratch: Scratch) -> None:
        self._scratch = scratch
        self.rows = 0
        self.calls = 0
        self._pending: list[_Summary] = []
        # True once the unit count changed between calls and the stream became a single unit.
        self.collapsed = False
        self.saturated: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None

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
        if (
            KERNEL is not None
            and axis is not None
            and not (self.collapsed or count_nonfinite or histogram)
            and x.is_contiguous()
            and _kernel_can_read(x)
            and self._add_contiguous(x, axis, saturation)
        ):
            return
        with torch.no_grad():
            self._add(x, axis, saturation, count_nonfinite, histogram)

    def _add_contiguous(self, x: torch.Tensor, axis: int, saturation: tuple[float, float] | None) -> bool:
        """The common case, a contiguous tensor the kernel reads, without building a view: (A, U, B)
        and the strides from the shape. False when it is not that case after all (nothing done)."""
        shape = x.shape
        if not shape:
            return False
        unit = axis % len(shape)
        u = shape[unit]
        if u == 0 or (self._pending and self._pending[0].units != u):
            return False
        a, b = math.prod(shape[:unit]), math.prod(shape[unit + 1 :])
        if a * b == 0:
            return False
        # [perf] the memo without a closure and a frame per call: this runs for every recorded
        # tensor, between two large operators, where each Python call costs several µs (caches cold)
        scratch = self._scratch
        key = _memo_key(x, axis, saturation)
        summary = None if key is None else scratch.recall(x, key)
        if summary is None:
            summary = _kernel_summary(x.data_ptr(), x.dtype, a, u, b, (u * b, b, 1), True, scratch, saturation)
            if key is not None:
                scratch.remember(x, key, summary)
        self._queue(summary, a * b, saturation)
        return True

    def _read_once(
        self, x: torch.Tensor, axis: int | None, saturation: tuple[float, float] | None, read: Callable[[], _Summary]
    ) -> _Summary:
        """``read()``, unless this very tensor (same object, same version, same options) was just
        summarised: then that summary (the scratch's memo)."""
        key = _memo_key(x, axis, saturation)
        if key is None:
            return read()
        summary = self._scratch.recall(x, key)
        if summary is None:
            summary = read()
            self._scratch.remember(x, key, summary)
        return summary

    def _queue(self, summary: _Summary, rows: int, saturation: tuple[float, float] | None) -> None:
        self._pending.append(summary)
        if len(self._pending) > _MAX_PENDING:
            self._merge()
        self.rows += rows
        if saturation is not None:
            assert summary.saturated is not None
            self.saturated = summary.saturated if self.saturated is None else self.saturated + summary.saturated
        self.calls += 1

    def _add(
        self,
        x: torch.Tensor,
        axis: int | None,
        saturation: tuple[float, float] | None,
        count_nonfinite: bool,
        histogram: bool,
    ) -> None:
        if self.collapsed:
            axis = None
        v = as_units(x.detach(), axis)
        a, u, b = v.shape
        if self._pending and self._pending[0].units != u:
            # One module, outputs with different numbers of units (torchvision's Bottleneck applies
            # one ReLU to 64- and 256-channel tensors): from now on the stream is one unit. The
            # merge to one unit is exact, so every global statistic stays exact.
            self.collapsed = True
            self._pending = [_collapse(s) for s in self._pending]
            self.rows = sum(s.rows for s in self._pending)
            axis = None
            v = as_units(x.detach(), None)
            a, u, b = v.shape
        rows = a * b
        if rows == 0 or u == 0:
            return
        summary = self._read_once(x, axis, saturation, lambda: _summarize(v, self._scratch, saturation))
        if count_nonfinite:
            bad = v.numel() - torch.count_nonzero(torch.isfinite(v))
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        if histogram:
            h = _histogram(v)
            self.hist = h if self.hist is None else self.hist + h
        self._queue(summary, rows, saturation)

    def _merge(self) -> _Summary | None:
        if not self._pending:
            return None
        merged = self._pending[0]
        for other in self._pending[1:]:
            merged = _merge_summaries(merged, other)
        self._pending = [merged]
        return merged

    # The accumulated per-unit tensors (None before the first ``add``).
    @property
    def mean(self) -> torch.Tensor | None:
        s = self._merge()
        return None if s is None else s.mean

    @property
    def m2(self) -> torch.Tensor | None:
        s = self._merge()
        return None if s is None else s.m2

    @property
    def unit_max(self) -> torch.Tensor | None:
        s = self._merge()
        return None if s is None else s.unit_max

    @property
    def unit_min(self) -> torch.Tensor | None:
        s = self._merge()
        return None if s is None else s.unit_min

    @property
    def zeros(self) -> torch.Tensor | None:
        s = self._merge()
        return None if s is None else s.zeros

    def pack(self) -> list[torch.Tensor]:
        """The accumulated tensors in a fixed order, for one batched host transfer: mean, M2, max,
        min, then the nonzero, saturated and non-finite counts (−1: not counted), and the histogram
        when there is one. Mixed dtypes: ``torch.cat`` promotes them all to float64 (exactly) in the
        one concatenation before the transfer, so nothing is converted here."""
        s = self._merge()
        assert s is not None
        if s.packed is not None and self.nonfinite is None and self.hist is None and self.calls == 1:
            return [s.packed]  # the kernel wrote this layout (saturated and non-finite −1 unless counted)
        absent = self._scratch.minus_one(s.mean.device)
        parts = [
            s.mean,
            s.m2,
            s.unit_max,
            s.unit_min,
            s.nonzero.view(1),
            absent if self.saturated is None else self.saturated.view(1),
            absent if self.nonfinite is None else self.nonfinite.view(1),
        ]
        if self.hist is not None:
            parts.append(self.hist)
        return parts

    @staticmethod
    def unpack(parts: list[np.ndarray], rows: int, calls: int) -> Moments:
        if len(parts) == 1:  # the packed layout in one piece (the kernel's output)
            flat = parts[0]
            u = (flat.shape[0] - 3) // 4
            parts = [flat[k * u : (k + 1) * u] for k in range(4)] + [flat[4 * u + k : 4 * u + k + 1] for k in range(3)]
            all_finite = bool(np.isfinite(flat[: 2 * u]).all())  # mean and M2 side by side: one check
        else:
            all_finite = False
        mean, m2, unit_max, unit_min, nonzero, saturated_, nonfinite_ = parts[:7]
        hist = parts[7].astype(np.int64) if len(parts) > 7 else None
        if all_finite:
            nonfinite_units = 0
        else:
            finite = np.isfinite(mean) & np.isfinite(m2)
            nonfinite_units = int((~finite).sum())
        zeros = rows * mean.shape[0] - int(nonzero[0])
        saturated, nonfinite = int(saturated_[0]), int(nonfinite_[0])
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
        return not self._pending


def sum_and_square_sum(x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``[Σx, Σx²]`` over all elements of ``x`` as a float64 tensor on its device (no host sync).

    Exact float64 accumulation of the (exactly representable) values, in cache-sized chunks: one
    read of ``x`` (a float64 reduction straight from float32 is several times slower on CPU).
    """
    return _sums(x, scratch, with_sum=True)


def square_sum(x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``Σx²`` over all elements of ``x`` as a 0-d float64 tensor on its device (no host sync)."""
    return _sums(x, scratch, with_sum=False)[0]


@torch.no_grad()
def sums_of(tensors: Sequence[torch.Tensor], scratch: Scratch) -> torch.Tensor:
    """``[Σx, Σx²]`` of each tensor, as a ``(k, 2)`` float64 tensor (no host sync).

    A model's parameters or their gradients: one C kernel call for all of them when the kernel reads
    every one (contiguous float32/float64 in host memory), instead of ~20 µs of Python per tensor
    (a transformer has hundreds); else :func:`sum_and_square_sum` per tensor (DTensor shards summed
    over their mesh), stacked on the first tensor's device.
    """
    return sums_and_row_sums(tensors, (0,) * len(tensors), scratch)[0]


@torch.no_grad()
def sums_and_row_sums(
    tensors: Sequence[torch.Tensor], rows: Sequence[int], scratch: Scratch
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """:func:`sums_of`, and the float64 Σx of every row of the tensors with ``rows[k] > 0`` values per
    row, in the same one read (one kernel call for all of them).

    The row sums are the weights' unit fingerprints for :mod:`gradprobe.diagnose.grouping`: each row
    is summed on its own from its first value, so identical rows get equal sums wherever they lie
    (−0.0 and +0.0 may give sums of either sign of zero, equal under ``==``). The row sums are all
    None when the kernel cannot read every tensor; the totals of a tensor read by rows are its rows'
    sums added in order (other bits than without rows)."""
    if len(rows) != len(tensors):
        raise ValueError(f"rows: one row length per tensor, got {len(rows)} for {len(tensors)} tensors")
    if KERNEL is None or not all(_kernel_can_read(t) and t.is_contiguous() for t in tensors):
        if not tensors:
            return torch.zeros(0, 2, dtype=torch.float64), []
        sums = [_sums(t, scratch, with_sum=True) for t in tensors]
        device = sums[0].device
        return torch.stack([r if r.device == device else r.to(device) for r in sums]), [None] * len(tensors)
    lengths = [r if r > 0 and t.numel() % r == 0 else 0 for t, r in zip(tensors, rows)]
    counts = [t.numel() // r if r else 0 for t, r in zip(tensors, lengths)]
    total = sum(counts)
    row_sums = torch.empty(total, dtype=torch.float64) if total else None
    out = torch.empty(len(tensors), 2, dtype=torch.float64)
    items: list[tuple[int, ...]] = []
    views: list[torch.Tensor | None] = []
    start = 0
    for t, r, n in zip(tensors, lengths, counts):
        if n:
            assert row_sums is not None
            items.append((t.data_ptr(), _KERNEL_DTYPES[t.dtype], t.numel(), r, row_sums.data_ptr() + 8 * start))
            views.append(row_sums[start : start + n])
            start += n
        else:
            items.append((t.data_ptr(), _KERNEL_DTYPES[t.dtype], t.numel()))
            views.append(torch.zeros(0, dtype=torch.float64) if r else None)
    KERNEL.square_sums_many(items, out.data_ptr(), torch.get_num_threads())
    return out, views


@torch.no_grad()
def _sums(x: torch.Tensor, scratch: Scratch, *, with_sum: bool) -> torch.Tensor:
    groups: list[Any] = []
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        # a DTensor shard (FSDP2): sum the local piece, then add the pieces over the sharded mesh dims
        from gradprobe.distributed import shard_groups

        x, groups = shard_groups(x.detach())
    sums = _local_sums(x, scratch, with_sum=with_sum)
    for group in groups:
        torch.distributed.all_reduce(sums, group=group)
    return sums


def _local_sums(x: torch.Tensor, scratch: Scratch, *, with_sum: bool) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    n = flat.numel()
    device = flat.device
    if KERNEL is not None and _kernel_can_read(flat) and flat.is_contiguous():
        out = torch.empty(2, dtype=torch.float64)
        KERNEL.square_sums(flat.data_ptr(), _KERNEL_DTYPES[flat.dtype], n, out.data_ptr())
        return out if with_sum else out[1:]
    step = scratch.chunk_elements
    if n == 0:
        return torch.zeros(2 if with_sum else 1, dtype=torch.float64, device=device)
    buf = scratch.get(device, min(n, step))
    parts: list[torch.Tensor] = []
    for start in range(0, n, step):
        chunk = flat if step >= n else flat[start : start + step]
        b = buf if chunk.numel() == buf.numel() else buf[: chunk.numel()]
        b.copy_(chunk)
        if with_sum:
            parts.append(b.sum())
        parts.append(torch.dot(b, b))
    sums = torch.stack(parts)
    if with_sum:
        return sums.view(-1, 2).sum(dim=0)
    return sums.sum().view(1)
