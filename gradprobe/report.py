"""The probe's result as plain data: layers in execution order, their statistics, and run metadata.

A :class:`Report` is what every other part of gradprobe reads: diagnosis rules, renderers, the CLI and
the CI gate. It holds no tensors and no reference to the model. ``to_dict``/``to_json`` and
``Report.from_json`` round-trip exactly; non-finite floats are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` so that the JSON stays strict.

JSON fields named in the public contract (users' CI scripts read them): ``schema``,
``layers[].name``, ``layers[].type``, ``layers[].act_var``, ``layers[].grad_var`` (null where the
layer got no gradient), ``findings[]`` (``code``, ``severity``, ``layers``, ``message``,
``suggestion``, ``evidence``) and ``verdict``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradprobe.stats import Moments

__all__ = [
    "SCHEMA_VERSION",
    "TensorStats",
    "ParamRecord",
    "LayerRecord",
    "Report",
    "encode_float",
    "decode_float",
]

SCHEMA_VERSION = "gradprobe.report/1"


def encode_float(x: float | None) -> float | str | None:
    """A float for strict JSON: non-finite values become "nan", "inf" or "-inf"."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    return float(x)


def _enc_tree(obj: Any) -> Any:
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {k: _enc_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_enc_tree(v) for v in obj]
    return obj


def _median(values: np.ndarray, finite: bool = False) -> float:
    """``np.median`` (NaN if any value is NaN or there is none), without its dispatch overhead.
    ``finite``: the caller knows every value is finite (skips the NaN check and numpy's errstate).

    For an even count, one partition at ``n/2`` and the maximum of the lower half: the same two
    order statistics as ``np.partition(values, [n/2 - 1, n/2])``, several times faster (numpy's
    vectorised selection takes one ``kth`` only). :func:`_medians` is this, row by row."""
    n = values.shape[0]
    if n == 0 or (not finite and np.isnan(values).any()):
        return math.nan
    if n == 1:
        return float(values[0])
    half = n // 2
    part = np.partition(values, half)
    if n % 2:
        return float(part[half])
    low, high = part[:half].max(), part[half]
    if finite:
        return float((low + high) / 2)
    with np.errstate(invalid="ignore"):  # -inf and +inf: NaN, as np.median gives
        return float((low + high) / 2)


def _medians(values: np.ndarray) -> np.ndarray:
    """:func:`_median` of each row of a 2-D array of finite values (bit-equal to it row by row)."""
    n = values.shape[1]
    if n == 1:
        return values[:, 0]
    half = n // 2
    part = np.partition(values, half, axis=1)
    if n % 2:
        return part[:, half]
    return (part[:, :half].max(axis=1) + part[:, half]) / 2


