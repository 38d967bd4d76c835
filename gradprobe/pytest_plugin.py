"""pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:

* ``gradprobe_stable``: ``gradprobe_stable(model, inputs, **options) -> Report`` probes the model and
  fails the test with the findings (layers, numbers, fixes) when one is at or above ``fail_on``
  (default ``"error"``); ``allow=[codes]`` lets known findings pass. The same as
  :func:`gradprobe.assert_stable`.
* ``gradprobe_probe``: :func:`gradprobe.probe` itself, for tests that check numbers.

Example::

    def test_my_net_trains_from_init(gradprobe_stable):
        gradprobe_stable(MyNet(), torch.randn(64, 784), init="kaiming_normal")

Torch is imported only when a fixture is used, so the plugin costs nothing in unrelated suites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def gradprobe_stable() -> Callable[..., Any]:
    """``gradprobe_stable(model, inputs, **options)``: assert the model is stable at init."""
    from gradprobe.api import assert_stable

    return assert_stable


@pytest.fixture
def gradprobe_probe() -> Callable[..., Any]:
    """``gradprobe_probe(model, inputs, **options) -> Report``: :func:`gradprobe.probe`."""
    from gradprobe.probing import probe

    return probe
