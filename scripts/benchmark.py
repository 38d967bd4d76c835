"""What does a probe cost, next to the forward and backward pass it observes?

Measures, in one process, with the methods interleaved within every repetition and medians
reported:

* **bare**: the forward and backward pass the probe itself runs (train mode, the probe's ``randn``
  cotangent, ``torch.autograd.grad`` over every parameter and the floating inputs), no hooks;
* **gradprobe**: ``gradprobe.probe(model, inputs, gate_check=False)``, the diagnosis included;
* **per-layer .item()**: the common per-layer pattern, a forward hook on every module gradprobe
  records that calls ``.item()`` per statistic (fastai's ``ActivationStats``: mean, std, near-zero
  fraction; mup's coordinate check and ``wandb.watch`` work the same way) around the same bare pass.

The passes the diagnosis adds only for suspicious cases are timed on their own (fewer repetitions)
and reported as a ratio to the bare pass: the **gate check** (``gate_check=True``: a few Adam steps
on a private copy of the parameters, then the passes again) and the **tracer pre-pass** (a no-grad
forward that finds each layer's activation before a non-``keep`` initializer runs).

Peak memory: on CPU the resident-set high-water mark (``VmHWM``) of fresh subprocesses per
configuration and method (the median of ``--memory-runs`` of them, default 3: the peak of the same
call moves by ~50 MiB between processes), each of which warms up (every method on a tiny model, so
that lazily imported modules weigh the same everywhere), builds the model, runs the method and
reports the peak, then runs it again and reports the peak after the second call (glibc's heap can
grow on a second call when freed blocks are fragmented); also the resident size before the first
call, so the increase can be compared. On CUDA ``torch.cuda.max_memory_allocated`` in process.

Run ``python scripts/benchmark.py --out DIR`` (``--quick`` for a smoke run with small models). It
prints a table and writes ``DIR/benchmark.json`` and ``DIR/benchmark.md``. Wall-clock times on a
shared machine are noisy: the load average before and after is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprobe import zoo
from gradprobe.hooks import select_modules, select_output
from gradprobe.probing import _Session, probe
from gradprobe.stats import kernel_info as stats_kernel_info

# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    title: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    target: float  # gradprobe / bare, from issue 6


CONFIGS: dict[str, Config] = {
    "mlp": Config(
        "(a) MLP 20×1024, batch 256",
        lambda: zoo.mlp(depth=20, width=1024),
        lambda g: torch.randn(256, 1024, generator=g),
        1.10,
    ),
    "resnet50": Config(
        "(b) ResNet-50-style, batch 32, 128²",
        lambda: zoo.resnet50_style(),
        lambda g: torch.randn(32, 3, 128, 128, generator=g),
        1.25,
    ),
    "transformer": Config(
        "(c) transformer 24×256, batch 8, seq 128",
        lambda: zoo.transformer(depth=24, d_model=256, max_len=128),
        lambda g: torch.randint(0, 100, (8, 128), generator=g),
        1.25,
    ),
}

QUICK: dict[str, Config] = {
    "mlp": Config("(a) MLP 4×128, batch 32", lambda: zoo.mlp(depth=4, width=128), lambda g: torch.randn(32, 128, generator=g), 1.10),
    "resnet50": Config(
        "(b) ResNet-50-style (1 block per stage, width 8), batch 2, 64²",
        lambda: zoo.resnet50_style(layers=(1, 1, 1, 1), width=8),
        lambda g: torch.randn(2, 3, 64, 64, generator=g),
        1.25,
    ),
    "transformer": Config(
        "(c) transformer 2×32, batch 2, seq 16",
        lambda: zoo.transformer(depth=2, d_model=32, max_len=16),
        lambda g: torch.randint(0, 100, (2, 16), generator=g),
        1.25,
    ),
}

METHODS = ("bare", "gradprobe", "per_layer")


def _setup(config: Config, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = config.build().to(device).train()
    x = config.inputs(torch.Generator().manual_seed(1)).to(device)
    return model, x


# --------------------------------------------------------------------------------------------
# the three methods
# --------------------------------------------------------------------------------------------


def bare_pass(model: nn.Module, x: torch.Tensor) -> None:
    """The probe's own forward and backward, without hooks or statistics."""
    inp = x.detach().requires_grad_(x.is_floating_point())
    out = select_output(model(inp))
    assert out is not None
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    loss = (out * v).sum() / math.sqrt(max(1, out[0].numel()))
    targets = [p for p in model.parameters() if p.requires_grad] + ([inp] if inp.requires_grad else [])
    torch.autograd.grad(loss, targets, allow_unused=True)