@dataclass
class TensorStats:
    """Summary of every tensor one module produced (activation) or received (gradient).

    All statistics are over every element the module produced across calls and batches; ``var`` is
    the population variance (divide by the count). ``energy`` is the per-sample energy
    ``E[x²]·(elements per sample)``, the depth metric that survives shape changes (flatten, pooling,
    heads). ``dead_units`` counts units whose maximum over everything seen is ≤ 0 (only meaningful
    after a ReLU-family activation; the diagnosis decides where it applies).
    """

    count: int
    mean: float
    var: float
    rms: float
    min: float
    max: float
    zero_fraction: float
    nonfinite: int | None
    units: int
    unit_var_min: float
    unit_var_median: float
    unit_var_max: float
    dead_units: int
    saturated_fraction: float | None
    energy: float
    moments: Moments

    @classmethod
    def from_moments(cls, m: Moments, elements_per_sample: int) -> TensorStats:
        # ndarray methods rather than np.* wrappers: a report has hundreds of layers
        mean, var = m.global_mean_var()
        unit_var = m.unit_var()
        second = var + mean * mean
        count = m.count
        units = m.units
        return cls(
            count=count,
            mean=mean,
            var=var,
            rms=math.sqrt(second) if second >= 0 else math.nan,
            min=float(m.unit_min.min()) if units else math.nan,
            max=float(m.unit_max.max()) if units else math.nan,
            zero_fraction=m.zeros / count if count else math.nan,
            nonfinite=m.nonfinite,
            units=units,
            unit_var_min=float(unit_var.min()) if units else math.nan,
            # finite M2 and rows > 0: every unit variance is finite
            unit_var_median=_median(unit_var, finite=m.nonfinite_units == 0 and m.rows > 0),
            unit_var_max=float(unit_var.max()) if units else math.nan,
            dead_units=int(np.count_nonzero(m.unit_max <= 0)),
            saturated_fraction=None if m.saturated is None else m.saturated / count,
            energy=second * elements_per_sample,
            moments=m,
        )

    @classmethod
    def from_packed(
        cls, flat: np.ndarray, entries: list[tuple[int, int, int, int, int]]
    ) -> list[TensorStats | None]:
        """:meth:`from_moments` for many summaries at once, each in the kernel's packed layout inside
        ``flat`` (``mean[u], M2[u], max[u], min[u], nonzero, saturated, −1`` at ``offset``; also what
        :meth:`DeviceMoments.pack` concatenates without a histogram): the summaries with the same
        unit count are one 2-D array (a view of ``flat`` when they are evenly spaced in it, as
        summaries of equal width one after another are), and every statistic is one numpy call
        along its rows, instead of ~15 small numpy calls per tensor (a transformer records ~400).

        ``entries``: ``(offset, units, rows, calls, elements_per_sample)``. M2 is clamped to ≥ 0 (as
        :meth:`DeviceMoments.unpack` does), in ``flat`` itself where the summaries are views of it.
        An entry whose means or M2 sum to a non-finite value (any NaN or inf among them, or an
        overflow), or with no units or rows, gives None: the caller takes :meth:`from_moments` for
        it. Bit-equal to :meth:`from_moments` (``tests/test_stats.py``), so that a report read back
        from JSON is the same report: every sum is numpy's pairwise sum along one row, which is the
        1-D sum of that row.
        """
        results: list[TensorStats | None] = [None] * len(entries)
        by_units: dict[int, list[int]] = {}
        for k, entry in enumerate(entries):
            if entry[1] > 0 and entry[2] > 0:
                by_units.setdefault(entry[1], []).append(k)
        for u, ks in by_units.items():
            cls._from_packed_rows(flat, entries, u, ks, results)
        return results

    @classmethod
    def _from_packed_rows(
        cls,
        flat: np.ndarray,
        entries: list[tuple[int, int, int, int, int]],
        u: int,
        ks: list[int],
        results: list[TensorStats | None],
    ) -> None:
        """:meth:`from_packed` for the entries ``ks``, which all have ``u`` units."""
        offsets = [entries[k][0] for k in ks]
        width = 4 * u + 2  # mean, M2, max, min, nonzero, saturated
        if min(offsets) < 0 or max(offsets) + width > flat.shape[0]:
            raise ValueError(f"a packed summary of {u} units lies outside the {flat.shape[0]} values")
        step = offsets[1] - offsets[0] if len(offsets) > 1 else width
        if step >= width and all(b - a == step for a, b in zip(offsets, offsets[1:])):
            # evenly spaced (the usual case): rows of a view, no copy
            item = flat.strides[0]
            block = np.lib.stride_tricks.as_strided(
                flat[offsets[0] :], shape=(len(offsets), width), strides=(step * item, item)
            )
        else:
            block = np.stack([flat[o : o + width] for o in offsets])
        means, m2 = block[:, :u], block[:, u : 2 * u]
        maxima, minima = block[:, 2 * u : 3 * u], block[:, 3 * u : 4 * u]
        n_rows = [entries[k][2] for k in ks]
        rows = np.array(n_rows, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # entries with inf/NaN are dropped below
            np.maximum(m2, 0.0, out=m2)
            # the arithmetic of Moments.global_mean_var, signal_var and _median, row by row
            mean = means.sum(axis=1) / u
            d = means - mean[:, None]
            np.multiply(d, d, out=d)
            m2_sum = m2.sum(axis=1)
            var = (m2_sum + rows * d.sum(axis=1)) / np.array([r * u for r in n_rows], dtype=np.float64)
            unit_var = m2 / rows[:, None]
            # a NaN or an inf among an entry's means or M2 makes their sum NaN or inf
            ok = (np.isfinite(mean) & np.isfinite(m2_sum)).tolist()
            low, high = minima.min(axis=1).tolist(), maxima.max(axis=1).tolist()
            var_min, var_max = unit_var.min(axis=1).tolist(), unit_var.max(axis=1).tolist()
            var_median = _medians(unit_var).tolist()
            signal = (unit_var.sum(axis=1) / u).tolist()  # as np.mean, which is sum / count
            dead = np.count_nonzero(maxima <= 0, axis=1).tolist()
        nonzero, saturated = block[:, 4 * u].tolist(), block[:, 4 * u + 1].tolist()
        means_of, vars_of = mean.tolist(), var.tolist()
        u2, u3, u4 = 2 * u, 3 * u, 4 * u
        for j, row in enumerate(block):
            if not ok[j]:
                continue
            k = ks[j]
            _, _, n, calls, eps = entries[k]
            count = n * u
            zeros = count - int(nonzero[j])
            sat = int(saturated[j])
            m, var_j = means_of[j], vars_of[j]
            second = var_j + m * m
            # positional, in the order of the fields (keywords cost ~1.5 µs more per object, and a
            # transformer has ~400 of each; tests/test_stats.py checks the order)
            stats = cls(
                count,
                m,  # mean
                var_j,
                math.sqrt(second) if second >= 0 else math.nan,  # rms
                low[j],  # min
                high[j],  # max
                zeros / count,  # zero_fraction
                0,  # nonfinite
                u,  # units
                var_min[j],
                var_median[j],
                var_max[j],
                dead[j],  # dead_units
                None if sat < 0 else sat / count,  # saturated_fraction
                second * eps,  # energy
                Moments(
                    n,  # rows
                    row[:u],  # mean
                    row[u:u2],  # m2
                    row[u2:u3],  # unit_max
                    row[u3:u4],  # unit_min
                    zeros,
                    None if sat < 0 else sat,  # saturated
                    0,  # nonfinite_units
                    0,  # nonfinite
                    calls,
                ),
            )
            stats.__dict__["signal_var"] = signal[j]
            results[k] = stats

    @functools.cached_property
    def signal_var(self) -> float:
        """Mean over units of each unit's own variance: the between-sample signal, without the
        per-unit offsets (a bias, a constant) that carry no information about the input.
        (Computed once: the diagnosis reads it hundreds of times.)"""
        return float(np.mean(self.moments.unit_var())) if self.units else math.nan

    def to_dict(self, include_moments: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "count",
                "mean",
                "var",
                "rms",
                "min",
                "max",
                "zero_fraction",
                "nonfinite",
                "units",
                "unit_var_min",
                "unit_var_median",
                "unit_var_max",
                "dead_units",
                "saturated_fraction",
                "energy",
                "signal_var",
            )
        }
        d = _enc_tree(d)
        if include_moments:
            d["moments"] = _enc_tree(self.moments.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], elements_per_sample: int) -> TensorStats:
        if "moments" in d:
            return cls.from_moments(Moments.from_dict(d["moments"]), elements_per_sample)
        raise ValueError("cannot rebuild TensorStats without its moments")


