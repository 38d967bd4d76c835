"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

# The suite runs as `pytest -n 2` on 2 cores: one intra-op thread per worker, or the two workers'
# thread pools contend for the cores and small reductions stall for a scheduler tick each.
torch.set_num_threads(int(os.environ.get("GRADPROBE_TEST_THREADS", "1")))


import pytest  # noqa: E402

import gradprobe.stats as _stats  # noqa: E402


@pytest.fixture(params=["kernel", "torch"])
def stats_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both statistics paths: the C kernel (skipped where it is not built) and the
    pure-PyTorch operations (every device, and CPUs without the kernel)."""
    if request.param == "kernel":
        if _stats._kernel_module is None:
            pytest.skip("the C statistics kernel is not built here")
        monkeypatch.setattr(_stats, "KERNEL", _stats._kernel_module)
    else:
        monkeypatch.setattr(_stats, "KERNEL", None)
    return str(request.param)
