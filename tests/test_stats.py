"""Streaming moments against direct float64 computation, and the exact merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradprobe.stats import DeviceMoments, Moments, Scratch, as_units, chan_merge

# every test here runs on both statistics paths (the C kernel and the PyTorch operations)
pytestmark = pytest.mark.usefixtures("stats_path")


def _moments(*tensors: torch.Tensor, axis: int | None) -> Moments:
    acc = DeviceMoments(Scratch())
    for t in tensors:
        acc.add(t, axis)
    parts = [p.detach().cpu().double().numpy().reshape(-1) for p in acc.pack()]
    return DeviceMoments.unpack(parts, acc.rows, acc.calls)


def _direct(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    v = as_units(x.double(), axis)
    return v.mean(dim=(0, 2)), v.var(dim=(0, 2), unbiased=False)


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((257, 33), 1),
        ((8, 16, 9, 7), 1),
        ((4, 12, 20), 2),
        ((4, 12, 20), 1),
        ((50,), None),
        ((3, 5, 2, 2, 2), 1),
    ],
)
def test_per_unit_and_global_match_direct_float64(shape: tuple[int, ...], axis: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    x[x.abs() < 0.05] = 0.0
    m = _moments(x, axis=axis)
    mean, var = _direct(x, axis)
    np.testing.assert_allclose(m.mean, mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.unit_var(), var.numpy(), rtol=1e-10)
    gm, gv = m.global_mean_var()
    assert gm == pytest.approx(x.double().mean().item(), rel=1e-12, abs=1e-14)
    assert gv == pytest.approx(x.double().var(unbiased=False).item(), rel=1e-12)
    assert m.zeros == int((x == 0).sum())
    assert m.unit_max.max() == x.max().item() and m.unit_min.min() == x.min().item()


def test_large_mean_small_spread_is_exact() -> None:
    """float32 sum/sum-of-squares loses every digit here (REFERENCE: mean 1e4, std 1)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4096, 64, generator=g) + 1e4).float()
    m = _moments(x, axis=1)
    _, direct = _direct(x, 1)
    np.testing.assert_allclose(m.unit_var(), direct.numpy(), rtol=1e-9)
    # the naive float32 formula is far off, so this test can tell the difference
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert (naive.double() - direct).abs().max() > 0.1


def test_streaming_over_batches_equals_concatenation_and_merge_is_exact() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 4, 6, 6, generator=g) * (i + 1) + i for i, n in enumerate((3, 17, 8))]
    streamed = _moments(*batches, axis=1)
    whole = _moments(torch.cat(batches), axis=1)
    np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.m2, whole.m2, rtol=1e-11)
    assert streamed.calls == 3 and whole.calls == 1
    # host-side merge of separately accumulated halves (as across processes)
    a, b = _moments(*batches[:2], axis=1), _moments(batches[2], axis=1)
    merged = a.merge(b)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-11)
    assert merged.rows == whole.rows and merged.zeros == whole.zeros


def test_chunking_path_is_exercised_and_exact() -> None:
    # more than the 2 Mi-element scratch: several chunks along the first axis
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 64, 40, 40, generator=g)
    m = _moments(x, axis=1)
    mean, var = _direct(x, 1)
    np.testing.assert_allclose(m.unit_var(), var.numpy(), rtol=1e-10)
    np.testing.assert_allclose(m.mean, mean.numpy(), atol=1e-12)


def test_bfloat16_input_statistics_are_float64_accurate() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 32, generator=g).to(torch.bfloat16)
    m = _moments(x, axis=1)
    mean, var = _direct(x.double(), 1)  # the exact statistics of the bf16 values
    np.testing.assert_allclose(m.unit_var(), var.numpy(), rtol=1e-10)


def test_nonfinite_is_flagged_and_counted_when_asked() -> None:
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    x[5, 7] = float("inf")
    m = _moments(x, axis=1)
    assert m.nonfinite_units == 2 and m.nonfinite is None  # flagged, not yet counted
    acc = DeviceMoments(Scratch())
    acc.add(x, 1, count_nonfinite=True)
    parts = [p.double().numpy().reshape(-1) for p in acc.pack()]
    assert DeviceMoments.unpack(parts, acc.rows, acc.calls).nonfinite == 2
    clean = _moments(torch.randn(16, 8), axis=1)
    assert clean.nonfinite == 0 and clean.nonfinite_units == 0


def test_saturation_count() -> None:
    y = torch.tensor([[0.0, 0.5, 0.96, -0.99], [0.1, -0.2, 0.3, 0.95]])
    acc = DeviceMoments(Scratch())
    acc.add(y, 1, saturation=(0.0, 0.9486832980505138))  # tanh, φ′ < 0.1
    parts = [p.double().numpy().reshape(-1) for p in acc.pack()]
    assert DeviceMoments.unpack(parts, acc.rows, acc.calls).saturated == 3