@dataclass
class ParamRecord:
    """One parameter owned directly by a module, as initialised for the probe, and its gradient.

    ``grad_rms`` is the root mean square of the gradient, averaged over batches (each batch's
    gradient is taken on its own); ``grad_to_weight`` is ‖∇W‖/‖W‖ with the same averaging.
    ``grad_sq_sum`` (sum over batches of ‖∇W‖²) and ``batches`` are kept so reports merge exactly.
    """

    name: str
    shape: list[int]
    numel: int
    requires_grad: bool
    mean: float
    var: float
    rms: float
    fan_in: int | None
    fan_out: int | None
    grad_sq_sum: float | None
    batches: int

    @property
    def grad_rms(self) -> float | None:
        if self.grad_sq_sum is None or not self.batches or not self.numel:
            return None
        return math.sqrt(self.grad_sq_sum / self.batches / self.numel)

    @property
    def grad_to_weight(self) -> float | None:
        g = self.grad_rms
        if g is None:
            return None
        return g / self.rms if self.rms > 0 else (math.inf if g > 0 else math.nan)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "shape": self.shape,
            "numel": self.numel,
            "requires_grad": self.requires_grad,
            "mean": self.mean,
            "var": self.var,
            "rms": self.rms,
            "fan_in": self.fan_in,
            "fan_out": self.fan_out,
            "grad_rms": self.grad_rms,
            "grad_to_weight": self.grad_to_weight,
            "grad_sq_sum": self.grad_sq_sum,
            "batches": self.batches,
        }
        return _enc_tree(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamRecord:
        return cls(
            name=d["name"],
            shape=list(d["shape"]),
            numel=int(d["numel"]),
            requires_grad=bool(d["requires_grad"]),
            mean=decode_float(d["mean"]),  # type: ignore[arg-type]
            var=decode_float(d["var"]),  # type: ignore[arg-type]
            rms=decode_float(d["rms"]),  # type: ignore[arg-type]
            fan_in=d["fan_in"],
            fan_out=d["fan_out"],
            grad_sq_sum=decode_float(d["grad_sq_sum"]),
            batches=int(d["batches"]),
        )


@dataclass
class LayerRecord:
    """One probed module, in execution order (the order of its first call).

    Attributes:
        name: qualified module name (``"layer3.1.conv2"``; the root module is ``"model"``).
        type: the module's class name.
        index: position in execution order.
        calls: forward calls merged (a shared module or an RNN loop is called several times).
        output_shape: shape of the first recorded output.
        unit_axis: the axis holding units (channels/features), None for one unit.
        activation: the pointwise nonlinearity found to follow this layer at run time (``"relu"``,
            ``"tanh"``, …), None when none was detected; ``activation_param`` its parameter.
        gain: the gain an auto-gain initializer used for this layer.
        initializer: what initialised this module's own parameters (``"kaiming_normal(...)"``,
            ``"kept as built"``), None for parameter-free modules.
        act, grad: statistics of the outputs and of the gradients with respect to the outputs.
        grad_var, act_var: shortcuts (public JSON fields).
        outputs_skipped: calls whose output was not a floating tensor (not recorded).
        grad_missing: recorded calls whose output did not require grad (no gradient statistics).
        predicted_act_var, predicted_grad_var: the mean-field prediction of ``act.var`` and
            ``grad.var`` for this layer (:mod:`gradprobe.theory`), None where no prediction applies.
        extra: analysis attached after the run (symmetry groups, the gate check, seeds, …).
    """

    name: str
    type: str
    index: int
    calls: int
    output_shape: list[int]
    unit_axis: int | None
    elements_per_sample: int
    activation: str | None = None
    activation_param: float | None = None
    gain: float | None = None
    initializer: str | None = None
    act: TensorStats | None = None
    grad: TensorStats | None = None
    params: list[ParamRecord] = field(default_factory=list)
    outputs_skipped: int = 0
    grad_missing: int = 0
    predicted_act_var: float | None = None
    predicted_grad_var: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def act_var(self) -> float | None:
        return None if self.act is None else self.act.var

    @property
    def grad_var(self) -> float | None:
        return None if self.grad is None else self.grad.var

    def param(self, name: str) -> ParamRecord | None:
        return next((p for p in self.params if p.name == name), None)

    def to_dict(self, include_moments: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "index": self.index,
            "calls": self.calls,
            "output_shape": self.output_shape,
            "unit_axis": self.unit_axis,
            "elements_per_sample": self.elements_per_sample,
            "activation": self.activation,
            "activation_param": self.activation_param,
            "gain": encode_float(self.gain),
            "initializer": self.initializer,
            "act_var": encode_float(self.act_var),
            "grad_var": encode_float(self.grad_var),
            "act": None if self.act is None else self.act.to_dict(include_moments),
            "grad": None if self.grad is None else self.grad.to_dict(include_moments),
            "params": [p.to_dict() for p in self.params],
            "outputs_skipped": self.outputs_skipped,
            "grad_missing": self.grad_missing,
            "predicted_act_var": encode_float(self.predicted_act_var),
            "predicted_grad_var": encode_float(self.predicted_grad_var),
            "extra": _enc_tree(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        eps = int(d["elements_per_sample"])
        return cls(
            name=d["name"],
            type=d["type"],
            index=int(d["index"]),
            calls=int(d["calls"]),
            output_shape=list(d["output_shape"]),
            unit_axis=d["unit_axis"],
            elements_per_sample=eps,
            activation=d["activation"],
            activation_param=d["activation_param"],
            gain=decode_float(d["gain"]),
            initializer=d["initializer"],
            act=None if d["act"] is None else TensorStats.from_dict(d["act"], eps),
            grad=None if d["grad"] is None else TensorStats.from_dict(d["grad"], eps),
            params=[ParamRecord.from_dict(p) for p in d["params"]],
            outputs_skipped=int(d["outputs_skipped"]),
            grad_missing=int(d["grad_missing"]),
            predicted_act_var=decode_float(d.get("predicted_act_var")),
            predicted_grad_var=decode_float(d.get("predicted_grad_var")),
            extra=_dec_tree(d.get("extra", {})),
        )

    def merge(self, other: LayerRecord) -> LayerRecord:
        """Exact merge with the same module's record from another process or batch set."""

        def both(a: TensorStats | None, b: TensorStats | None) -> TensorStats | None:
            if a is None:
                return b
            if b is None:
                return a
            return TensorStats.from_moments(a.moments.merge(b.moments), self.elements_per_sample)

        params = []
        for p in self.params:
            q = other.param(p.name)
            if q is None:
                params.append(p)
                continue
            gsq = None if p.grad_sq_sum is None or q.grad_sq_sum is None else p.grad_sq_sum + q.grad_sq_sum
            params.append(ParamRecord(**{**p.__dict__, "grad_sq_sum": gsq, "batches": p.batches + q.batches}))
        return LayerRecord(
            **{
                **self.__dict__,
                "calls": self.calls + other.calls,
                "act": both(self.act, other.act),
                "grad": both(self.grad, other.grad),
                "params": params,
                "outputs_skipped": self.outputs_skipped + other.outputs_skipped,
                "grad_missing": self.grad_missing + other.grad_missing,
            }
        )


def _dec_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _dec_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_dec_tree(v) for v in obj]
    if obj in ("nan", "inf", "-inf"):
        return float(obj)
    return obj


@dataclass
class Report:
    """Everything one probe measured, as plain data.

    ``meta`` holds the run metadata (gradprobe and torch versions, device, dtypes, seed, init,
    loss, batch size, batches, mode, and counts of what was skipped). ``findings`` and ``verdict``
    are filled by :func:`gradprobe.diagnose`.
    """

    layers: list[LayerRecord]
    meta: dict[str, Any]
    findings: list[Any] = field(default_factory=list)
    verdict: str | None = None
    schema: str = SCHEMA_VERSION

    def __getitem__(self, name: str) -> LayerRecord:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(x.name for x in self.layers[:10])}…")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def errors(self) -> list[Any]:
        return [f for f in self.findings if f.severity == "error"]

    # -- display: renderers are pure functions of the report, imported only when used ------------
    def __rich_console__(self, console: Any, options: Any) -> Any:
        from gradprobe.render.console import render_report

        yield render_report(self, width=options.max_width)

    def _repr_html_(self) -> str:
        from gradprobe.render.html import render_html

        return render_html(self)

    def plot(self, **kwargs: Any) -> Any:
        """Depth profile of activation and gradient variance (a matplotlib Figure with ``save``)."""
        from gradprobe.render.plots import plot_report

        return plot_report(self, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Report({self.meta.get('model', '?')}, init={self.meta.get('init')!r}, "
            f"layers={len(self.layers)}, verdict={self.verdict!r}, findings={len(self.findings)})"
        )

    def to_dict(self, include_moments: bool = True) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "meta": _enc_tree(self.meta),
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [layer.to_dict(include_moments) for layer in self.layers],
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        schema = d.get("schema", "")
        if not str(schema).startswith("gradprobe.report/"):
            from gradprobe.errors import UsageError

            raise UsageError(f"not a gradprobe report (schema {schema!r}, expected {SCHEMA_VERSION!r})")
        from gradprobe.diagnose.finding import Finding

        return cls(
            layers=[LayerRecord.from_dict(x) for x in d["layers"]],
            meta=_dec_tree(d["meta"]),
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            verdict=d.get("verdict"),
            schema=schema,
        )

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Report:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

    def merge(self, other: Report) -> Report:
        """Exact merge of two reports of the same model (e.g. two ranks, or two batch sets)."""
        names = [x.name for x in self.layers]
        if names != [x.name for x in other.layers]:
            raise ValueError("reports cover different layers; merge reports of the same model and init")
        meta = dict(self.meta)
        for key in ("batch_size", "batches", "samples"):
            if key in meta and key in other.meta:
                meta[key] = meta[key] + other.meta[key]
        return Report(layers=[a.merge(b) for a, b in zip(self.layers, other.layers)], meta=meta)