def gradprobe_pass(model: nn.Module, x: torch.Tensor) -> None:
    probe(model, x, gate_check=False)


def per_layer_pass(model: nn.Module, x: torch.Tensor) -> None:
    """fastai ActivationStats' hook (mean, std, near-zero fraction, each read with .item()) on every
    module gradprobe records, around the bare pass."""
    records: list[tuple[float, float, float]] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        o = select_output(output)
        if not isinstance(o, torch.Tensor) or not o.is_floating_point():
            return
        o = o.float().detach()
        records.append((o.mean().item(), o.std().item(), (o <= 0.05).long().sum().item() / o.numel()))

    handles = [m.register_forward_hook(hook) for m in select_modules(model).values()]
    try:
        bare_pass(model, x)
    finally:
        for h in handles:
            h.remove()


RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "bare": bare_pass,
    "gradprobe": gradprobe_pass,
    "per_layer": per_layer_pass,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartile (the two ends when there are fewer than 4 values)."""
    if len(values) < 4:
        return [min(values), max(values)]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    # Every method starts from a collected heap: Python's cyclic collector would otherwise run a full
    # (generation-2) pass, ~100 ms in this process, inside whichever call crossed its threshold, often
    # with garbage that an earlier method left. Each method still pays its own young-generation passes.
    gc.collect()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# the extra passes, timed on their own
# --------------------------------------------------------------------------------------------


def _method_time(method: str, call: Callable[[], object]) -> float:
    """Seconds spent inside ``_Session.<method>`` during ``call``."""
    original = getattr(_Session, method)
    spent = [0.0]

    def wrapped(self: _Session, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(_Session, method, wrapped)
    try:
        call()
    finally:
        setattr(_Session, method, original)
    return spent[0]


def breakdown(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds (median over ``repeats`` probes) spent in each part of ``probe(gate_check=False)``."""
    import gradprobe.diagnose as diagnosis
    import gradprobe.hooks as hooks
    import gradprobe.probing as probing
    import gradprobe.stats as stats

    # a label may take several parts (they add up)
    parts: list[tuple[Any, str, str]] = [
        (stats.DeviceMoments, "add", "activation and gradient statistics (hooks)"),
        (probing, "sums_of", "parameter and parameter-gradient sums"),  # as probing imported it
        (hooks, "sums_of", "parameter and parameter-gradient sums"),  # GradientSums, in the backward pass
        (_Session, "_weight_sums", "parameter and parameter-gradient sums"),  # weights and row sums, before
        (_Session, "_layers", "one transfer + building the report"),
        (_Session, "_keep_gradients", "symmetry analysis (gradprobe.diagnose.units)"),  # grouping, before the passes
        (_Session, "_attach_unit_analysis", "symmetry analysis (gradprobe.diagnose.units)"),
        (_Session, "_attach_predictions", "mean-field predictions (gradprobe.predict)"),
        (diagnosis, "diagnose", "diagnosis rules"),
    ]
    spent: dict[str, list[float]] = {label: [] for *_, label in parts}
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]
    totals = dict.fromkeys(spent, 0.0)

    def timed(original: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        return wrapper

    for _ in range(repeats):
        totals.update(dict.fromkeys(spent, 0.0))
        try:
            for (owner, name, original), (*_, label) in zip(originals, parts):
                setattr(owner, name, timed(original, label))
            probe(model, x, gate_check=False)
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)
        for label, value in totals.items():
            spent[label].append(value)
    return {label: statistics.median(values) for label, values in spent.items()}