def test_chan_merge_scalar_and_array_forms_agree() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=100), rng.normal(3, 2, size=50)
    n, mean, m2 = chan_merge(100, a.mean(), a.var() * 100, 50, b.mean(), b.var() * 50)
    both = np.concatenate([a, b])
    assert n == 150 and mean == pytest.approx(both.mean(), rel=1e-14)
    assert m2 / n == pytest.approx(both.var(), rel=1e-13)


def test_moments_json_round_trip_is_exact() -> None:
    m = _moments(torch.randn(32, 5), axis=1)
    back = Moments.from_dict(m.to_dict())
    np.testing.assert_array_equal(back.mean, m.mean)
    np.testing.assert_array_equal(back.m2, m.m2)
    assert back.rows == m.rows and back.calls == m.calls


def test_histogram_bins_match_direct_binning() -> None:
    from gradprobe.stats import HIST_BINS, HIST_EDGES

    x = torch.tensor([[0.0, 1e-13, -1e-13, 1.0, -1.0, 0.5, 3e5, -2e-3, float("nan"), 1e20]])
    acc = DeviceMoments(Scratch())
    acc.add(x, None, histogram=True)
    hist = DeviceMoments.unpack([p.double().numpy().reshape(-1) for p in acc.pack()], acc.rows, acc.calls).histogram
    assert hist is not None and hist.shape == (HIST_BINS,) and hist.sum() == 9  # NaN not counted
    side = (HIST_BINS - 1) // 2
    assert hist[side] == 3  # exact zero and the two |x| < 1e-12

    def pos_bin(v: float) -> int:
        return side + 1 + int(np.searchsorted(HIST_EDGES, v, side="right") - 1)

    assert hist[pos_bin(1.0)] == 1 and hist[pos_bin(0.5)] == 1 and hist[pos_bin(3e5)] == 1
    assert hist[HIST_BINS - 1] == 1  # 1e20 lands in the outermost positive bin
    k = int(np.searchsorted(HIST_EDGES, 2e-3, side="right") - 1)
    assert (
        hist[side - 1 - k] == 1
        and hist[side - 1 - int(np.searchsorted(HIST_EDGES, 1.0, side="right") - 1)] == 1
    )


