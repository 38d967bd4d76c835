"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

# The suite runs as `pytest -n 2` on 2 cores: one intra-op thread per worker, or the two workers'
# thread pools contend for the cores and small reductions stall for a scheduler tick each.
torch.set_num_threads(int(os.environ.get("GRADPROBE_TEST_THREADS", "1")))
