"""The command line, in-process (``main(argv)``) and as a subprocess (the installed console script
and ``python -m gradprobe``): every verb, every error path (exit code, one line, a hint, no
traceback), and the files it writes."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradprobe.cli import main

TESTS = Path(__file__).parent
MODELS = str(TESTS / "cli_models.py")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small probes run fastest on one thread (and the suite shares two cores between workers)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gradprobe_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m gradprobe``."""
    script = Path(sys.executable).parent / "gradprobe"
    if script.exists():
        return [str(script)]
    found = shutil.which("gradprobe")
    return [found] if found else [sys.executable, "-m", "gradprobe"]


def run_cli(
    args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "COLUMNS": "120",
        "NO_COLOR": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    full_env.pop("GITHUB_ACTIONS", None) if env is None or "GITHUB_ACTIONS" not in env else None
    return subprocess.run(
        [*gradprobe_command(), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300
    )


class _Evil:
    """Unpickling this creates a file: proof that code in the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def evil_pickle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import torch

    directory = tmp_path_factory.mktemp("evil")
    marker = directory / "pwned"
    path = directory / "model.pt"
    torch.save(_Evil(marker), path)
    return path, marker


# Every error the CLI must explain in one line: (argv, message fragment). {models} and {evil} are filled in.
ERRORS = [
    pytest.param(
        ["probe", "{dir}/absent.py:stable", "--input", "8x64"], "model file not found", id="missing-file"
    ),
    pytest.param(["probe", "{models}:nope", "--input", "8x64"], "no factory 'nope' in", id="missing-factory"),
    pytest.param(
        ["probe", "{models}:not_a_module", "--input", "8x64"],
        "returned 42 (int), not a torch.nn.Module",
        id="not-a-module",
    ),
    pytest.param(
        ["probe", "{models}:stable", "--input", "8x63"],
        "forward failed in module `0` (Linear) on input float32[8, 63]",
        id="shape-mismatch",
    ),
    pytest.param(
        ["probe", "{models}:detached", "--input", "8x64"], "not differentiable", id="not-differentiable"
    ),
    pytest.param(
        ["probe", "{models}:stable", "--input", "8x64", "--init", "bogus"],
        "unknown initializer 'bogus'",
        id="unknown-init",
    ),
    pytest.param(["probe", "{evil}", "--input", "8x64"], "gradprobe refuses", id="pickle"),
    pytest.param(["probe", "{models}:stable", "--input", "int:8x64"], "needs a bound", id="bad-input-spec"),
    pytest.param(["probe", "{models}:stable"], "comes with no example inputs", id="no-inputs"),
    pytest.param(["probe"], "the following arguments are required: MODEL", id="argparse"),
]


def _fill(argv: list[str], tmp_path: Path, evil: Path) -> list[str]:
    return [a.format(models=MODELS, dir=tmp_path, evil=evil) for a in argv]


def _check_error_line(stderr: str, fragment: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gradprobe") and ": error: " in lines[0]
    assert fragment in lines[0] and "(hint: " in lines[0]


@pytest.mark.parametrize(("argv", "fragment"), ERRORS)
def test_errors_in_process(
    argv: list[str],
    fragment: str,
    tmp_path: Path,
    evil_pickle: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(_fill(argv, tmp_path, evil_pickle[0]))
    captured = capsys.readouterr()
    assert code == 2
    _check_error_line(captured.err, fragment)
    assert not evil_pickle[1].exists()


@pytest.mark.parametrize(("argv", "fragment"), ERRORS)
def test_errors_as_subprocess(
    argv: list[str], fragment: str, tmp_path: Path, evil_pickle: tuple[Path, Path]
) -> None:
    result = run_cli(_fill(argv, tmp_path, evil_pickle[0]))
    assert result.returncode == 2, result.stderr
    _check_error_line(result.stderr, fragment)
    assert not evil_pickle[1].exists()


def test_unknown_initializer_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from gradprobe.initializers import INITIALIZERS

    assert main(["probe", f"{MODELS}:stable", "--input", "8x64", "--init", "bogus"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in INITIALIZERS if name != "bogus")


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", f"{MODELS}:nope", "--input", "8x64", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("gradprobe: error: no factory")
    assert main(["--debug", "probe", f"{MODELS}:nope"]) == 2  # before the verb too
    assert "Traceback" in capsys.readouterr().err


def test_trusted_pickle_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    sys.path.insert(0, str(TESTS))
    try:
        import cli_models

        torch.save(cli_models.stable(), tmp_path / "full.pt")
    finally:
        sys.path.remove(str(TESTS))
    assert main(["probe", str(tmp_path / "full.pt"), "--input", "64x64"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert (
        main(["probe", str(tmp_path / "full.pt"), "--input", "64x64", "--trust-pickle", "--width", "120"])
        == 0
    )
    assert "verdict" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Verbs
# --------------------------------------------------------------------------------------------


def test_probe_writes_json_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradprobe.report import Report

    argv = ["probe", f"{MODELS}:unstable", "--input", "128x64", "--width", "120"]
    argv += ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    plots = pytest.importorskip("gradprobe.render.plots", reason="gradprobe.render.plots not available")
    assert plots is not None
    argv += ["--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0  # probe reports, it does not gate
    out = capsys.readouterr().out
    assert "verdict UNSTABLE" in out and "vanishing" in out and "→ " in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema"].startswith("gradprobe.report/") and data["verdict"] == "unstable"
    assert {"code", "severity", "layers", "message"} <= set(data["findings"][0])
    assert any(f["code"].startswith("vanishing") and f["severity"] == "error" for f in data["findings"])
    report = Report.from_json(tmp_path / "r.json")
    assert [x["name"] for x in data["layers"]] == [x.name for x in report.layers]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == len(report.layers) and rows[0]["name"] == "0" and rows[0]["type"] == "Linear"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_example_inputs_args_tokens_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", f"{MODELS}:with_inputs", "--width", "120", "--max-rows", "6"]) == 0
    out = capsys.readouterr().out
    assert "batch 128" in out and "more" in out
    argv = ["probe", f"{MODELS}:token_model", "--arg", "vocab=50", "--arg", "dim=16", "--width", "120"]
    argv += [
        "--input",
        "input_ids=int:8x12:vocab=50",
        "--input",
        "attention_mask=mask:8x12",
        "--init",
        "xavier_normal",
    ]
    argv += ["--seed", "3", "--loss", "ce", "--mode", "eval", "--dtype", "float64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TokenModel" in out and "Embedding" in out and "8×12×50" in out
    assert "init xavier_normal" in out and "seed 3" in out and "loss ce" in out and "mode eval" in out


def test_probe_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for name in ("a", "b"):
        argv = ["probe", f"{MODELS}:stable", "--input", "64x64", "--init", "kaiming_normal", "--seed", "5"]
        assert main([*argv, "--json", str(tmp_path / f"{name}.json")]) == 0
        data = json.loads((tmp_path / f"{name}.json").read_text())
        texts.append(json.dumps(data["layers"]))
    capsys.readouterr()
    assert texts[0] == texts[1]


def test_compare_ranks_initializers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", f"{MODELS}:mlp", "--arg", "depth=8", "--input", "128x64", "--width", "120"]
    argv += ["--inits", "normal:mean=0,std=0.01,kaiming_normal", "--json", str(tmp_path / "c.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "normal" in line]
    assert [r[1] for r in rows] == ["kaiming_normal", "normal:mean=0,std=0.01"]
    assert rows[0][2] == "stable" and rows[1][2] == "unstable"
    assert "best: kaiming_normal" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["inits"] == ["normal:mean=0,std=0.01", "kaiming_normal"] and len(data["reports"]) == 2
    assert main(["compare", f"{MODELS}:stable", "--input", "8x64", "--inits", "kaiming_normal,bogus"]) == 2
    assert "unknown initializer 'bogus'" in capsys.readouterr().err


def test_inits_lists_every_initializer(capsys: pytest.CaptureFixture[str]) -> None:
    from gradprobe.initializers import INITIALIZERS

    assert main(["inits", "--width", "200"]) == 0
    out = capsys.readouterr().out
    for key, value in INITIALIZERS.items():
        assert getattr(value, "name", key) in out
        assert str(getattr(value, "formula", "")).split("\n")[0][:20] in out


def test_demo_shows_the_finding_and_its_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--width", "120"]) == 0
    out = capsys.readouterr().out
    first, _, rest = out.partition("kaiming_normal (gain")
    assert "verdict UNSTABLE" in first and "vanishing" in first
    assert "verdict STABLE" in rest


# --------------------------------------------------------------------------------------------
# Edges: start-up, python -m
# --------------------------------------------------------------------------------------------


def test_help_imports_neither_torch_nor_rich() -> None:
    code = (
        "import sys, gradprobe.cli as cli\n"
        "cli.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'rich' not in sys.modules, 'rich imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_help_and_version_as_subprocess() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0 and "probe" in result.stdout and "check" in result.stdout
    for verb in ("probe", "compare", "check", "inits", "demo"):
        assert verb in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "gradprobe", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("gradprobe ")


def test_python_m_gradprobe_probes(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradprobe",
            "probe",
            f"{MODELS}:with_inputs",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "verdict" in result.stdout and json.loads((tmp_path / "r.json").read_text())["verdict"] == "stable"


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_pickle_is_never_loaded_even_with_other_options(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    assert main(["probe", str(path), "--input", "8x64", "--init", "kaiming_normal"]) == 2
    assert main(["check", str(path), "--input", "8x64"]) == 2
    assert not marker.exists()


def test_seeds_option_repeats_over_initializations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["probe", f"{MODELS}:unstable", "--input", "64x64", "--init", "xavier_normal", "--seeds", "3"]
    assert main([*argv, "--width", "120", "--json", str(tmp_path / "s.json")]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["meta"]["seeds"] == [0, 1, 2] and len(data["meta"]["seed_verdicts"]) == 3
    assert any("seeds" in layer["extra"] for layer in data["layers"])
    capsys.readouterr()
    assert main(["compare", f"{MODELS}:unstable", "--input", "64x64", "--inits", "xavier_normal,kaiming_normal", "--seeds", "2", "--json", str(tmp_path / "c.json")]) == 0
    capsys.readouterr()
    for bad in ("0", "two"):
        assert main([*argv[:-1], bad]) == 2
        err = capsys.readouterr().err
        assert "--seeds" in err and "whole number >= 1" in err and "Traceback" not in err


def test_a_factory_that_draws_from_the_global_rng_builds_the_same_model_for_the_same_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gradprobe.zoo:transformer makes its position embedding with torch.randn and no seed of its
    own: the CLI builds it with the global RNG seeded from --seed, so two runs agree, another seed
    differs, and the caller's global RNG state is unchanged."""
    import torch

    argv = ["probe", "gradprobe.zoo:transformer", "--arg", "depth=1", "--input", "int:4x16:vocab=100"]
    state = torch.get_rng_state()
    layers = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        assert main([*argv, "--seed", str(seed), "--json", str(tmp_path / f"{name}.json")]) == 0
        layers.append(json.loads((tmp_path / f"{name}.json").read_text())["layers"])
    capsys.readouterr()
    assert torch.equal(torch.get_rng_state(), state)
    assert layers[0] == layers[1] and layers[0] != layers[2]