def extra_passes(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    gate = [_method_time("_gate_check", lambda: probe(model, x, gate_check=True)) for _ in range(repeats)]
    tracer = [
        _method_time("_trace_activations", lambda: probe(model, x, init="kaiming_normal", gate_check=False))
        for _ in range(repeats)
    ]
    return {"gate_check_s": statistics.median(gate), "tracer_prepass_s": statistics.median(tracer)}


# --------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (now) or VmHWM (the resident high-water
    mark of this process image; ``ru_maxrss`` would not do: Linux carries it across ``exec`` from the
    parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def child(name: str, method: str, quick: bool, threads: int | None) -> None:
    """In a fresh process: build, run the method twice, report the RSS high-water mark (KiB)."""
    if threads:
        torch.set_num_threads(threads)
    # The same warm-up in every child, so that each method's peak carries the same imports (the
    # diagnosis loads its modules on first use): every method once on a tiny model.
    tiny, tiny_x = _setup(QUICK["mlp"], torch.device("cpu"))
    for runner in RUNNERS.values():
        runner(tiny, tiny_x)
    del tiny, tiny_x
    config = (QUICK if quick else CONFIGS)[name]
    model, x = _setup(config, torch.device("cpu"))
    before = _status_kib("VmRSS")
    RUNNERS[method](model, x)
    first = _status_kib("VmHWM")
    RUNNERS[method](model, x)
    print(json.dumps({"peak_kib": first, "repeat_peak_kib": _status_kib("VmHWM"), "before_kib": before}))


def peak_memory(
    name: str, method: str, quick: bool, threads: int | None, device: torch.device, runs: int = 3
) -> dict[str, Any]:
    if device.type == "cuda":
        config = (QUICK if quick else CONFIGS)[name]
        model, x = _setup(config, device)
        RUNNERS[method](model, x)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        RUNNERS[method](model, x)
        torch.cuda.synchronize(device)
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "before_mib": base / 2**20}
    command = [sys.executable, __file__, "--child", name, method] + (["--quick"] if quick else [])
    if threads:
        command += ["--threads", str(threads)]
    # The high-water mark of the same call moves by ~50 MiB between fresh processes (glibc's heap:
    # measured 452-500 MiB for the bare pass of (a)), so the median of several children is reported,
    # with every child's peak.
    results = []
    for _ in range(max(1, runs)):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median_mib(field: str) -> float:
        return statistics.median(r[field] for r in results) / 1024

    return {
        "peak_mib": median_mib("peak_kib"),
        "repeat_peak_mib": median_mib("repeat_peak_kib"),
        "before_mib": median_mib("before_kib"),
        "peaks_mib": [r["peak_kib"] / 1024 for r in results],
    }


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else CONFIGS
    names = args.configs or list(configs)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": str(device),
            "statistics": stats_kernel_info(),
        },
        "load_before": list(os.getloadavg()),
        "configs": {},
    }
    for name in names:
        config = configs[name]
        model, x = _setup(config, device)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for method in METHODS:  # warm-up: allocator, lazy imports, first-call dispatch
            RUNNERS[method](model, x)
        for repeat in range(args.repeats):
            # the order rotates, so that no method always runs first (cold caches) or last
            shift = repeat % len(METHODS)
            for method in METHODS[shift:] + METHODS[:shift]:
                times[method].append(_timed(functools.partial(RUNNERS[method], model, x), device))
        med = {m: statistics.median(v) for m, v in times.items()}
        # This VM's speed drifts by ±15% over seconds (the bare pass alone: 250-410 ms on (a) in
        # one run), so each repetition's ratio is taken against the bare pass of the same
        # repetition and the median of those ratios reported, with its quartiles.
        ratios = {m: [t / b for t, b in zip(times[m], times["bare"])] for m in METHODS}
        entry: dict[str, Any] = {
            "title": config.title,
            "target": config.target,
            "median_s": med,
            "all_s": times,
            "ratio": {m: statistics.median(r) for m, r in ratios.items()},
            "ratio_quartiles": {m: _quartiles(r) for m, r in ratios.items()},
        }
        overhead = (entry["ratio"]["gradprobe"] - 1.0) * med["bare"]
        pattern_overhead = (entry["ratio"]["per_layer"] - 1.0) * med["bare"]
        entry["overhead_vs_per_layer"] = overhead / pattern_overhead if pattern_overhead > 0 else math.inf
        if args.extra_repeats:
            entry["breakdown_s"] = breakdown(model, x, args.extra_repeats)
            entry["breakdown_ratio"] = {k: v / med["bare"] for k, v in entry["breakdown_s"].items()}
            extra = extra_passes(model, x, args.extra_repeats)
            entry["extra_s"] = extra
            entry["extra_ratio"] = {k: v / med["bare"] for k, v in extra.items()}
        if not args.no_memory:
            entry["memory"] = {
                m: peak_memory(name, m, args.quick, args.threads, device, args.memory_runs) for m in METHODS
            }
            mem = entry["memory"]
            entry["memory_ratio"] = mem["gradprobe"]["peak_mib"] / mem["bare"]["peak_mib"]
            grown = {m: mem[m]["peak_mib"] - mem[m]["before_mib"] for m in METHODS}
            entry["memory_increase_ratio"] = grown["gradprobe"] / grown["bare"] if grown["bare"] > 0 else math.inf
            if "repeat_peak_mib" in mem["bare"]:
                entry["memory_repeat_ratio"] = mem["gradprobe"]["repeat_peak_mib"] / mem["bare"]["repeat_peak_mib"]
        result["configs"][name] = entry
        print(_line(name, entry), flush=True)
        del model, x
    result["load_after"] = list(os.getloadavg())
    return result


