"""The optional C statistics kernel (gradprobe/_kernel.c) against direct float64 computation and
against the pure-PyTorch path, on every layout it has a separate loop for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe.stats as stats
from gradprobe.probing import probe
from gradprobe.stats import DeviceMoments, Scratch, as_units

needs_kernel = pytest.mark.skipif(stats._kernel_module is None, reason="the C kernel is not built here")


def test_the_kernel_is_built_where_a_compiler_is() -> None:
    """`pip install -e .` builds it when a C compiler exists (CI has gcc): a silent fallback to the
    slower path would otherwise go unnoticed."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert stats._kernel_module is not None
    assert stats.KERNEL is stats._kernel_module or os.environ.get("GRADPROBE_KERNEL") == "0"


def _summary(x: torch.Tensor, axis: int | None, kernel: bool, chunk: int = stats.CHUNK_ELEMENTS) -> stats.Moments:
    saved = stats.KERNEL
    stats.KERNEL = stats._kernel_module if kernel else None
    try:
        acc = DeviceMoments(Scratch(chunk))
        acc.add(x, axis, saturation=(0.0, 2.0))
        parts = [p.double().numpy().reshape(-1) for p in acc.pack()]
        return DeviceMoments.unpack(parts, acc.rows, acc.calls)
    finally:
        stats.KERNEL = saved


