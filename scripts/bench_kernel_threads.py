"""Whole probes with the statistics kernel on torch's OpenMP threads against the kernel on one thread.

Each repetition runs both (the order alternating), so the VM's drift cancels in the pair; it reports the
median of the paired differences (team − one) with quartiles, the share of pairs where the team was
faster, and the kernel's own time per probe either way (wall time inside ``unit_stats`` and
``square_sums_many``). Models: the three of ``scripts/benchmark.py``.

    python scripts/bench_kernel_threads.py [--configs mlp resnet50 transformer] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradprobe.stats as stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import CONFIGS, QUICK, _setup, gradprobe_pass  # noqa: E402


class _Kernel:
    """The kernel module with its thread count fixed (None: as the probe asks) and its time summed."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(stats._kernel_module, name)

    def _timed(self, name: str, args: tuple[Any, ...]) -> None:
        if self.threads is not None:
            args = (*args[:-1], self.threads)  # the probe passes torch.get_num_threads() last
        start = time.perf_counter()
        getattr(stats._kernel_module, name)(*args)
        self.seconds += time.perf_counter() - start

    def unit_stats(self, *args: Any) -> None:
        self._timed("unit_stats", args)

    def square_sums_many(self, *args: Any) -> None:
        self._timed("square_sums_many", args)


def paired(name: str, repeats: int, quick: bool) -> dict[str, float]:
    model, x = _setup((QUICK if quick else CONFIGS)[name], torch.device("cpu"))
    kernels = {"team": _Kernel(None), "one": _Kernel(1)}

    def run(which: str) -> tuple[float, float]:
        kernel = kernels[which]
        kernel.seconds = 0.0
        saved = stats.KERNEL
        stats.KERNEL = kernel
        try:
            gc.collect()
            start = time.perf_counter()
            gradprobe_pass(model, x)
            return time.perf_counter() - start, kernel.seconds
        finally:
            stats.KERNEL = saved

    run("team"), run("one")  # warm-up
    diffs, kernel_time = [], {"team": [], "one": []}
    for r in range(repeats):
        order = ("team", "one") if r % 2 else ("one", "team")
        got = {which: run(which) for which in order}
        diffs.append(got["team"][0] - got["one"][0])
        for which in kernel_time:
            kernel_time[which].append(got[which][1])
    diffs.sort()
    q = statistics.quantiles(diffs, n=4) if len(diffs) >= 4 else [diffs[0], 0.0, diffs[-1]]
    return {
        "median_ms": statistics.median(diffs) * 1e3,
        "q1_ms": q[0] * 1e3,
        "q3_ms": q[-1] * 1e3,
        "team_faster": sum(d < 0 for d in diffs) / len(diffs),
        "kernel_team_ms": statistics.median(kernel_time["team"]) * 1e3,
        "kernel_one_ms": statistics.median(kernel_time["one"]) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=20, help="pairs per model")
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run")
    args = parser.parse_args(argv)
    if stats._kernel_module is None:
        print("the C kernel is not built here: nothing to compare")
        return 1
    runtime, _ = stats._kernel_module.team()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP runtime shared: {runtime}")
    for name in args.configs:
        r = paired(name, args.repeats, args.quick)
        print(
            f"{name}: probe team − one {r['median_ms']:+.1f} ms (quartiles {r['q1_ms']:+.1f} to {r['q3_ms']:+.1f}), "
            f"team faster in {r['team_faster']:.0%} of pairs; kernel per probe {r['kernel_one_ms']:.1f} → "
            f"{r['kernel_team_ms']:.1f} ms (ratio {r['kernel_team_ms'] / max(r['kernel_one_ms'], 1e-9):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
