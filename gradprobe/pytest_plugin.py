"""pytest plugin (registered through the ``pytest11`` entry point).

Provides the ``gradprobe_stable`` fixture: a function ``(model, inputs, **options) -> Report`` that
probes the model and fails the test with the findings (layers and numbers) when any is an error.
Imports torch only when the fixture is used, so the plugin costs nothing in unrelated test suites.
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