# (shape, unit axis, tile budget): units on the last axis (the column loops: 16- and 8-wide blocks,
# leftover units, several 128-unit blocks, several row tiles), runs of positions (whole, cut in
# pieces, shorter than a vector), one unit, a single row
LAYOUTS = [
    ((256, 1024), 1, stats.KERNEL_TILE),
    ((300, 37), 1, 512),
    ((33, 300), 1, 1000),
    ((5, 9), 1, 64),
    ((8, 64, 16, 16), 1, stats.KERNEL_TILE),
    ((4, 6, 1000), 1, 100),
    ((3, 5, 7), 1, 16),
    ((5000,), None, 300),
    ((1, 19), 1, 64),
    # short runs (8 to 63 positions: late convolution stages): whole vectors, a tail, lane folds
    ((32, 64, 4, 4), 1, stats.KERNEL_TILE),
    ((300, 5, 3, 3), 1, stats.KERNEL_TILE),
    ((2, 3, 7, 7), 1, stats.KERNEL_TILE),
    ((4, 5, 8), 1, stats.KERNEL_TILE),
    ((3, 4, 63), 1, stats.KERNEL_TILE),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,axis,budget", LAYOUTS)
def test_kernel_matches_direct_float64_and_the_torch_path(
    shape: tuple[int, ...], axis: int | None, budget: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 1.5 + 0.25).to(dtype)
    x[x.abs() < 0.3] = 0.0
    x.view(-1)[::7] = -0.0  # negative zeros are zeros
    k = _summary(x, axis, kernel=True, chunk=budget)
    t = _summary(x, axis, kernel=False, chunk=budget)
    d = as_units(x.double(), axis)
    np.testing.assert_allclose(k.mean, d.mean(dim=(0, 2)).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(k.m2, (d.var(dim=(0, 2), unbiased=False) * d.shape[0] * d.shape[2]).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(k.unit_max, d.amax(dim=(0, 2)).numpy())
    np.testing.assert_array_equal(k.unit_min, d.amin(dim=(0, 2)).numpy())
    assert k.zeros == int((x == 0).sum()) == t.zeros
    assert k.saturated == int((x.double().abs() > 2.0).sum()) == t.saturated
    np.testing.assert_allclose(k.m2, t.m2, rtol=1e-12)
    assert k.rows == t.rows and k.units == t.units


@needs_kernel
def test_kernel_reads_views_in_place() -> None:
    """Channels-last and transposed outputs go to the kernel as strided views, not copies."""
    base = torch.randn(4, 24, 5, 5)
    for x, axis in ((base.to(memory_format=torch.channels_last), 1), (torch.randn(16, 3, 40).transpose(0, 1), 2)):
        d = as_units(x.contiguous().double(), axis)
        k = _summary(x, axis, kernel=True, chunk=64)
        np.testing.assert_allclose(k.unit_var(), d.var(dim=(0, 2), unbiased=False).numpy(), rtol=1e-12)
    sliced = (torch.randn(40, 50) * 2)[:, 5:45]  # rows 50 apart, 40 units: the one-pass rows loop, any stride
    assert not sliced.is_contiguous()
    k = _summary(sliced, 1, kernel=True)
    d = sliced.double()
    np.testing.assert_allclose(k.mean, d.mean(0).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(k.unit_var(), d.var(0, unbiased=False).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(k.unit_max, d.amax(0).numpy())
    assert k.saturated == int((d.abs() > 2.0).sum())  # counted row by row: the rows are not adjacent


@needs_kernel
def test_kernel_nonfinite_values_behave_as_torch() -> None:
    """NaN makes the unit's extremes NaN (torch.amax propagates it) and is not a zero; ±inf are
    extremes; the sums of such units are not finite, so the units are flagged."""
    for shape, axis in (((40, 24), 1), ((6, 3, 40), 1), ((6, 3, 3, 3), 1)):
        x = torch.randn(shape)
        v = as_units(x, axis)
        v[2, 1, 0] = float("nan")
        v[3, 2, 0] = float("inf")
        v[4, 0, 0] = 0.0
        k = _summary(x, axis, kernel=True, chunk=64)
        t = _summary(x, axis, kernel=False, chunk=64)
        assert np.isnan(k.unit_max[1]) and np.isnan(k.unit_min[1]) and np.isinf(k.unit_max[2])
        np.testing.assert_array_equal(k.unit_max, t.unit_max)
        np.testing.assert_array_equal(k.unit_min, t.unit_min)
        assert k.zeros == int((x == 0).sum()) == 1  # NaN is not a zero
        assert t.zeros == 2  # the PyTorch path counts it as one (torch.sign(NaN) == 0): documented
        assert k.nonfinite_units == t.nonfinite_units == 2


@needs_kernel
def test_large_mean_small_spread_through_tall_tiles() -> None:
    """mean 1e4, std 1 (float32 sums lose every digit): the two-pass tiles keep M2 exact."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6000, 48, generator=g) + 1e4).float()
    k = _summary(x, 1, kernel=True, chunk=500)
    np.testing.assert_allclose(k.unit_var(), x.double().var(dim=0, unbiased=False).numpy(), rtol=1e-10)
    short = (torch.randn(700, 6, 4, 4, generator=g) + 1e4).float()  # short runs: shifted sums
    k = _summary(short, 1, kernel=True)
    d = as_units(short.double(), 1)
    np.testing.assert_allclose(k.unit_var(), d.var(dim=(0, 2), unbiased=False).numpy(), rtol=1e-10)


@needs_kernel
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_parameter_sums(n: int, dtype: torch.dtype) -> None:
    w = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1 + 0.02).to(dtype)
    out = stats._local_sums(w, Scratch(), with_sum=True)
    assert out[0].item() == pytest.approx(w.double().sum().item(), rel=1e-13, abs=1e-15)
    assert out[1].item() == pytest.approx(w.double().square().sum().item(), rel=1e-13, abs=1e-15)


def test_the_kernel_is_not_given_what_it_cannot_read() -> None:
    assert not stats._kernel_can_read(torch.randn(4, 4).to(torch.bfloat16))
    assert not stats._kernel_can_read(torch.randn(4, 4, device="meta"))
    assert not stats._kernel_can_read(torch.randn(4, 4)._neg_view())
    assert stats._kernel_can_read(torch.randn(4, 6)[:, 1:3])
    assert not stats._kernel_can_read(torch.randn(4, 4).to_sparse())

    class Sub(torch.Tensor):
        pass

    assert not stats._kernel_can_read(torch.randn(4, 4).as_subclass(Sub))
    assert stats._kernel_can_read(torch.tensor(0.5, dtype=torch.float64))
    assert stats._kernel_can_read(nn.Parameter(torch.randn(3, 2)))


@needs_kernel
def test_a_probe_gives_the_same_report_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(), nn.Flatten(), nn.Linear(20 * 64, 30), nn.Tanh()
    )
    x = torch.randn(6, 3, 8, 8)
    monkeypatch.setattr(stats, "KERNEL", None)
    slow = probe(model, x, diagnose=False, gate_check=False)
    monkeypatch.setattr(stats, "KERNEL", stats._kernel_module)
    fast = probe(model, x, diagnose=False, gate_check=False)
    assert [layer.name for layer in fast.layers] == [layer.name for layer in slow.layers]
    for a, b in zip(fast.layers, slow.layers):
        for kind in ("act", "grad"):
            sa, sb = getattr(a, kind), getattr(b, kind)
            if sa is None:
                assert sb is None
                continue
            ma, mb = sa.moments, sb.moments
            np.testing.assert_allclose(ma.mean, mb.mean, rtol=1e-12, atol=1e-15, err_msg=f"{a.name} {kind}")
            np.testing.assert_allclose(ma.m2, mb.m2, rtol=1e-12, atol=1e-300, err_msg=f"{a.name} {kind}")
            assert ma.zeros == mb.zeros and ma.saturated == mb.saturated
            np.testing.assert_array_equal(ma.unit_max, mb.unit_max)


@needs_kernel
def test_the_portable_loops_without_avx2() -> None:
    """CPUs without AVX2 (and other architectures) take the vector-extension and scalar loops: the
    same results, checked in a process where the kernel was told not to use AVX2."""
    code = textwrap.dedent(
        """
        import numpy as np, torch
        import gradprobe.stats as stats
        from gradprobe.stats import DeviceMoments, Scratch, as_units
        assert stats.KERNEL is not None
        for shape, axis, chunk in [((300, 37), 1, 512), ((256, 40), 1, 4096), ((4, 6, 1000), 1, 100), ((5000,), None, 300)]:
            x = torch.randn(shape) * 2 + 0.5
            x[x.abs() < 0.3] = 0.0
            acc = DeviceMoments(Scratch(chunk))
            acc.add(x, axis)
            m = DeviceMoments.unpack([p.double().numpy().reshape(-1) for p in acc.pack()], acc.rows, acc.calls)
            d = as_units(x.double(), axis)
            np.testing.assert_allclose(m.mean, d.mean(dim=(0, 2)).numpy(), rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(m.unit_var(), d.var(dim=(0, 2), unbiased=False).numpy(), rtol=1e-12)
            np.testing.assert_array_equal(m.unit_max, d.amax(dim=(0, 2)).numpy())
            assert m.zeros == int((x == 0).sum())
        w = torch.randn(1001)
        s = stats._local_sums(w, Scratch(), with_sum=True)
        assert abs(s[1].item() - w.double().square().sum().item()) < 1e-9
        print("ok")
        """
    )
    env = dict(os.environ, GRADPROBE_KERNEL_NO_AVX2="1")
    env.pop("GRADPROBE_KERNEL", None)  # the kernel on in the child, whatever this run was told
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_kernel_info_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "KERNEL", None)
    assert stats.kernel_info() == "PyTorch operations"
    if stats._kernel_module is not None:
        monkeypatch.setattr(stats, "KERNEL", stats._kernel_module)
        assert stats.kernel_info() in ("C kernel (avx2)", "C kernel (portable)")


def test_sums_of_many_tensors_in_one_call() -> None:
    """stats.sums_of: [Σx, Σx²] per tensor, one kernel call for all (float32 and float64, empty, odd
    lengths); a tensor the kernel cannot read (a strided view) sends all of them the other way, with
    the same numbers."""
    g = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(1001, generator=g),
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.zeros(0),
        nn.Parameter(torch.randn(64, 33, generator=g)),
        nn.Parameter(torch.tensor(0.5)),  # a scalar (ReZero's gate)
    ]
    want = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors])
    fast = stats.sums_of(tensors, Scratch())
    torch.testing.assert_close(fast, want, rtol=1e-13, atol=1e-12)
    strided = torch.randn(20, 10, generator=g)[:, ::2]
    slow = stats.sums_of([*tensors, strided], Scratch())
    torch.testing.assert_close(slow[:-1], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slow[-1], torch.stack([strided.double().sum(), strided.double().square().sum()]))
    assert stats.sums_of([], Scratch()).shape == (0, 2)


def test_sums_and_row_sums_in_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """stats.sums_and_row_sums: sums_of's [Σx, Σx²] per tensor and, for those given a row length, the
    Σ of every row (views of one float64 buffer; an empty matrix gives none; a row length that does
    not divide the tensor gives none); without the kernel, or with a tensor it cannot read, the same
    sums and no row sums (the grouping then reads the rows itself)."""
    g = torch.Generator().manual_seed(3)
    tensors = [
        nn.Parameter(torch.randn(64, 33, generator=g)),
        torch.randn(5, generator=g),
        torch.randn(6, 2, 3, generator=g, dtype=torch.float64),
        torch.zeros(0, 4),
        torch.randn(7, 3, generator=g),
    ]
    lengths = [33, 0, 6, 4, 2]  # the last does not divide 21 values
    want = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors])
    sums, rows = stats.sums_and_row_sums(tensors, lengths, Scratch())
    torch.testing.assert_close(sums, want, rtol=1e-13, atol=1e-12)
    if stats.KERNEL is not None:
        torch.testing.assert_close(rows[0], tensors[0].detach().double().sum(dim=1), rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(rows[2], tensors[2].reshape(6, 6).sum(dim=1), rtol=1e-13, atol=1e-12)
        assert rows[1] is None and rows[4] is None and rows[3] is not None and rows[3].numel() == 0
    else:
        assert rows == [None] * 5
    strided = torch.randn(8, 10, generator=g)[:, ::2]
    sums2, rows2 = stats.sums_and_row_sums([*tensors, strided], [*lengths, 5], Scratch())
    assert rows2 == [None] * 6
    torch.testing.assert_close(sums2[:-1], want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(stats, "KERNEL", None)
    sums3, rows3 = stats.sums_and_row_sums(tensors, lengths, Scratch())
    assert rows3 == [None] * 5
    torch.testing.assert_close(sums3, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one row length per tensor"):
        stats.sums_and_row_sums(tensors, lengths[:2], Scratch())


@needs_kernel
def test_contiguous_fast_path_equals_the_view_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceMoments.add reads a contiguous tensor straight from its shape (no view, no detach): the
    same packed result, bit for bit, as the general path through as_units, for units on any axis,
    one unit, a negative axis, a saturation count; and the general path is not called."""
    g = torch.Generator().manual_seed(4)
    cases = [
        (torch.randn(64, 48, generator=g), 1, None),
        (torch.randn(8, 6, 5, 5, generator=g), 1, (0.0, 1.0)),
        (torch.randn(4, 7, 9, generator=g), -1, None),
        (torch.randn(40, 1, generator=g), 1, None),  # one unit: a single run
        (torch.randn(3, 16, 70, generator=g, requires_grad=True), 1, (0.5, 0.2)),
    ]
    monkeypatch.setattr(stats, "KERNEL", stats._kernel_module)  # on, even under GRADPROBE_KERNEL=0
    for x, axis, saturation in cases:
        slow = DeviceMoments(Scratch())
        with torch.no_grad():
            slow._add(x, axis, saturation, False, False)
        fast = DeviceMoments(Scratch())
        with monkeypatch.context() as m:
            m.setattr(stats, "_summarize", lambda *a, **k: pytest.fail("took the general path"))
            fast.add(x, axis, saturation)
        for p, q in zip(fast.pack(), slow.pack()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert (fast.rows, fast.calls) == (slow.rows, slow.calls)


def _unit_stats(x: torch.Tensor, axis: int, threads: int, saturation: tuple[float, float] | None) -> torch.Tensor:
    """The kernel's packed output for ``x`` (units on ``axis``) read with ``threads`` threads."""
    v = as_units(x, axis)
    a, u, b = v.shape
    out = torch.full((4 * u + 3,), 7.0, dtype=torch.float64)
    centre, threshold = saturation or (0.0, 0.0)
    stats._kernel_module.unit_stats(
        v.data_ptr(), stats._KERNEL_DTYPES[v.dtype], a, u, b, *v.stride(), out.data_ptr(), stats.KERNEL_TILE,
        saturation is not None, centre, threshold, threads,
    )
    return out


# the one-pass layouts, big enough (≥ 2¹⁵ values) to be split into ranges of units between threads:
# rows of units (16-unit blocks; 13 and 1 units left over; a range shorter than 32), long runs, short
# runs (with a tail), samples further apart than their units (a strided batch), a NaN, a 1e4 offset
SPLIT_LAYOUTS = [
    ((256, 1024), 1),
    ((300, 1037), 1),
    ((1200, 33), 1),
    ((40, 100, 70), 1),
    ((300, 64, 4, 4), 1),
    ((150, 50, 7, 7), 1),
    ((64, 40, 3, 200), 2),
]


@needs_kernel
@pytest.mark.parametrize("shape,axis", SPLIT_LAYOUTS)
def test_threads_split_units_with_the_same_bits(shape: tuple[int, ...], axis: int) -> None:
    """A large tensor is read by torch's OpenMP threads, each a range of units: every statistic (means,
    M2, extremes, zero and saturation counts) is bit-equal to one thread's, for 2 and 3 threads, and
    matches a direct float64 computation."""
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    x = torch.randn(shape, generator=g) * 1.5 + 0.25
    x[x.abs() < 0.3] = 0.0
    cases = [x, x[::2], x + 1e4]
    nan = x.clone()
    nan.view(-1)[12345] = float("nan")
    cases.append(nan)
    for case in cases:
        one = _unit_stats(case, axis, 1, (0.0, 2.0))
        for threads in (2, 3):
            torch.testing.assert_close(_unit_stats(case, axis, threads, (0.0, 2.0)), one, rtol=0, atol=0, equal_nan=True)
        assert stats._kernel_module.team()[1] >= 1
    d = as_units(x[::2].double(), axis)
    two = _unit_stats(x[::2], axis, 2, (0.0, 2.0))
    u = d.shape[1]
    np.testing.assert_allclose(two[:u].numpy(), d.mean(dim=(0, 2)).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        two[u : 2 * u].numpy(), (d.var(dim=(0, 2), unbiased=False) * d.shape[0] * d.shape[2]).numpy(), rtol=1e-12
    )
    np.testing.assert_array_equal(two[2 * u : 3 * u].numpy(), d.amax(dim=(0, 2)).numpy())
    np.testing.assert_array_equal(two[3 * u : 4 * u].numpy(), d.amin(dim=(0, 2)).numpy())
    assert two[4 * u].item() == int((d != 0).sum())
    assert two[4 * u + 1].item() == int((d.abs() > 2.0).sum())  # counted per sample: samples not adjacent


@needs_kernel
def test_parameter_sums_share_out_pieces_between_threads() -> None:
    """square_sums_many with threads: tensors cut into fixed pieces of 2^18 values (so that one large
    gradient is read by every thread), each piece summed by one thread and the pieces added in order:
    the same bits on any number of threads, a tensor of one piece the same bits as square_sums (sizes
    around a vector and around a piece, float32 and float64)."""
    piece = 1 << 18
    g = torch.Generator().manual_seed(6)
    sizes = (70000, 9, 8, 3 * piece + 5, 40001, 0, piece, piece + 1, 1)
    tensors = [torch.randn(n, generator=g) * 3 + 1 for n in sizes]
    tensors.append(torch.randn(2 * piece + 7, generator=g, dtype=torch.float64) - 2)
    tensors.append(torch.randn(30000, generator=g, dtype=torch.float64))
    items = [(t.data_ptr(), stats._KERNEL_DTYPES[t.dtype], t.numel()) for t in tensors]
    one = torch.empty(len(tensors), 2, dtype=torch.float64)
    stats._kernel_module.square_sums_many(items, one.data_ptr(), 1)
    for threads in (2, 3):
        many = torch.empty_like(one)
        stats._kernel_module.square_sums_many(items, many.data_ptr(), threads)
        assert torch.equal(many, one)
    want = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors])
    torch.testing.assert_close(one, want, rtol=1e-13, atol=1e-12)
    for k, t in enumerate(tensors):
        whole = torch.empty(2, dtype=torch.float64)
        stats._kernel_module.square_sums(t.data_ptr(), stats._KERNEL_DTYPES[t.dtype], t.numel(), whole.data_ptr())
        if t.numel() <= piece:
            assert torch.equal(one[k], whole), k


@needs_kernel
@pytest.mark.parametrize("no_avx2", [False, True])
def test_parameter_sums_by_rows(no_avx2: bool) -> None:
    """square_sums_many items (data, dtype, n, row, rows_out): every row's Σx written out, each row
    summed on its own from its first value, so identical rows get identical bits wherever they lie
    (rows of 13 values: every alignment); Σx and Σx² of the tensor within float64 rounding of a
    direct sum; pieces of whole rows (a row length that does not divide 2^18, more than one piece):
    the same bits on 1, 2 and 3 threads; plain items beside them unchanged; bad row lengths refused.
    The portable loops (GRADPROBE_KERNEL_NO_AVX2) in a subprocess."""
    if no_avx2:
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import test_kernel; assert test_kernel.stats._kernel_module.info() == 'portable'; test_kernel._check_row_sums(); print('ok')"
        env = dict(os.environ, GRADPROBE_KERNEL_NO_AVX2="1")
        env.pop("GRADPROBE_KERNEL", None)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
        return
    _check_row_sums()


def _check_row_sums() -> None:
    kernel = stats._kernel_module
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 13, generator=g) * 2 + 0.5
    w[31] = w[2]  # identical rows 116 and 1612 bytes apart
    w[9, 4] = -0.0
    w[20] = w[9]
    w[20, 4] = 0.0  # -0.0 and +0.0: equal under ==, and so are their sums
    big = torch.randn(30001, 37, generator=g)  # 4 pieces of 7084 rows (2^18 // 37) and a rest
    d64 = torch.randn(9, 1000, generator=g, dtype=torch.float64) - 3
    plain = torch.randn(70000, generator=g)
    tensors = [w, big, plain, d64, torch.zeros(0, 5)]
    rows = [torch.full((t.shape[0],), 9.0, dtype=torch.float64) for t in tensors]
    items = [
        (t.data_ptr(), stats._KERNEL_DTYPES[t.dtype], t.numel(), t.shape[1], r.data_ptr()) if t.dim() == 2 and t.numel()
        else (t.data_ptr(), stats._KERNEL_DTYPES[t.dtype], t.numel())
        for t, r in zip(tensors, rows)
    ]
    one = torch.empty(len(tensors), 2, dtype=torch.float64)
    kernel.square_sums_many(items, one.data_ptr(), 1)
    first_rows = [r.clone() for r in rows]
    for threads in (2, 3):
        many = torch.empty_like(one)
        kernel.square_sums_many(items, many.data_ptr(), threads)
        assert torch.equal(many, one)
        assert all(torch.equal(a, b) for a, b in zip(rows, first_rows))
    want = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors])
    torch.testing.assert_close(one, want, rtol=1e-13, atol=1e-12)
    for t, r in zip(tensors, rows):
        if t.dim() == 2 and t.numel():
            torch.testing.assert_close(r, t.double().sum(dim=1), rtol=1e-13, atol=1e-12)
    assert rows[0][31].item() == rows[0][2].item() and rows[0][20].item() == rows[0][9].item()
    assert len(set(rows[0].tolist())) == 38  # every other row its own sum
    plain_sums = torch.empty(2, dtype=torch.float64)
    kernel.square_sums(plain.data_ptr(), 0, plain.numel(), plain_sums.data_ptr())
    assert torch.equal(one[2], plain_sums)  # an item without rows: as before
    for bad in ((w.data_ptr(), 0, w.numel(), 12, rows[0].data_ptr()), (w.data_ptr(), 0, w.numel(), 13, 0)):
        with pytest.raises(ValueError, match="row length"):
            kernel.square_sums_many([bad], one.data_ptr(), 1)


@needs_kernel
def test_threads_come_from_torchs_openmp_pool() -> None:
    """Where torch runs on OpenMP (Linux builds), the kernel finds that runtime (never loading one of
    its own) and a large tensor is read by a team of the requested size; small ones, or threads=1,
    stay on the caller's thread."""
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        pytest.skip("torch does not run on OpenMP here")
    runtime, _ = stats._kernel_module.team()
    assert runtime is not None
    x = torch.randn(256, 1024)
    _unit_stats(x, 1, 2, None)
    assert stats._kernel_module.team() == (runtime, 2)
    _unit_stats(x, 1, 1, None)
    assert stats._kernel_module.team() == (runtime, 1)
    _unit_stats(torch.randn(64, 64), 1, 2, None)  # 4096 values: not worth waking a thread
    assert stats._kernel_module.team() == (runtime, 1)
    w = [torch.randn(1 << 16) for _ in range(2)]
    out = torch.empty(2, 2, dtype=torch.float64)
    stats._kernel_module.square_sums_many([(t.data_ptr(), 0, t.numel()) for t in w], out.data_ptr(), 2)
    assert stats._kernel_module.team() == (runtime, 2)
    big = torch.randn(1 << 20)  # one gradient of four pieces: both threads
    stats._kernel_module.square_sums_many([(big.data_ptr(), 0, big.numel())], out.data_ptr(), 2)
    assert stats._kernel_module.team() == (runtime, 2)


@needs_kernel
def test_a_probe_reads_with_torchs_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe passes torch.get_num_threads() to every kernel call (torch.set_num_threads(1) keeps
    the statistics on one thread), and the report is the same either way."""
    monkeypatch.setattr(stats, "KERNEL", stats._kernel_module)
    seen: list[int] = []
    real = stats._kernel_module

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def unit_stats(self, *args: object) -> None:
            seen.append(int(args[-1]))  # type: ignore[call-overload]
            real.unit_stats(*args)

        def square_sums_many(self, *args: object) -> None:
            seen.append(int(args[-1]))  # type: ignore[call-overload]
            real.square_sums_many(*args)

    monkeypatch.setattr(stats, "KERNEL", Spy())
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    x = torch.randn(128, 512)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = probe(net, x, init="kaiming_normal", diagnose=False)
        assert seen and set(seen) == {2}
        seen.clear()
        torch.set_num_threads(1)
        one = probe(net, x, init="kaiming_normal", diagnose=False)
        assert seen and set(seen) == {1}
    finally:
        torch.set_num_threads(saved)
    assert two.to_dict()["layers"] == one.to_dict()["layers"]