def _line(name: str, e: dict[str, Any]) -> str:
    r = e["ratio"]
    text = f"{name}: bare {e['median_s']['bare'] * 1e3:.0f} ms, gradprobe {r['gradprobe']:.3f}x, per-layer {r['per_layer']:.3f}x"
    if "memory_ratio" in e:
        text += f", peak memory {e['memory_ratio']:.3f}x"
    return text


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    memory_unit = "max allocated" if m["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, "
        f"device {m['device']}, statistics by {m.get('statistics', 'PyTorch operations')}; "
        f"load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.1f}' for v in result['load_before'])}, after "
        f"{', '.join(f'{v:.1f}' for v in result['load_after'])}.",
        "",
        f"| model | bare fwd+bwd | gradprobe (quartiles) | target | per-layer `.item()` | overhead vs per-layer | "
        f"{memory_unit} bare → gradprobe | gate check (extra) | tracer pre-pass (extra) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["configs"].values():
        r = e["ratio"]
        mem = "–"
        if "memory" in e:
            mem = (
                f"{e['memory']['bare']['peak_mib']:.0f} → {e['memory']['gradprobe']['peak_mib']:.0f} MiB "
                f"({e['memory_ratio']:.2f}×; above the built model {e['memory_increase_ratio']:.2f}×"
                + (f"; second call {e['memory_repeat_ratio']:.2f}×" if "memory_repeat_ratio" in e else "")
                + ")"
            )
        extra = e.get("extra_ratio", {})
        q = e["ratio_quartiles"]["gradprobe"]
        lines.append(
            f"| {e['title']} | {e['median_s']['bare'] * 1e3:.0f} ms | **{r['gradprobe']:.2f}×** "
            f"({q[0]:.2f}–{q[1]:.2f}) | ≤ {e['target']:.2f}× "
            f"| {r['per_layer']:.2f}× | {e['overhead_vs_per_layer']:.2f} | {mem} "
            f"| {extra.get('gate_check_s', math.nan):.2f}× | {extra.get('tracer_prepass_s', math.nan):.2f}× |"
        )
    breakdowns = [e for e in result["configs"].values() if "breakdown_ratio" in e]
    if breakdowns:
        labels = list(breakdowns[0]["breakdown_ratio"])
        lines += ["", "Where gradprobe's time above the bare pass goes (share of the bare pass):", ""]
        lines += ["| part | " + " | ".join(e["title"].split(",")[0] for e in breakdowns) + " |"]
        lines += ["|---|" + "---:|" * len(breakdowns)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(f"{e['breakdown_ratio'][label]:.1%}" for e in breakdowns) + " |")
        lines.append(
            "| other (hook calls, tensor hooks, parameter swap, setup; by difference) | "
            + " | ".join(
                f"{e['ratio']['gradprobe'] - 1 - sum(e['breakdown_ratio'].values()):.1%}" for e in breakdowns
            )
            + " |"
        )
        lines.append(
            "| total above bare | " + " | ".join(f"{e['ratio']['gradprobe'] - 1:.1%}" for e in breakdowns) + " |"
        )
    lines += [
        "",
        "Ratios are medians over interleaved repetitions (the order of the methods rotates) of each "
        "repetition's time over the bare pass of the same repetition; quartiles in brackets. "
        "*Overhead vs per-layer*: "
        "(gradprobe − bare) / (per-layer − bare); the target on (b) is ≤ 0.5. The extra passes run only "
        "when the diagnosis asks for them (a suspiciously small gradient; a non-`keep` initializer).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmark-results", help="directory for benchmark.json and .md")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="default: all")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repetitions (medians)")
    parser.add_argument("--extra-repeats", type=int, default=3, help="repetitions of the extra passes (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--memory-runs", type=int, default=3, help="fresh processes per method for peak memory (median; default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.quick, args.threads)
        return 0
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "benchmark.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
