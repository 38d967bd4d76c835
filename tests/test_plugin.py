"""The pytest plugin (``pytest11`` entry point): the fixtures in a real pytest run, and
``assert_stable``'s message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradprobe.api import assert_stable

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import cli_models  # noqa: E402

INPUTS = "torch.randn(128, 64, generator=torch.Generator().manual_seed(0))"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small probes run fastest on one thread (and the suite shares two cores between workers)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_fixture_in_a_pytest_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makepyfile(
        f"""
        import sys
        import torch
        sys.path.insert(0, {str(TESTS)!r})
        import cli_models

        def test_stable(gradprobe_stable):
            report = gradprobe_stable(cli_models.stable(), {INPUTS})
            assert report.verdict == "stable"

        def test_unstable(gradprobe_stable):
            gradprobe_stable(cli_models.unstable(), {INPUTS})

        def test_probe_fixture(gradprobe_probe):
            report = gradprobe_probe(cli_models.stable(), {INPUTS}, diagnose=False)
            assert len(report.layers) == 13
        """
    )
    # In a subprocess: an in-process run would unload torch modules imported during the run.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2, failed=1)
    text = result.stdout.str()
    assert "AssertionError: gradprobe: Sequential is unstable at init" in text
    assert "[error] vanishing_" in text and "fix: " in text and "signal variance" in text


def test_plugin_is_registered_and_imports_no_torch() -> None:
    from importlib.metadata import entry_points

    assert any(e.value == "gradprobe.pytest_plugin" for e in entry_points(group="pytest11"))
    code = "import sys, gradprobe.pytest_plugin; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_assert_stable_message_lists_findings_with_layers_and_numbers() -> None:
    inputs = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError) as info:
        assert_stable(cli_models.unstable(), inputs)
    message = str(info.value)
    head, *lines = message.splitlines()
    assert head.startswith("gradprobe: Sequential is unstable at init (init keep, seed 0): ")
    finding_lines = [line for line in lines if line.startswith("  [error] ")]
    assert finding_lines and all(" at " in line for line in finding_lines)
    assert any(
        "signal variance" in line and "e-" in line for line in lines
    )  # the numbers at the layers named
    assert any(line.strip().startswith("fix: ") for line in lines)
    # allow / fail_on
    report = assert_stable(
        cli_models.unstable(), inputs, allow=["vanishing_activations", "vanishing_gradients"]
    )
    assert report.verdict == "unstable"
    assert assert_stable(cli_models.stable(), inputs).verdict == "stable"
    with pytest.raises(AssertionError):
        assert_stable(cli_models.stable(), inputs, init="zeros", fail_on="warning")
