"""The CI gate: [tool.gradprobe] configuration, baseline drift, GitHub annotations, the job summary,
JUnit XML, and `gradprobe check` end to end in a temporary project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from report_builders import DEAD, VANISHING, make_report

from gradprobe import gate
from gradprobe.cli import main
from gradprobe.errors import UsageError

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small probes run fastest on one thread (and the suite shares two cores between workers)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_pyproject(directory: Path, body: str) -> Path:
    path = directory / "pyproject.toml"
    path.write_text('[project]\nname = "demo"\nversion = "0"\n\n' + textwrap.dedent(body))
    return path


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_config_defaults_models_and_overrides(tmp_path: Path) -> None:
    path = write_pyproject(
        tmp_path,
        """
        [tool.gradprobe]
        init = "kaiming_normal"
        inputs = ["32x64"]
        fail-on = "warning"
        allow = ["dead_units"]
        drift-decades = 0.5
        baseline = "base/profile.json"
        models = [
            "a.py:make",
            { model = "b.py:make", name = "bee", args = { depth = 3 }, init = "keep", thresholds = { vanishing_error = 1e-10 } },
        ]

        [tool.gradprobe.thresholds]
        vanishing_warning = 1e-5
        """,
    )
    config = gate.read_config(path)
    a, b = config.checks
    assert (a.model, a.label, a.init, a.inputs, a.fail_on, a.allow) == (
        "a.py:make", "a.py:make", "kaiming_normal", ("32x64",), "warning", ("dead_units",),
    )  # fmt: skip
    assert a.thresholds == {"vanishing_warning": 1e-5}
    assert (b.label, b.init, dict(b.args)) == ("bee", "keep", {"depth": 3})
    assert b.thresholds == {"vanishing_warning": 1e-5, "vanishing_error": 1e-10}
    assert config.baseline == tmp_path / "base/profile.json" and config.drift_decades == 0.5
    # the command line beats the table; named models replace the table's
    cli = gate.read_config(
        path, models=["c.py:make"], cli={"init": "orthogonal", "seed": 7, "baseline": "x.json"}
    )
    (c,) = cli.checks
    assert (c.model, c.init, c.seed, c.inputs) == ("c.py:make", "orthogonal", 7, ("32x64",))
    assert cli.baseline == Path("x.json")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("[tool.other]\nx = 1\n", "no \\[tool.gradprobe\\] table"),
        ("[tool.gradprobe]\ninit = 'keep'\n", "no models"),
        (
            "[tool.gradprobe]\nmodels = ['a.py:f']\nfail_onn = 'error'\n",
            "unknown key 'fail_onn'.*valid keys: .*fail-on",
        ),
        ("[tool.gradprobe]\nmodels = [{ name = 'x' }]\n", "has no model"),
        ("[tool.gradprobe]\nmodels = [{ model = 'a.py:f', seed = 'one' }]\n", "seed .* wrong type"),
        ("[tool.gradprobe]\nmodels = ['a.py:f', 'a.py:f']\n", "share the name"),
        ("[tool.gradprobe]\nmodels = ['a.py:f']\ndrift-decades = -1\n", "positive number"),
        ("[tool.gradprobe\n", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(body)
    with pytest.raises(UsageError, match=fragment):
        gate.read_config(path)


# --------------------------------------------------------------------------------------------
# Baseline drift
# --------------------------------------------------------------------------------------------


def test_drift_in_decades() -> None:
    base = make_report(0.5, "kaiming_normal").to_dict(include_moments=False)
    assert gate.drift_findings(make_report(0.5, "kaiming_normal"), base, 1.0) == []
    # gain 0.5 → 0.3 per Linear: layer 6's activation variance moves 3·log10(0.5/0.3) ≈ 0.67 decades
    assert gate.drift_findings(make_report(0.3, "kaiming_normal"), base, 1.0) == []
    (finding,) = gate.drift_findings(make_report(0.3, "kaiming_normal"), base, 0.5)
    assert finding.code == "baseline_drift" and finding.severity == "error"
    assert finding.evidence["worst_decades"] == pytest.approx(3 * 0.2218487, rel=1e-5)
    assert finding.layers == (
        "0",
        "1",
        "6",
        "7",
    )  # gradients drift at the input end, activations at the output end
    # an added and a removed layer: the architecture changed
    changed = make_report(0.5, "kaiming_normal")
    changed.layers[-1].name = "head"
    codes = {f.code for f in gate.drift_findings(changed, base, 1.0)}
    assert codes == {"baseline_layers_changed"}


def test_baseline_round_trip(tmp_path: Path) -> None:
    result = gate.CheckResult(
        check=gate.ModelCheck(model="m.py:f", name="m"), report=make_report(0.5, "keep")
    )
    assert gate.write_baseline(tmp_path / "b.json", [result]) == 1
    stored = gate.read_baseline(tmp_path / "b.json")
    assert list(stored) == ["m"] and gate.drift_findings(result.report, stored["m"], 0.1) == []
    (tmp_path / "report.json").write_text(make_report(0.5, "keep").to_json())
    assert len(gate.read_baseline(tmp_path / "report.json")) == 1  # a plain report JSON works too
    (tmp_path / "junk.json").write_text('{"schema": "other"}')
    with pytest.raises(UsageError, match="neither a gradprobe baseline nor a report"):
        gate.read_baseline(tmp_path / "junk.json")


# --------------------------------------------------------------------------------------------
# CI outputs
# --------------------------------------------------------------------------------------------


def _results() -> list[gate.CheckResult]:
    bad = gate.CheckResult(
        check=gate.ModelCheck(model="nets.py:deep", name="deep, 100%: net"),
        report=make_report(0.1, "xavier_normal", [VANISHING, DEAD]),
        location=(str(Path.cwd() / "nets.py"), 12),
        seconds=0.5,
    )
    bad.findings = list(bad.report.findings)
    good = gate.CheckResult(
        check=gate.ModelCheck(model="nets.py:ok"), report=make_report(1.0, "kaiming_normal")
    )
    broken = gate.CheckResult(
        check=gate.ModelCheck(model="nets.py:gone"), error="no factory 'gone' in nets.py"
    )
    return [gate.evaluate(r) for r in (bad, good, broken)]


def test_github_annotations_are_escaped_and_placed() -> None:
    lines = gate.github_annotations(_results(), Path.cwd())
    assert len(lines) == 3
    error, warning, broken = lines
    assert error.startswith(
        "::error file=nets.py,line=12,title=gradprobe deep%2C 100%25%3A net%3A vanishing_activations::"
    )
    assert "falls to 1.0e-03" in error and "[layers 0 … 6 (4 layers)]" in error and "Fix: initialise" in error
    assert warning.startswith("::warning file=nets.py,line=12,") and "dead_units" in warning
    assert broken.startswith("::error title=gradprobe nets.py%3Agone%3A could not probe::no factory")
    assert all("\n" not in line for line in lines)


def test_step_summary_and_junit() -> None:
    results = _results()
    assert (
        gate.exit_code(results) == 2
        and gate.exit_code(results[:2]) == 1
        and gate.exit_code(results[1:2]) == 0
    )
    summary = gate.step_summary(results)
    assert summary.startswith("## gradprobe check: could not run")
    assert "| `deep, 100%: net` | xavier_normal | ❌ fail | unstable | 1 | 1 |" in summary
    assert "| `nets.py:ok` | kaiming_normal | ✅ pass | stable | 0 | 0 |" in summary
    assert "- **error** `vanishing_activations` at 0 … 6 (4 layers)" in summary
    root = ET.fromstring(gate.junit_xml(results).split("\n", 1)[1])
    suite = root.find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "3",
        "1",
        "1",
    )
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failure = cases["deep, 100%: net"].find("failure")
    assert failure is not None and failure.get("type") == "vanishing_activations"
    assert "signal variance 1.00e+00 at 0 → 1.00e-03 at 6" in (failure.text or "")
    assert "dead_units" in (cases["deep, 100%: net"].findtext("system-out") or "")
    assert cases["nets.py:ok"].find("failure") is None and cases["nets.py:gone"].find("error") is not None


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(TESTS / "cli_models.py", tmp_path / "nets.py")
    return tmp_path


def _check(project: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str, ET.Element]:
    summary = project / "summary.md"
    summary.write_text("# earlier step\n")
    script = Path(sys.executable).parent / "gradprobe"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gradprobe"]
    env = {
        **os.environ,
        "GITHUB_ACTIONS": "true",
        "GITHUB_STEP_SUMMARY": str(summary),
        "COLUMNS": "120",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("GITHUB_WORKSPACE", None)
    result = subprocess.run(
        [*command, "check", "--junit", "junit.xml", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not overwritten
    return result, text, ET.parse(project / "junit.xml").getroot()


def test_check_end_to_end_stable_project_passes(project: Path) -> None:
    write_pyproject(
        project,
        """
        [tool.gradprobe]
        inputs = ["128x64"]
        models = [{ model = "nets.py:stable", name = "mlp" }]
        """,
    )
    result, summary, junit = _check(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ mlp" in result.stdout and "::error" not in result.stdout
    assert "## gradprobe check: passed" in summary and "✅ pass" in summary
    suite = junit.find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "1",
        "0",
        "0",
    )


def test_check_end_to_end_unstable_project_fails(project: Path) -> None:
    write_pyproject(
        project,
        """
        [tool.gradprobe]
        inputs = ["128x64"]

        [[tool.gradprobe.models]]
        model = "nets.py:stable"
        name = "mlp"

        [[tool.gradprobe.models]]
        model = "nets.py:unstable"
        name = "deep"
        """,
    )
    result, summary, junit = _check(project)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error ")]
    assert errors and all(line.startswith("::error file=nets.py,line=") for line in errors)
    assert any("title=gradprobe deep%3A vanishing_" in line for line in errors)
    assert "✗ deep" in result.stdout and "✓ mlp" in result.stdout and "Traceback" not in result.stderr
    assert "## gradprobe check: failed" in summary and "### `deep`: failing findings" in summary
    suite = junit.find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "2",
        "1",
        "0",
    )


def test_check_usage_errors_exit_2(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    write_pyproject(
        project, '[tool.gradprobe]\ninputs = ["128x64"]\nmodels = ["nets.py:stable", "nets.py:missing"]\n'
    )
    assert main(["check"]) == 2
    out = capsys.readouterr().out
    assert "! nets.py:missing  could not probe: no factory 'missing'" in out and "✓ nets.py:stable" in out
    write_pyproject(project, "[tool.gradprobe]\nmodelz = []\n")
    assert main(["check"]) == 2
    assert "unknown key 'modelz'" in capsys.readouterr().err
    assert main(["check", "--config", "absent.toml"]) == 2


def test_check_baseline_drift_and_allow(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    write_pyproject(project, '[tool.gradprobe]\ninputs = ["128x64"]\nmodels = ["nets.py:mlp"]\n')
    assert main(["check", "--baseline", "base.json"]) == 2  # no baseline yet
    assert "create it with gradprobe check --update-baseline" in capsys.readouterr().err
    assert main(["check", "--baseline", "base.json", "--update-baseline"]) == 0
    stored = json.loads((project / "base.json").read_text())
    assert stored["schema"] == gate.BASELINE_SCHEMA and list(stored["reports"]) == ["nets.py:mlp"]
    assert main(["check", "--baseline", "base.json"]) == 0
    # Weights 1.6× larger: each Linear multiplies variance by a further 2.56; by the 6th layer ≈ 2.4 decades.
    capsys.readouterr()
    assert main(["check", "--baseline", "base.json", "--arg", "gain=1.6"]) == 1
    out = capsys.readouterr().out
    assert "baseline_drift" in out and "decades" in out
    assert main(["check", "--baseline", "base.json", "--arg", "gain=1.6", "--drift-decades", "5"]) == 0
    assert main(["check", "--baseline", "base.json", "--arg", "gain=1.6", "--allow", "baseline_drift"]) == 0
