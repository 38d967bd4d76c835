"""Time exact identical-unit grouping against ``torch.unique(dim=0)`` on 8192 units × 4096 dims.

Cases (float32): all rows distinct; half the rows in pairs (2048 pairs at random positions among
4096 distinct rows); all rows identical. Each timing is the median of ``--repeats`` runs after one
warm-up; the result is checked against the planted answer.

    python scripts/bench_symmetry.py [--units 8192] [--dims 4096] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from gradprobe.diagnose.grouping import group_identical_rows


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_cases(units: int, dims: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[list[int]]]]:
    """Name → (rows, expected groups)."""
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.randn(units, dims, generator=generator)

    paired = distinct.clone()
    positions = torch.randperm(units, generator=generator)[: units // 2].view(-1, 2).sort(dim=1).values
    paired[positions[:, 1]] = paired[positions[:, 0]]
    expected_pairs = sorted(positions.tolist())

    identical = distinct[:1].expand(units, dims).contiguous()
    return {
        "all distinct": (distinct, []),
        "half in pairs": (paired, expected_pairs),
        "all identical": (identical, [list(range(units))]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=8192)
    parser.add_argument("--dims", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"{args.units} units × {args.dims} dims, float32, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} after a warm-up"
    )
    print(f"{'case':<15} {'groups':>7} {'grouping s':>11} {'unique s':>9} {'unique/grouping':>16}")
    for name, (rows, expected) in make_cases(args.units, args.dims).items():
        groups = group_identical_rows(rows)
        if groups != expected:
            raise SystemExit(f"{name}: wrong groups ({len(groups)} found, {len(expected)} planted)")
        ours = median_seconds(partial(group_identical_rows, rows), args.repeats)
        theirs = median_seconds(partial(torch.unique, rows, dim=0), args.repeats)
        print(f"{name:<15} {len(groups):>7} {ours:>11.3f} {theirs:>9.3f} {theirs / ours:>15.1f}×")


if __name__ == "__main__":
    main()
