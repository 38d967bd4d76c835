"""Exact grouping of identical units: known answers, traps, and a brute-force reference."""

from __future__ import annotations

import doctest

import pytest
import torch

import gradprobe.diagnose.grouping as grouping
from gradprobe.diagnose.grouping import effective_width, group_identical_rows, group_identical_units
from gradprobe.errors import UsageError


def reference_groups(rows: torch.Tensor) -> list[list[int]]:
    """Brute force with torch.unique(dim=0); NaN-free inputs only."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    classes: dict[int, list[int]] = {}
    for index, label in enumerate(inverse.tolist()):
        classes.setdefault(label, []).append(index)
    return sorted((c for c in classes.values() if len(c) >= 2), key=lambda c: c[0])


def planted(n: int, d: int, groups: list[list[int]], dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype)
    for group in groups:
        rows[group] = rows[group[0]].clone()
    return rows


INTERLEAVED = [[3, 18], list(range(0, 200, 4))[:50], [5, 401], list(range(1, 400, 8))[:50]]
EXPECTED = sorted((sorted(g) for g in INTERLEAVED), key=lambda g: g[0])
assert len({i for g in INTERLEAVED for i in g}) == sum(map(len, INTERLEAVED)), "planted groups overlap"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_planted_groups_of_2_and_50_interleaved(dtype: torch.dtype) -> None:
    rows = planted(500, 96, INTERLEAVED, dtype)
    assert group_identical_rows(rows) == EXPECTED
    assert effective_width(500, EXPECTED) == (500 - 1 - 49 - 1 - 49) / 500


def test_all_distinct_gives_no_group() -> None:
    assert group_identical_rows(torch.randn(1000, 64, generator=torch.Generator().manual_seed(1))) == []


def test_all_identical_is_one_group() -> None:
    rows = torch.randn(1, 512).expand(2048, 512).contiguous()
    groups = group_identical_rows(rows)
    assert groups == [list(range(2048))]
    assert effective_width(2048, groups) == 1 / 2048


def test_equal_rows_in_different_hash_chunks_and_column_blocks() -> None:
    # 1100 rows of 1024 float32: hashed in chunks of 256 rows, the last one shorter
    assert group_identical_rows(planted(1100, 1024, [[0, 700, 1099]])) == [[0, 700, 1099]]
    # wider than one exact-matmul column block
    wide = planted(5, 40_000, [[1, 4]])
    assert group_identical_rows(wide) == [[1, 4]]
    wide[4, 39_999] = 0.0
    assert group_identical_rows(wide) == []


def test_negative_zero_equals_positive_zero() -> None:
    rows = torch.tensor([[0.0, 1.0, -0.0], [-0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    assert torch.signbit(rows[1, 0]) and not torch.signbit(rows[0, 0])
    assert group_identical_rows(rows) == [[0, 1, 2]]
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert group_identical_rows(rows.to(dtype)) == [[0, 1, 2]]


def test_nan_rows_are_never_grouped() -> None:
    row = torch.randn(1, 32)
    nan_row = row.clone()
    nan_row[0, 7] = float("nan")
    # NaN rows bitwise identical to each other, first in their bucket, and a clean pair after them
    rows = torch.cat([nan_row, nan_row, row, nan_row, row, torch.full((1, 32), float("nan"))] * 1)
    assert group_identical_rows(rows) == [[2, 4]]
    assert group_identical_rows(nan_row.expand(5, 32).contiguous()) == []


def test_many_identical_nan_rows_finish_and_group_nothing() -> None:
    rows = torch.full((3000, 16), float("nan"))
    rows[1000:1002] = 1.0  # one clean pair among them
    assert group_identical_rows(rows) == [[1000, 1001]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_element_or_one_ulp_apart_is_not_identical(dtype: torch.dtype) -> None:
    base = torch.randn(1, 4096, generator=torch.Generator().manual_seed(2)).to(dtype)
    one_element = base.clone()
    one_element[0, 4000] += 1.0
    one_ulp = base.clone()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[base.element_size()]
    one_ulp.view(bits)[0, 123] += 1  # the next representable value: 1 ulp away
    assert one_ulp[0, 123] != base[0, 123]
    rows = torch.cat([base, one_element, one_ulp, base])
    assert group_identical_rows(rows) == [[0, 3]]


def test_one_and_zero_rows() -> None:
    assert group_identical_rows(torch.randn(1, 8)) == []
    assert group_identical_rows(torch.randn(0, 8)) == []
    assert group_identical_rows(torch.empty(0, 0)) == []
    # zero features: every row is the empty row
    assert group_identical_rows(torch.empty(3, 0)) == [[0, 1, 2]]


def test_units_identical_in_one_feature_but_not_another() -> None:
    weight = planted(6, 10, [[0, 1, 2, 4]])
    bias = torch.tensor([0.5, 0.5, 0.25, 0.0, 0.5, 0.0])
    outgoing = torch.randn(3, 6)  # (fan_out, n): transpose to one row per unit
    outgoing[:, 4] = outgoing[:, 0]
    assert group_identical_units(weight) == [[0, 1, 2, 4]]
    assert group_identical_units(weight, bias) == [[0, 1, 4]]
    assert group_identical_units(weight, bias, outgoing.T) == [[0, 4]]
    assert group_identical_units(weight, bias.to(torch.bfloat16), outgoing.T.double()) == [[0, 4]]
    assert group_identical_units(bias) == [[0, 1, 4], [3, 5]]


def test_units_flatten_conv_weights() -> None:
    weight = torch.randn(4, 3, 2, 2)
    weight[3] = weight[1]
    assert group_identical_units(weight, torch.zeros(4)) == [[1, 3]]
    weight[3, 2, 1, 1] += 1
    assert group_identical_units(weight, torch.zeros(4)) == []


def test_result_is_deterministic_and_independent_of_seed() -> None:
    rows = planted(700, 40, INTERLEAVED)
    first = group_identical_rows(rows)
    assert all(group_identical_rows(rows) == first for _ in range(3))
    assert all(group_identical_rows(rows, seed=seed) == first for seed in (1, 7, 12345))


def test_matches_brute_force_on_small_integer_matrices() -> None:
    generator = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = int(torch.randint(2, 300, (1,), generator=generator))
        d = int(torch.randint(1, 5, (1,), generator=generator))
        values = torch.randint(-1, 3, (n, d), generator=generator).to(torch.float32) / 2
        expected = reference_groups(values)
        assert group_identical_rows(values, seed=trial) == expected
        assert group_identical_units(*values.unbind(dim=1), seed=trial) == expected


def test_matches_brute_force_on_wide_rows_that_agree_on_the_sampled_columns() -> None:
    # Wide rows (past the pre-filter's threshold) that mostly differ outside the sampled columns:
    # the pre-filter keeps them all as candidates and the full pass must separate them.
    generator = torch.Generator().manual_seed(5)
    for trial in range(20):
        n = int(torch.randint(2, 200, (1,), generator=generator))
        d = int(torch.randint(2 * grouping._SAMPLE_COLUMNS + 1, 300, (1,), generator=generator))
        values = torch.zeros(n, d)
        varying = torch.randint(0, d, (3,), generator=generator)
        values[:, varying] = torch.randint(0, 2, (n, 3), generator=generator).float()
        expected = reference_groups(values)
        assert group_identical_rows(values, seed=trial) == expected
        # split into two features of different widths
        assert group_identical_units(values[:, : d // 3], values[:, d // 3 :].double(), seed=trial) == expected


def test_pre_filter_reads_only_sampled_columns_of_distinct_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[list[int]] = []
    original = grouping._signatures

    def spy(features: list[torch.Tensor], seed: int) -> torch.Tensor:
        widths.append([f.shape[1] for f in features])
        return original(features, seed)

    monkeypatch.setattr(grouping, "_signatures", spy)
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(6))
    assert group_identical_units(weight, torch.zeros(512)) == []
    assert widths == []  # no two rows share their first element: nothing was hashed
    weight[[3, 300]] = 0.0  # two zero rows: only those two get the full pass
    assert group_identical_units(weight, torch.zeros(512)) == [[3, 300]]
    assert widths == [[grouping._SAMPLE_COLUMNS, 1], [1024, 1]]
    widths.clear()
    weight[7, 0] = weight[9, 0] = 0.5  # a shared first element, different after: the sample decides
    assert group_identical_units(weight, torch.zeros(512)) == [[3, 300]]
    assert widths == [[grouping._SAMPLE_COLUMNS, 1], [1024, 1]]


def test_hash_collisions_are_split_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # every row in one bucket: the exact check alone must separate the classes
    monkeypatch.setattr(grouping, "_signatures", lambda features, seed: torch.zeros(features[0].shape[0], 4))
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        values = torch.randint(0, 3, (150, 3), generator=generator).to(torch.float32)
        assert group_identical_rows(values) == reference_groups(values)
    values[5, 1] = float("nan")
    assert all(5 not in group for group in group_identical_rows(values))


def test_non_contiguous_and_requires_grad_inputs() -> None:
    rows = planted(64, 30, [[1, 9, 40]]).T.contiguous().T  # column-major storage
    assert not rows.is_contiguous()
    assert group_identical_rows(rows.requires_grad_()) == [[1, 9, 40]]
    assert group_identical_rows(planted(64, 30, [[2, 3]])[::2]) == []
    assert group_identical_rows(planted(64, 30, [[2, 4]])[::2]) == [[1, 2]]


def test_fp8_inputs() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    rows = planted(50, 16, [[0, 7]]).to(torch.float8_e4m3fn)
    assert group_identical_rows(rows) == reference_groups(rows.float())


def test_bad_inputs_are_refused_with_the_value() -> None:
    with pytest.raises(UsageError, match="floating"):
        group_identical_rows(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(UsageError, match=r"2-D.*\(2, 3, 4\)"):
        group_identical_rows(torch.ones(2, 3, 4))
    with pytest.raises(UsageError, match="same number of units"):
        group_identical_units(torch.ones(3, 2), torch.ones(4))
    with pytest.raises(UsageError, match="at least one"):
        group_identical_units()
    with pytest.raises(UsageError, match="scalar"):
        group_identical_units(torch.tensor(1.0))


def test_effective_width() -> None:
    assert effective_width(10, []) == 1.0
    assert effective_width(10, [[0, 1], [2, 3, 4]]) == 0.7
    assert effective_width(0, []) == 1.0
    with pytest.raises(UsageError):
        effective_width(2, [[0, 1, 2]])


def test_docstring_examples() -> None:
    assert doctest.testmod(grouping).failed == 0


def test_distinct_first_column_on_cpu_needs_no_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights on CPU: a numpy sort of the first column settles it (no torch.unique, ~8× cheaper);
    bfloat16 (no numpy dtype) and repeated first elements take torch.unique, with the same answers."""
    calls: list[int] = []
    original = torch.unique

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(grouping.torch, "unique", spy)
    generator = torch.Generator().manual_seed(8)
    for dtype in (torch.float16, torch.float32, torch.float64):
        rows = torch.randn(300, 64, generator=generator).to(dtype)
        rows[:, 0] = torch.arange(300)  # distinct in every dtype (float16's 300 random values repeat)
        assert group_identical_rows(rows) == []
    assert calls == []
    assert group_identical_rows(torch.randn(300, 64, generator=generator).to(torch.bfloat16)) == []
    assert len(calls) >= 1
    rows = planted(300, 64, [[4, 250]])
    assert group_identical_rows(rows) == [[4, 250]] and len(calls) > 1