def test_batched_report_statistics_equal_the_per_tensor_ones() -> None:
    """TensorStats.from_packed (every recorded tensor of a probe at once) against from_moments per
    tensor: every field, on summaries with saturation counts, dead units, one unit, a 1e4 offset,
    zeros; a summary holding NaN or inf is handed back (None) for the per-tensor path."""
    from gradprobe.report import TensorStats

    gen = torch.Generator().manual_seed(3)
    relu = torch.relu(torch.randn(64, 40, generator=gen))
    relu[:, :5] = 0.0  # dead units
    cases = [
        (relu, 1, None),
        (torch.tanh(3 * torch.randn(32, 24, 5, generator=gen)), 1, (0.0, 0.9486832980505138)),
        (1e4 + torch.randn(100, 7, generator=gen), 1, None),
        (torch.randn(50, generator=gen), None, None),
        (torch.randn(9, 3, 4, generator=gen), 1, None),
    ]
    nan = torch.randn(16, 8, generator=gen)
    nan[2, 3] = float("nan")
    inf = torch.randn(16, 8, generator=gen)
    inf[1, 1] = float("inf")
    cases += [(nan, 1, None), (inf, 1, None)]
    parts, entries, expected = [], [], []
    offset = 0
    for x, axis, saturation in cases:
        acc = DeviceMoments(Scratch())
        acc.add(x, axis, saturation)
        flat = np.concatenate([p.detach().double().numpy().reshape(-1) for p in acc.pack()])
        eps = max(1, x.numel() // x.shape[0])
        expected.append(TensorStats.from_moments(DeviceMoments.unpack([flat.copy()], acc.rows, acc.calls), eps))
        entries.append((offset, (flat.shape[0] - 3) // 4, acc.rows, acc.calls, eps))
        parts.append(flat)
        offset += flat.shape[0]
    built = TensorStats.from_packed(np.concatenate(parts), entries)
    assert built[-2] is None and built[-1] is None  # non-finite: the per-tensor path
    assert all(b is not None for b in built[:-2])
    fields = [f for f in TensorStats.__dataclass_fields__ if f != "moments"] + ["signal_var"]
    for b, e in zip(built[:-2], expected):
        for f in fields:
            got, want = getattr(b, f), getattr(e, f)
            if isinstance(want, float):
                assert got == want or (math.isnan(got) and math.isnan(want)), f  # bit-equal: JSON round trip
            else:
                assert got == want, f
        for f in ("rows", "zeros", "saturated", "nonfinite_units", "nonfinite", "calls"):
            assert getattr(b.moments, f) == getattr(e.moments, f), f
        for f in ("mean", "m2", "unit_max", "unit_min"):
            np.testing.assert_array_equal(getattr(b.moments, f), getattr(e.moments, f))
    assert expected[0].dead_units >= 5 and expected[1].saturated_fraction > 0


def _bits(x: object) -> object:
    """A float's exact bits (every NaN alike), anything else as it is."""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else np.float64(x).tobytes()
    return x


def _packed_summary(rng: np.random.Generator, u: int, rows: int, kind: str) -> np.ndarray:
    """One summary in the kernel's packed layout (mean, M2, max, min, nonzero, saturated, −1)."""
    offset = float(rng.choice([0.0, 1e4, -3.0, 1e-6]))
    mean = offset + rng.standard_normal(u) * float(rng.choice([1.0, 1e-3, 50.0]))
    m2 = rows * rng.random(u) ** 3 * float(rng.choice([1.0, 1e-8, 1e6]))
    m2[rng.random(u) < 0.2] = 0.0  # constant units
    m2[rng.random(u) < 0.05] = -1e-18  # rounding below zero: clamped
    spread = np.sqrt(np.maximum(m2, 0.0) / rows) * 3
    unit_max, unit_min = mean + spread, mean - spread
    unit_max[rng.random(u) < 0.2] = -0.5  # dead units
    nonzero = float(rng.integers(0, rows * u + 1))
    saturated = -1.0 if rng.random() < 0.5 else float(rng.integers(0, rows * u + 1))
    if kind == "nan":
        mean[rng.integers(u)] = math.nan
    elif kind == "inf":
        m2[rng.integers(u)] = math.inf
    elif kind == "-inf":
        mean[rng.integers(u)] = -math.inf
    elif kind == "overflow":  # every value finite, their sum not
        mean[:] = 1.5e308
    return np.concatenate([mean, m2, unit_max, unit_min, [nonzero, saturated, -1.0]])


def test_packed_statistics_are_bit_equal_to_per_summary_ones_for_every_unit_count() -> None:
    """TensorStats.from_packed (rows of 2-D arrays, by unit count) against from_moments (one 1-D
    summary at a time), every field bit for bit: odd and even unit counts, one unit, counts around
    numpy's pairwise-sum blocks (8, 128), summaries evenly spaced (a view of the flat array) and
    interleaved with other widths (a copy), and the non-finite or empty ones handed back (None).
    A change of summation order on one side only (BLAS's ``d @ d`` for Σd² in one of them) fails
    here; so does a JSON round trip that is not exact."""
    import json

    from gradprobe.report import TensorStats

    rng = np.random.default_rng(11)
    counts = [1, 2, 3, 7, 8, 9, 16, 17, 100, 127, 128, 129, 130, 255, 256, 257, 1000, 1024, 1025, 3001]
    specs = [(1024, "ok")] * 6  # one after another: evenly spaced
    specs += [(u, "ok") for u in counts for _ in range(3)]
    specs += [(u, kind) for u in (1, 8, 129, 1024) for kind in ("nan", "inf", "-inf")] + [(64, "overflow")]
    order = list(range(6)) + list(6 + rng.permutation(len(specs) - 6))  # the rest interleaved
    parts, entries, kinds = [], [], []
    offset = 0
    for i in order:
        u, kind = specs[i]
        rows = int(rng.choice([1, 2, 7, 256, 4096]))
        flat = _packed_summary(rng, u, rows, kind)
        if rng.random() < 0.3:  # something else in between (a histogram's summary, the parameter table)
            parts.append(rng.standard_normal(int(rng.integers(1, 9))))
            offset += parts[-1].shape[0]
        entries.append((offset, u, rows, int(rng.integers(1, 4)), int(rng.integers(1, 5000))))
        kinds.append(kind)
        parts.append(flat)
        offset += flat.shape[0]
    entries.append((offset, 5, 0, 1, 5))  # no rows
    parts.append(_packed_summary(rng, 5, 1, "ok"))
    kinds.append("empty")
    flat = np.concatenate(parts)
    expected = [
        TensorStats.from_moments(DeviceMoments.unpack([flat[o : o + 4 * u + 3].copy()], rows, calls), eps)
        if kind == "ok"
        else None
        for (o, u, rows, calls, eps), kind in zip(entries, kinds)
    ]
    built = TensorStats.from_packed(flat.copy(), entries)
    fields = [f for f in TensorStats.__dataclass_fields__ if f != "moments"] + ["signal_var"]
    checked = 0
    for b, e, kind, entry in zip(built, expected, kinds, entries):
        if kind != "ok":
            assert b is None, kind  # the caller takes from_moments
            continue
        assert b is not None and e is not None
        for f in fields:
            assert _bits(getattr(b, f)) == _bits(getattr(e, f)), (b.units, f, getattr(b, f), getattr(e, f))
        for f in ("rows", "zeros", "saturated", "nonfinite_units", "nonfinite", "calls"):
            assert getattr(b.moments, f) == getattr(e.moments, f), f
        for f in ("mean", "m2", "unit_max", "unit_min"):
            assert getattr(b.moments, f).tobytes() == getattr(e.moments, f).tobytes(), f
        # what a report read back from JSON computes: the same bits
        text = json.dumps(b.to_dict())
        back = TensorStats.from_dict(json.loads(text), entry[4])
        assert json.dumps(back.to_dict()) == text
        checked += 1
    assert checked == 6 + 3 * len(counts)
    assert any(e is not None and e.dead_units and e.saturated_fraction for e in expected)


def test_median_is_numpys() -> None:
    """report._median (one kth, then the maximum of the lower half) and its row-wise form give
    np.median's value."""
    from gradprobe.report import _median, _medians

    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 4, 5, 8, 9, 64, 127, 128, 1024, 1025):
        for ties in (False, True):
            x = rng.standard_normal((6, n)) ** 2
            if ties:
                x[:, ::2] = 0.0
            rows = _medians(x)
            for r, v in zip(x, rows):
                assert _median(r, finite=True) == _median(r) == np.median(r) == v
    assert math.isnan(_median(np.array([1.0, math.nan, 2.0])))
    assert math.isnan(_median(np.array([-math.inf, math.inf])))
    assert _median(np.array([-math.inf, 1.0, math.inf])) == 1.0
    assert math.isnan(_median(np.zeros(0)))


def test_record_fields_keep_the_order_positional_construction_assumes() -> None:
    """TensorStats.from_packed and _Session._layers build these records positionally (keyword calls
    cost ~1-2 µs more per object, and a report has hundreds): a field moved or inserted before the
    last one they pass must be moved there too."""
    from gradprobe.report import LayerRecord, ParamRecord, TensorStats

    assert tuple(TensorStats.__dataclass_fields__) == (
        "count", "mean", "var", "rms", "min", "max", "zero_fraction", "nonfinite", "units",
        "unit_var_min", "unit_var_median", "unit_var_max", "dead_units", "saturated_fraction", "energy",
        "moments",
    )  # fmt: skip
    assert tuple(Moments.__dataclass_fields__)[:10] == (
        "rows", "mean", "m2", "unit_max", "unit_min", "zeros", "saturated", "nonfinite_units", "nonfinite", "calls",
    )  # fmt: skip
    assert tuple(ParamRecord.__dataclass_fields__) == (
        "name", "shape", "numel", "requires_grad", "mean", "var", "rms", "fan_in", "fan_out", "grad_sq_sum", "batches",
    )  # fmt: skip
    assert tuple(LayerRecord.__dataclass_fields__)[:16] == (
        "name", "type", "index", "calls", "output_shape", "unit_axis", "elements_per_sample", "activation",
        "activation_param", "gain", "initializer", "act", "grad", "params", "outputs_skipped", "grad_missing",
    )  # fmt: skip


@pytest.mark.parametrize("batches", [1, 2])
def test_probe_report_round_trips_bit_equal_at_several_widths(batches: int) -> None:
    """A probe's report (built with TensorStats.from_packed: the kernel's one-part summaries, the
    seven-part ones of several batches or of the PyTorch path) read back from JSON (every statistic
    recomputed by from_moments) is the same report, bit for bit; with histograms too (their
    summaries are built one by one)."""
    import gradprobe
    from gradprobe.report import Report

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(33, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 1025),
        torch.nn.Tanh(),
        torch.nn.Linear(1025, 129),
        torch.nn.ReLU(),
        torch.nn.Linear(129, 1),
    )
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(64, 33, generator=g) * 3 + 1 for _ in range(batches)]
    for histograms in (False, True):
        r = gradprobe.probe(model, x, diagnose=False, gate_check=False, histograms=histograms)
        text = r.to_json()
        assert Report.from_json(text).to_json() == text
        assert r["2"].act is not None and r["2"].act.units == 1025 and r["2"].grad is not None
