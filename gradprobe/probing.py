"""``probe()``: initialise, run forward and backward, record per-layer statistics, restore → Report.

How the user's model stays exactly as it was, without a copy of the model:

* The initializer never writes into the user's parameters. The probe creates one new tensor per
  distinct parameter (shared parameters stay shared), swaps them into the modules'
  ``_parameters`` for the duration of the run, initialises *them*, and swaps the originals back in a
  ``finally``. Buffers are swapped for clones the same way, so BatchNorm's running statistics and
  ``num_batches_tracked`` are untouched. Under ``init="keep"`` the user's own parameters are used
  (read only) and only buffers are swapped.
* Gradients come from ``torch.autograd.grad``, never ``.backward()``, so no ``.grad`` is touched.
* Every module's ``training`` flag, the global torch/CUDA/numpy/python RNG states, and the hooks are
  restored or removed in ``finally`` blocks, also when the model raises midway.

Memory: the activations of one batch (as in any forward/backward), one set of new parameters when
the init is not ``keep``, one float64 scratch buffer of 16 MiB, and per-unit running moments.
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradprobe.distributed import any_rank, check_supported
from gradprobe.errors import GradprobeError, ProbeError, UsageError
from gradprobe.hooks import (
    ActivationTracer,
    GradientSums,
    ModuleState,
    Recorder,
    describe_inputs,
    failure_context,
    select_modules,
    select_output,
)
from gradprobe.report import LayerRecord, ParamRecord, Report, TensorStats
from gradprobe.rng import stream_seed
from gradprobe.stats import DeviceMoments, Scratch, sums_and_row_sums, sums_of

__all__ = ["probe", "ProbeConfig", "LOSSES", "Batch", "Inputs"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]
# Parameter statistics of one run: a (rows, 3) float64 tensor [Σw, Σw², ‖∇‖² or −1] (None when no
# recorded module owns a parameter) and each recorded module's rows in it.
ParamTable = tuple["torch.Tensor | None", dict[str, list[int]]]

LOSSES = ("randn", "mse", "ce")


@dataclass(frozen=True)
class ProbeConfig:
    """Options of one probe (see :func:`probe` for their meaning)."""

    init: Any = "keep"  # initializer spec: a name, "name:key=value", or an Initializer
    overrides: Mapping[str, Any] | None = None  # module-name glob → initializer spec
    loss: str | Callable[[Any], torch.Tensor] = "randn"  # how the backward pass is seeded
    seed: int = 0  # seeds the initializer, the loss cotangent/targets and dropout
    output: str | int | Callable[[Any], Any] | None = None  # which part of the output the loss uses
    include: Sequence[Any] | None = None  # extra modules (containers) to record, by glob or type
    exclude: Sequence[Any] | None = None  # modules not to record, by glob or type
    mode: str = "train"  # "train" (BatchNorm batch statistics, dropout on) or "eval"
    device: str | torch.device | None = None  # run on this device (the model itself is not moved)
    saturation_derivative: float = 0.1  # saturated where φ′(z)/φ′(0) is below this
    gate_check: bool | None = None  # None: only when some gradient is zero or far below the output's
    gate_steps: int = 3  # Adam steps on the probe's own copy of the parameters
    gate_lr: float = 1e-3  # Adam's step: moves a zero gate by about this much per step
    gate_ratio: float = 1e-8  # a layer's gradient energy below this × the largest triggers the check
    histograms: bool = False  # bounded histograms of activations and gradients (a few more passes)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Inputs):
        return tuple(item.args), dict(item.kwargs)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, Mapping):
        return (), dict(item)
    raise UsageError(
        f"cannot use a {type(item).__name__} as model input",
        hint="pass a tensor, a tuple of positional arguments, a dict of keyword arguments, or a list of those",
    )


class Inputs:
    """One batch given as positional *and* keyword arguments: ``Inputs(x, attention_mask=m)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Inputs({describe_inputs(self.args, self.kwargs)})"


class Batches(list):  # type: ignore[type-arg]
    """Batches already in ``(args, kwargs)`` form (passed through :func:`normalize_batches` as is)."""


def normalize_batches(inputs: Any) -> list[Batch]:
    """A tensor, tuple (positional args) or dict (keyword args) is one batch; any other iterable
    (a list, a generator, a DataLoader) yields several batches, each of those forms."""
    if isinstance(inputs, Batches):
        return list(inputs)
    if isinstance(inputs, (torch.Tensor, tuple, Mapping, Inputs)):
        return [_as_batch(inputs)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        batches = [_as_batch(b) for b in inputs]
        if not batches:
            raise UsageError("no input batches given", hint="pass at least one tensor, tuple or dict")
        return batches
    return [_as_batch(inputs)]


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _loss_value(loss: Any, raw_output: Any, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The scalar whose gradient the probe records.

    * ``"randn"`` (default): ``L = Σ v ⊙ y / √D`` with ``v ~ N(0, 1)`` of the output's shape and
      ``D`` the output elements per sample (all but the first dimension). Each sample's output
      gradient then has unit energy whatever the output size, so gradient statistics measure the
      network's own backward scaling from a fixed starting point.
    * ``"mse"``: ``F.mse_loss(y, t)`` (mean over elements) against a random target ``t ~ N(0, 1)``.
    * ``"ce"``: ``F.cross_entropy`` (mean over samples) over the *last* dimension of the output with
      class targets drawn uniformly at random.
    * a callable: ``loss(output)`` on the model's full raw output, returning a scalar tensor.
    """
    if callable(loss):
        value = loss(raw_output)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise UsageError("a loss callable must return a scalar tensor")
        return value.reshape(())
    y = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if loss == "randn":
        v = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
        per_sample = y.numel() // y.shape[0] if y.dim() >= 1 and y.shape[0] else max(1, y.numel())
        return (y * v).sum() / math.sqrt(max(1, per_sample))
    if loss == "mse":
        t = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
        return torch.nn.functional.mse_loss(y, t)
    if loss == "ce":
        if y.dim() < 1 or y.shape[-1] < 2:
            raise UsageError(
                f"loss 'ce' needs class scores in the last dimension; the output has shape {list(y.shape)}"
            )
        classes = y.shape[-1]
        flat = y.reshape(-1, classes)
        t = torch.randint(0, classes, (flat.shape[0],), generator=generator).to(y.device)
        return torch.nn.functional.cross_entropy(flat, t)
    raise UsageError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)} or a callable output -> scalar")


# --------------------------------------------------------------------------------------------
# State that must come back exactly
# --------------------------------------------------------------------------------------------


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global generator the model draws from on the probe's ``device`` (dropout masks, a
    module's own ``reset_parameters``). On the CPU only the CPU's: ``torch.manual_seed`` would also seed
    every accelerator's, and with CUDA present but not initialised that queues a lazy call holding a
    formatted Python stack (~0.5 ms a call) that outlives the probe (:func:`preserved_global_state`
    restores initialised generators only)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_global_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag and all global RNG states on exit."""
    flags = [(m, m.training) for m in model.modules()]
    torch_rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


@contextlib.contextmanager
def swapped(
    model: nn.Module,
    params: Mapping[int, nn.Parameter] | None,
    buffers: Mapping[int, torch.Tensor] | None,
) -> Iterator[None]:
    """Temporarily replace parameters and buffers (by identity of the original) in every module."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    rnns: list[nn.Module] = []
    try:
        for module in model.modules():
            for table, mapping in ((module._parameters, params), (module._buffers, buffers)):
                if not mapping:
                    continue
                for name, value in list(table.items()):
                    if value is not None and id(value) in mapping:
                        saved.append((table, name, value))
                        table[name] = mapping[id(value)]
            if isinstance(module, nn.RNNBase):
                rnns.append(module)
                module._init_flat_weights()
        yield
    finally:
        for table, name, value in reversed(saved):
            table[name] = value
        for module in rnns:
            module._init_flat_weights()


def unwrap(model: Any) -> nn.Module:
    """Probe the module inside DDP/DataParallel wrappers and ``torch.compile`` results."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module
            if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
            else None
        )
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


def probe(
    model: nn.Module,
    inputs: Any,
    *,
    init: Any = "keep",
    loss: str | Callable[[Any], torch.Tensor] = "randn",
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    output: str | int | Callable[[Any], Any] | None = None,
    include: Sequence[Any] | None = None,
    exclude: Sequence[Any] | None = None,
    mode: str = "train",
    device: str | torch.device | None = None,
    saturation_derivative: float = 0.1,
    diagnose: bool = True,
    thresholds: Mapping[str, Any] | None = None,
    suggest: bool = False,
    gate_check: bool | None = None,
    gate_steps: int = 3,
    gate_lr: float = 1e-3,
    histograms: bool = False,
    seeds: int = 1,
) -> Report:
    """Run ``model`` forward and backward under an initializer and record per-layer statistics.

    Args:
        model: any ``nn.Module`` (DDP/DataParallel wrappers and ``torch.compile`` results are
            unwrapped; the module itself is probed eagerly). It is left exactly as it was.
        inputs: a tensor, a tuple (positional arguments), a dict (keyword arguments),
            ``Inputs(*args, **kwargs)`` (both), or a list or other iterable of those (several batches, merged into one set of statistics). Floating
            inputs are fed as fresh leaves that require grad, so every layer gets a gradient.
        init: initializer name or spec (``"kaiming_normal"``, ``"normal:std=0.02"``), or an
            :class:`~gradprobe.initializers.Initializer`; ``"keep"`` probes the weights as built.
        loss: ``"randn"``, ``"mse"``, ``"ce"`` or a callable ``output -> scalar`` (see
            :func:`_loss_value` for exactly what each computes).
        seed: seeds the initializer, the loss's random cotangent/targets and dropout.
        overrides: ``{module-name glob: init spec}``, e.g. ``{"head": "zeros"}``.
        output: which part of a tuple/dict/dataclass output the built-in losses use (key,
            attribute, index or callable); by default ``logits`` if present, else the first floating
            tensor.
        include, exclude: module-name globs or module types to add (containers) or drop.
        mode: ``"train"`` or ``"eval"`` for the duration of the probe.
        device: probe on this device; parameters and buffers are created there and the model
            itself is not moved.
        saturation_derivative: an activation is saturated where φ′(z)/φ′(0) is below this.
        diagnose: run :func:`gradprobe.diagnose` and fill ``report.findings`` and ``verdict``.
        thresholds: options passed to the diagnosis.
        suggest: when the verdict is unstable, probe again with the suggested initializer and
            record in ``report.meta["suggestion"]`` whether it then passes.
        gate_check: a layer whose gradient is exactly zero or tiny may sit behind a zero gate (a
            zero-init head, zero-γ, ReZero α = 0) rather than vanish. The check takes
            ``gate_steps`` Adam steps (learning rate ``gate_lr``) on the probe's *own copy* of the
            parameters and measures again, storing ``layer.extra["after_steps"]`` and
            ``report.meta["gate_check"]``. None (default) runs it only when some layer's gradient
            energy is zero or below 1e-8 of the largest; True always; False never.
        seeds: probe under ``seeds`` initializations (``seed``, ``seed + 1``, …) and combine them
            (:func:`gradprobe.seeds.combine_seeds`): each layer's gain as mean and spread in
            ``layer.extra["seeds"]``, errors only where they occur in at least half the seeds.
        histograms: also collect bounded histograms (fixed signed log-magnitude bins, see
            :func:`gradprobe.stats.histogram_edges`) of every activation and gradient, in
            ``layer.act.moments.histogram``; costs a few more passes per tensor.

    Returns:
        a :class:`~gradprobe.report.Report`.

    >>> import torch, gradprobe
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = gradprobe.probe(net, torch.randn(16, 8), init="kaiming_normal", diagnose=False)
    >>> [layer.name for layer in report.layers]
    ['0', '1', '2']
    >>> report["1"].activation is None and report["0"].activation
    'relu'
    """
    from gradprobe.initializers import InitPlan

    # The options every re-probe (per seed, or with the suggested initializer) passes on.
    options: dict[str, Any] = dict(
        init=init,
        loss=loss,
        overrides=overrides,
        output=output,
        include=include,
        exclude=exclude,
        mode=mode,
        device=device,
        saturation_derivative=saturation_derivative,
        diagnose=diagnose,
        thresholds=thresholds,
        gate_check=gate_check,
        gate_steps=gate_steps,
        gate_lr=gate_lr,
        histograms=histograms,
    )
    if seeds != 1:
        if not isinstance(seeds, int) or seeds < 1:
            raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
        from gradprobe.seeds import combine_seeds

        batches = normalize_batches(inputs)  # an iterator of batches is read once
        combined = combine_seeds(
            [probe(model, Batches(batches), seed=seed + i, **options) for i in range(seeds)]
        )
        if suggest and combined.verdict == "unstable":
            _check_suggestion(combined, model, Batches(batches), seed=seed, options=options)
        return combined
    if mode not in ("train", "eval"):
        raise UsageError(f"unknown mode {mode!r}; valid: train, eval")
    if not (isinstance(loss, str) and loss in LOSSES) and not callable(loss):
        raise UsageError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)} or a callable output -> scalar")
    cfg = ProbeConfig(
        init=init,
        overrides=overrides,
        loss=loss,
        seed=seed,
        output=output,
        include=include,
        exclude=exclude,
        mode=mode,
        device=device,
        saturation_derivative=saturation_derivative,
        gate_check=gate_check,
        gate_steps=gate_steps,
        gate_lr=gate_lr,
        histograms=histograms,
    )
    plan = InitPlan.from_spec(init, overrides)
    model = unwrap(model)
    batches = normalize_batches(inputs)
    with preserved_global_state(model):
        session = _Session(model, plan, cfg)
        report = session.run(batches)
    report = _merge_across_ranks(report)
    if diagnose:
        from gradprobe.diagnose import diagnose as run_diagnosis

        report.findings = run_diagnosis(report, **dict(thresholds or {}))
        report.verdict = "unstable" if any(f.severity == "error" for f in report.findings) else "stable"
        if suggest and report.verdict == "unstable":
            _check_suggestion(report, model, Batches(batches), seed=seed, options=options)
    return report


def _check_suggestion(
    report: Report, model: nn.Module, batches: Batches, *, seed: int, options: dict[str, Any]
) -> None:
    """Probe again with the suggested initializer; record in ``meta["suggestion"]`` whether it passes."""
    from gradprobe.diagnose import suggested_init

    fix = suggested_init(report)
    if fix is None:
        return
    options = {k: v for k, v in options.items() if k not in ("init", "overrides", "diagnose")}
    again = probe(model, batches, init=fix, seed=seed, **options)
    report.meta["suggestion"] = {
        "init": fix,
        "verdict": again.verdict,
        "errors": sorted({f.code for f in again.findings if f.severity == "error"}),
    }


def _merge_across_ranks(report: Report) -> Report:
    """Inside ``torch.distributed``, merge every rank's statistics exactly (see gradprobe.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return report
    from gradprobe.distributed import merge_across_ranks

    return merge_across_ranks(report)


@dataclass
class _WeightSums:
    """Σw and Σw² of the recorded modules' parameters, and every weight matrix's row sums (the
    symmetry analysis's unit fingerprints), taken in one read of the weights before the passes."""

    position: dict[int, int]  # id(parameter used) → its row in `sums`
    sums: torch.Tensor  # (k, 2) float64: Σw, Σw²
    rows: dict[int, torch.Tensor]  # id(parameter used) → float64 Σ of each of its rows (dim 0)


class _Session:
    """One probe run: parameters, buffers, hooks and the passes over the batches."""

    def __init__(self, model: nn.Module, plan: Any, cfg: ProbeConfig) -> None:
        self.model = model
        self.plan = plan
        self.cfg = cfg
        self.device = torch.device(cfg.device) if cfg.device is not None else _model_device(model)
        self.modules = select_modules(model, cfg.include, cfg.exclude)
        self.keep = plan.is_keep and self.device == _model_device(model)
        # [distributed] FSDP2/DTensor-sharded parameters: probe as built only (gradprobe.distributed)
        self.sharded = check_supported(model, keep=self.keep)
        self.activations: dict[str, tuple[str, float | None]] = {}
        self.gains: dict[str, float] = {}
        self.init_desc: dict[str, str] = {}
        self._unit_groups: Any = None  # gradprobe.diagnose.units.UnitGroups, from the weights before the passes

    # -- parameters and buffers ---------------------------------------------------------------
    def _new_tensors(self) -> tuple[dict[int, nn.Parameter] | None, dict[int, torch.Tensor]]:
        buffers: dict[int, torch.Tensor] = {}
        for b in self.model.buffers():
            if id(b) not in buffers:
                buffers[id(b)] = b.detach().to(self.device, copy=True)
        if self.keep:
            return None, buffers
        params: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for p in self.model.parameters():
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(
                        p.detach().to(self.device, copy=True), requires_grad=p.requires_grad
                    )
        return params, buffers

    def _initialise(
        self,
        params: dict[int, nn.Parameter] | None,
        buffers: dict[int, torch.Tensor],
        batch: Batch | None = None,
    ) -> list[str]:
        """Apply the plan to the new parameters; return modules whose parameters were kept as built.

        A data-dependent initializer (``data_dependent = True``, e.g. LSUV) first initialises each of
        its modules like any other, then gets ``init_with_data_(model, modules, forward)`` while the
        new parameters are swapped in: ``forward()`` runs the model on the first batch without
        gradients (on buffer clones) and returns its output.
        """
        kept: list[str] = []
        if params is None:
            for name, module in self.model.named_modules():
                if any(p is not None for p in module._parameters.values()):
                    self.init_desc[name or "model"] = "keep"
            return kept
        # streams derived from the seed, never the seed itself (gradprobe.rng: no clash with inputs
        # the user drew from a generator seeded with the same number)
        generator = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "init"))
        # `default` uses each module's reset_parameters and the global RNG
        seed_global_rng(stream_seed(self.cfg.seed, "default-init"), self.device)
        from gradprobe.initializers import set_norm_scale_
        from gradprobe.theory import activation_gain

        with swapped(self.model, params, buffers):
            for raw, module in self.model.named_modules():
                name = raw or "model"
                if not any(p is not None for p in module._parameters.values()):
                    continue
                initializer, explicit = self.plan.match(name)
                act = self.activations.get(name)
                gain = activation_gain(act[0], act[1]) if act is not None else 1.0
                self.gains[name] = gain
                try:
                    handled = initializer.init_module_(module, gain=gain, generator=generator)
                    # an override that names a normalization layer sets its scale (zeros: the
                    # zero-γ recipe); the default init leaves norms at the identity
                    scale = initializer.norm_scale() if explicit and handled else None
                    if scale is not None:
                        set_norm_scale_(module, scale)
                except GradprobeError:
                    raise
                except Exception as e:  # an initializer that cannot handle this shape
                    raise ProbeError(
                        f"initializer {initializer.describe()} failed on module `{name}` ({type(module).__name__}): {e}"
                    ) from e
                if handled:
                    self.init_desc[name] = initializer.describe()
                else:
                    self.init_desc[name] = "kept as built"
                    kept.append(name)
            for module in self.model.modules():
                if isinstance(module, nn.RNNBase):
                    module._init_flat_weights()
            self._data_dependent(batch)
        return kept

    def _data_dependent(self, batch: Batch | None) -> None:
        groups: dict[int, tuple[Any, dict[str, nn.Module]]] = {}
        for raw, module in self.model.named_modules():
            name = raw or "model"
            if not any(p is not None for p in module._parameters.values()):
                continue
            initializer = self.plan.for_module(name)
            if getattr(initializer, "data_dependent", False) and self.init_desc.get(name) != "kept as built":
                groups.setdefault(id(initializer), (initializer, {}))[1][name] = module
        if not groups or batch is None:
            return

        def forward() -> Any:
            with torch.no_grad():
                return self._forward(None, batch)

        # the dropout stream the passes will use, so that a data-dependent initializer replaying its
        # first RNG state (LSUV) calibrates on the very masks the probe then measures
        seed_global_rng(stream_seed(self.cfg.seed, "dropout"), self.device)

        for initializer, modules in groups.values():
            initializer.init_with_data_(self.model, modules, forward)

    # -- running ------------------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> Batch:
        args, kwargs = batch

        def leaf(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            if t.is_floating_point():
                return t.detach().requires_grad_(True)
            return t

        return _map_tensors(args, leaf), _map_tensors(kwargs, leaf)

    def _forward(self, recorder: Recorder | None, batch: Batch) -> Any:
        args, kwargs = batch
        try:
            return self.model(*args, **kwargs)
        except GradprobeError:
            raise
        except Exception as e:
            where, seen = failure_context(self.model, e)
            if where is None or where == "model":
                where_text = f"in the model's forward ({type(self.model).__name__})"
                seen = seen or describe_inputs(args, kwargs)
            else:
                module = dict(self.model.named_modules()).get(where)
                where_text = f"in module `{where}` ({type(module).__name__})"
            done = f" after {recorder.completed} module calls completed" if recorder is not None else ""
            raise ProbeError(
                f"forward failed {where_text} on input {seen}{done}: {type(e).__name__}: {e}",
                hint="check the input shape and dtype (--input) against what the model expects",
            ) from e

    def _trace_activations(
        self, batch: Batch, buffers: dict[int, torch.Tensor], params: dict[int, nn.Parameter] | None = None
    ) -> None:
        tracer = ActivationTracer(self.model)
        # [device] the new parameters (still copies of the originals) live on the probe's device
        with swapped(self.model, params, buffers), torch.no_grad(), tracer.attached():
            self._forward(None, batch)
        self.activations = dict(tracer.found)

    def run(self, batches: list[Batch]) -> Report:
        self.model.train(self.cfg.mode == "train")
        params, buffers = self._new_tensors()
        prepared = [self._prepare(b) for b in batches]
        fresh_buffers = {k: v.clone() for k, v in buffers.items()}
        if not self.keep:
            # Gains depend on which activation follows each layer: trace a forward pass first.
            self._trace_activations(prepared[0], fresh_buffers, params)
            fresh_buffers = {k: v.clone() for k, v in buffers.items()}
        kept = self._initialise(params, fresh_buffers, prepared[0])
        # [perf] one read of the weights for their sums and the unit fingerprints (no host sync)
        weights = None if self.sharded else self._weight_sums(params)
        # the symmetry analysis reads a few gradients: find which, from the weights, before the passes
        needed = set() if self.sharded else self._keep_gradients(params, weights)
        states, param_stats, grads = self._passes(
            prepared, params, buffers, exact_nonfinite=False, keep=needed, weights=weights
        )
        layers = self._layers(states, param_stats)
        if any_rank(  # [distributed] every rank or none re-runs: under FSDP2 a forward is a collective
            any(x.act is not None and x.act.moments.nonfinite_units for x in layers)
            or any(x.grad is not None and x.grad.moments.nonfinite_units for x in layers)
        ):
            # Rare: count non-finite values exactly and check module inputs, in a second identical pass.
            states, param_stats, grads = self._passes(
                prepared, params, buffers, exact_nonfinite=True, keep=needed, weights=weights
            )
            layers = self._layers(states, param_stats)
            for layer in layers:
                layer.extra["inputs_finite"] = states[layer.name].inputs_finite
        meta = self._meta(batches, kept)
        report = Report(layers=layers, meta=meta)
        if self.sharded:  # [distributed] both need whole weight matrices (gradprobe.distributed)
            report.meta["sharded"] = {"skipped": ["gate_check", "symmetry", "parameter_gradients"]}
        else:
            if self._wants_gate_check(layers):
                self._gate_check(report, prepared, params, buffers)
            self._attach_unit_analysis(report, params, grads)
        self._attach_predictions(report)
        return report

    def _attach_predictions(self, report: Report) -> None:
        """Mean-field predictions next to the measurements (``layer.predicted_act_var`` …)."""
        try:
            from gradprobe.predict import attach_predictions
        except ImportError:  # the predictions module is optional
            return
        attach_predictions(report)

    def _wants_gate_check(self, layers: list[LayerRecord]) -> bool:
        if self.cfg.gate_check is not None:
            return self.cfg.gate_check
        energies = [x.grad.energy for x in layers if x.grad is not None]
        finite = [e for e in energies if math.isfinite(e)]
        if not finite or len(finite) < len(energies):
            return False  # nothing to compare, or non-finite values: a different problem
        top = max(finite)
        return top > 0 and any(e == 0 or e < self.cfg.gate_ratio * top for e in finite)

    def _gate_check(
        self,
        report: Report,
        prepared: list[Batch],
        params: dict[int, nn.Parameter] | None,
        buffers: dict[int, torch.Tensor],
    ) -> None:
        """A few Adam steps on a private copy of the parameters, then measure again.

        Signal held back by a zero or small multiplicative gate (zero-init head, zero-γ, ReZero α=0,
        LayerScale) starts to flow after a step or two; signal that truly vanishes does not.
        """
        steps: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for p in self.model.parameters():
                if id(p) not in steps:
                    src = p if params is None else params[id(p)]
                    steps[id(p)] = nn.Parameter(
                        src.detach().to(self.device, copy=True), requires_grad=p.requires_grad
                    )
        trainable = list({id(q): q for q in steps.values() if q.requires_grad}.values())
        if not trainable:
            return
        # Adam written out (Kingma & Ba 2015, β = (0.9, 0.999), ε = 1e-8): torch.optim's first use
        # imports torch._dynamo, seconds of start-up for three small steps.
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        first = [torch.zeros_like(q) for q in trainable]
        second = [torch.zeros_like(q) for q in trainable]
        loss_gen = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "gate-loss"))
        seed_global_rng(stream_seed(self.cfg.seed, "dropout"), self.device)
        step_buffers = {k: v.clone() for k, v in buffers.items()}
        with swapped(self.model, steps, step_buffers):
            for i in range(self.cfg.gate_steps):
                batch = prepared[i % len(prepared)]
                raw = self._forward(None, batch)
                out = select_output(raw, self.cfg.output)
                assert out is not None
                value = _loss_value(self.cfg.loss, raw, out, loss_gen)
                grads = torch.autograd.grad(value, trainable, allow_unused=True)
                t = i + 1
                with torch.no_grad():
                    for q, g, m, v in zip(trainable, grads, first, second):
                        if g is None:
                            continue
                        m.mul_(beta1).add_(g, alpha=1 - beta1)
                        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                        step = m / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt_().add_(eps))
                        q.sub_(step, alpha=self.cfg.gate_lr)
        states, param_stats, _ = self._passes(prepared, steps, buffers, exact_nonfinite=False)
        after = {x.name: x for x in self._layers(states, param_stats)}
        for layer in report.layers:
            a = after.get(layer.name)
            if a is None:
                continue
            layer.extra["after_steps"] = {
                "act_var": a.act_var,
                "signal_var": None if a.act is None else a.act.signal_var,
                "grad_var": a.grad_var,
                "grad_energy": None if a.grad is None else a.grad.energy,
            }
        report.meta["gate_check"] = {
            "steps": self.cfg.gate_steps,
            "lr": self.cfg.gate_lr,
            "optimizer": "adam",
        }

    def _passes(
        self,
        prepared: list[Batch],
        params: dict[int, nn.Parameter] | None,
        buffers: dict[int, torch.Tensor],
        *,
        exact_nonfinite: bool,
        keep: Iterable[int] = (),
        weights: _WeightSums | None = None,
    ) -> tuple[dict[str, ModuleState], ParamTable, dict[int, torch.Tensor]]:
        """Forward and backward over the batches with the recorder attached.

        Returns the recorder's states, the parameter table and the last batch's gradients of the
        parameters in ``keep`` (ids; those the symmetry analysis reads: :meth:`_keep_gradients`) and
        of any parameter without a hook; every other gradient is summed as autograd produces it and
        let go (:class:`~gradprobe.hooks.GradientSums`). ``weights``: the parameters' sums taken
        before the passes (:meth:`_weight_sums`, of these ``params``); the ones it lacks are read here.
        """
        seed_global_rng(stream_seed(self.cfg.seed, "dropout"), self.device)  # dropout: the same masks every time
        loss_gen = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "loss"))
        run_buffers = {k: v.clone() for k, v in buffers.items()}
        trainable: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in self.model.parameters():
            q = p if params is None else params[id(p)]
            if q.requires_grad and id(q) not in seen:
                seen.add(id(q))
                trainable.append(q)
        last_grads: dict[int, torch.Tensor] = {}
        with_gradient: set[int] = set()  # ids of the parameters that got a gradient
        recorder = Recorder(
            self.model,
            self.modules,
            saturation_ratio=self.cfg.saturation_derivative,
            exact_nonfinite=exact_nonfinite,
            histograms=self.cfg.histograms,
        )
        tracer = ActivationTracer(self.model) if self.keep and not exact_nonfinite else None
        # [perf] every gradient summed as it is made and let go, as a bare pass cannot: it returns them
        # all (no hooks on DTensor shards: those are summed below, across their mesh)
        gradient_sums = GradientSums(trainable, recorder.scratch, hooks=not self.sharded)
        gradient_sums.keep = set(keep)
        with swapped(self.model, params, run_buffers), recorder, gradient_sums:
            for batch in prepared:
                with tracer.attached() if tracer is not None else contextlib.nullcontext():
                    raw = self._forward(recorder, batch)
                out = select_output(raw, self.cfg.output)
                if out is None or not out.is_floating_point():
                    raise ProbeError(
                        f"the model's output ({type(raw).__name__}) has no floating-point tensor to back-propagate from",
                        hint="pass output=<key or index> to pick one, or a loss callable",
                    )
                value = _loss_value(self.cfg.loss, raw, out, loss_gen)
                float_inputs = [t for t in _leaves_of(batch) if t.requires_grad]
                targets = trainable + float_inputs
                if not value.requires_grad or not targets:
                    raise ProbeError(
                        "the output is not differentiable: no parameter or floating input requires grad",
                        hint="check that the model's parameters require grad and its forward does not detach",
                    )
                try:
                    grads = torch.autograd.grad(value, targets, allow_unused=True)
                except RuntimeError as e:
                    raise ProbeError(f"backward failed: {e}") from e
                for i, g in enumerate(grads[: len(trainable)]):
                    if g is None:
                        continue
                    q = trainable[i]
                    with_gradient.add(id(q))
                    if i not in gradient_sums.taken:  # no hook took it: summed with what is queued
                        gradient_sums.add(i, g)
                        last_grads[id(q)] = g
                    elif id(q) in gradient_sums.keep:
                        last_grads[id(q)] = g  # (the others are zero-strided stand-ins)
                # [perf] Σg² of what is left in one kernel call (gradprobe.stats.sums_of); no host sync
                gradient_sums.flush()
            if tracer is not None:
                self.activations = dict(tracer.found)
        grad_sq = gradient_sums.sums  # Σ over the batches of ‖∇‖² per trainable parameter (None: no gradient)
        # Parameter statistics: one (rows, 3) float64 table [Σw, Σw², ‖∇‖² or −1], a row per parameter of
        # each recorded module, transferred with everything else (divided by the size on the host).
        index = {id(q): i for i, q in enumerate(trainable)}
        unique: dict[int, int] = {}  # id(parameter) → its position in `tensors`
        tensors: list[torch.Tensor] = []
        weight_rows: list[int] = []  # per table row: the parameter's position in `tensors`
        grad_rows: list[int] = []  # per table row: its position in grad_sq, or len(trainable) (none)
        rows_of: dict[str, list[int]] = {}
        for raw_name, module in self.model.named_modules():
            name = raw_name or "model"
            if name not in recorder.states:
                continue
            for p in module._parameters.values():
                if p is None:
                    continue
                q = p if params is None else params[id(p)]
                if id(q) not in unique:
                    unique[id(q)] = len(tensors)
                    tensors.append(q)
                rows_of.setdefault(name, []).append(len(weight_rows))
                weight_rows.append(unique[id(q)])
                position = index.get(id(q))
                grad_rows.append(position if position is not None and id(q) in with_gradient else len(trainable))
        table = None
        if tensors:
            if weights is not None and all(id(q) in weights.position for q in tensors):
                sums, weight_rows = weights.sums, [weights.position[id(tensors[i])] for i in weight_rows]
            else:  # [perf] exact float64 [Σw, Σw²] of every parameter in one kernel call; no host sync
                sums = sums_of(tensors, recorder.scratch)
            device = sums.device
            summed = torch.zeros(len(trainable), dtype=torch.float64, device=device) if grad_sq is None else grad_sq
            column = torch.cat([summed.to(device), torch.full((1,), -1.0, dtype=torch.float64, device=device)])
            table = torch.cat(
                [
                    sums.index_select(0, torch.tensor(weight_rows, device=device)),
                    column.index_select(0, torch.tensor(grad_rows, device=device)).unsqueeze(1),
                ],
                dim=1,
            )
        param_stats = (table, rows_of)
        self._batches = len(prepared)
        return recorder.states, param_stats, last_grads

    def _weight_sums(self, params: dict[int, nn.Parameter] | None) -> _WeightSums | None:
        """Σw and Σw² of every parameter of the recorded modules and the row sums of every weight
        matrix (not an embedding's: its rows are not units), in one kernel call; no host sync.
        Before the passes, so that the symmetry grouping reads no weight again (the sums are the
        parameters' values as initialised: the passes do not change them)."""
        tensors: list[torch.Tensor] = []
        lengths: list[int] = []
        position: dict[int, int] = {}
        for module in self.modules.values():
            by_rows = not isinstance(module, nn.Embedding | nn.EmbeddingBag)
            for p in module._parameters.values():
                if p is None:
                    continue
                q = p if params is None else params[id(p)]
                if id(q) in position:
                    continue
                position[id(q)] = len(tensors)
                tensors.append(q)
                lengths.append(q.numel() // q.shape[0] if by_rows and q.dim() >= 2 and q.shape[0] else 0)
        if not tensors:
            return None
        sums, rows = sums_and_row_sums(tensors, lengths, Scratch())
        return _WeightSums(position, sums, {id(q): r for q, r in zip(tensors, rows) if r is not None})

    def _keep_gradients(self, params: dict[int, nn.Parameter] | None, weights: _WeightSums | None = None) -> set[int]:
        """Ids of the parameters whose gradients the symmetry analysis may read (those of layers with
        identical units and of the layers that can follow them: :func:`gradprobe.diagnose.units.group_units`,
        from the weights alone, and their row sums in ``weights``). Grouped once, before the passes:
        inside them nothing reads a value."""
        if self._unit_groups is None:
            try:
                from gradprobe.diagnose.units import group_units
            except ImportError:  # the analysis is optional: nothing reads the gradients
                return set()
            self._unit_groups = group_units(
                self.model, self.modules, params, row_sums=None if weights is None else weights.rows
            )
        keep: set[int] = set()
        modules = self.modules
        for name in self._unit_groups.gradients_needed:
            for p in modules[name]._parameters.values():
                if p is not None:
                    keep.add(id(p if params is None else params.get(id(p), p)))
        return keep

    # -- results ------------------------------------------------------------------------------
    def _layers(self, states: dict[str, ModuleState], param_stats: ParamTable) -> list[LayerRecord]:
        from gradprobe.initializers import weight_fans

        ordered = sorted(states.values(), key=lambda s: s.index)
        # Summaries without a histogram are in the kernel's packed layout (mean, M2, max, min, then
        # three counts): its one part, or seven that the concatenation below puts side by side. They
        # are built all at once (TensorStats.from_packed), and go first, by unit count, so that those
        # of one width lie evenly spaced (there, rows of one 2-D view: no copy). The others, and any
        # that from_packed hands back, one by one.
        Slot = tuple[int, ModuleState, str, DeviceMoments, list[torch.Tensor], list[int]]
        packed: list[Slot] = []  # (units, state, "act" | "grad", accumulator, tensors, their sizes)
        others: list[Slot] = []
        for st in ordered:
            for kind, acc in (("act", st.act), ("grad", st.grad)):
                if acc.empty:
                    continue
                tensors = acc.pack()
                sizes = [t.numel() for t in tensors]
                if len(sizes) == 1:
                    packed.append(((sizes[0] - 3) // 4, st, kind, acc, tensors, sizes))
                elif sizes[4:] == [1, 1, 1] and sizes[0] == sizes[1] == sizes[2] == sizes[3]:
                    packed.append((sizes[0], st, kind, acc, tensors, sizes))
                else:
                    others.append((-1, st, kind, acc, tensors, sizes))
        packed.sort(key=lambda slot: slot[0])  # stable: execution order within a width
        # One host transfer for everything: flatten every accumulated tensor into one float64 vector.
        parts: list[torch.Tensor] = []
        where: dict[tuple[str, str], tuple[int, list[int]]] = {}  # (layer, "act" | "grad"): position, sizes
        packed_keys: list[tuple[str, str]] = []
        packed_entries: list[tuple[int, int, int, int, int]] = []
        pos = 0
        for units, st, kind, acc, tensors, sizes in packed + others:
            key = (st.name, kind)
            where[key] = (pos, sizes)
            if units >= 0:
                packed_keys.append(key)
                packed_entries.append((pos, units, acc.rows, acc.calls, st.elements_per_sample))
            for t in tensors:
                parts.append(t if t.dim() == 1 else t.reshape(-1))  # cat() makes them float64
            pos += sum(sizes)
        table, rows_of = param_stats
        if table is not None:
            parts.append(table.reshape(-1))  # last: [Σw, Σw², ‖∇‖² or −1] per row
        device = self.device
        flat = (
            torch.cat([p if p.device == device else p.to(device) for p in parts])
            .to(torch.float64)  # already float64 by promotion (the means are); a no-op guard
            .cpu()
            .numpy()
            if parts
            else np.zeros(0)
        )
        # Σw, Σw², ‖∇‖² per row of the parameter table, as Python floats in one conversion
        param_rows: list[list[float]] = flat[pos:].reshape(-1, 3).tolist() if table is not None else []
        built = dict(zip(packed_keys, TensorStats.from_packed(flat, packed_entries)))

        def unpacked(st: ModuleState, kind: str) -> TensorStats | None:
            stats = built.get((st.name, kind))
            acc = st.act if kind == "act" else st.grad
            if stats is not None or acc.empty:
                return stats
            start, sizes = where[(st.name, kind)]
            chunks = []
            for n in sizes:
                chunks.append(flat[start : start + n])  # views of one fresh array
                start += n
            moments = DeviceMoments.unpack(chunks, acc.rows, acc.calls)
            return TensorStats.from_moments(moments, st.elements_per_sample)

        modules = self.modules  # the recorded modules by name, the root as "model"
        named: dict[str, nn.Module] | None = None
        layers: list[LayerRecord] = []
        for st in ordered:
            module = modules.get(st.name)
            if module is None:  # not expected: every state is a recorded module's
                named = dict(self.model.named_modules()) if named is None else named
                module = named["" if st.name == "model" else st.name]
            params_out: list[ParamRecord] = []
            own = module._parameters
            if own:
                rows = iter(rows_of.get(st.name, ()))
                module_fans = weight_fans(module)
                for pname, p in own.items():
                    if p is None:
                        continue
                    total, square_total, gsq = param_rows[next(rows)]
                    numel = p.numel()
                    size = max(1, numel)
                    mean, sq = total / size, square_total / size
                    fan_in, fan_out = module_fans.get(pname, (None, None))
                    params_out.append(
                        ParamRecord(  # positional, in the order of the fields (keywords cost ~1 µs more)
                            pname,  # name
                            list(p.shape),  # shape
                            numel,
                            p.requires_grad,
                            mean,
                            max(sq - mean * mean, 0.0),  # var
                            math.sqrt(sq),  # rms
                            fan_in,
                            fan_out,
                            None if gsq < 0 else gsq,  # grad_sq_sum
                            self._batches if gsq >= 0 else 0,  # batches
                        )
                    )
            act_name = self.activations.get(st.name)
            layers.append(
                LayerRecord(  # positional, in the order of the fields (keywords cost ~2 µs more)
                    st.name,  # name
                    st.module_type,  # type
                    st.index,  # index
                    st.calls,  # calls
                    st.output_shape or [],  # output_shape
                    st.unit_axis,  # unit_axis
                    st.elements_per_sample,  # elements_per_sample
                    act_name[0] if act_name else None,  # activation
                    act_name[1] if act_name else None,  # activation_param
                    self.gains.get(st.name),  # gain
                    self.init_desc.get(st.name),  # initializer
                    unpacked(st, "act"),  # act
                    unpacked(st, "grad"),  # grad
                    params_out,  # params
                    st.outputs_skipped,  # outputs_skipped
                    st.grad_missing,  # grad_missing
                )
            )
        return layers

    def _meta(self, batches: list[Batch], kept: list[str]) -> dict[str, Any]:
        import gradprobe

        first = _first_tensor(batches[0])
        batch_size = int(first.shape[0]) if first is not None and first.dim() >= 1 else 1
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()})
        called = {m for m in self.modules}
        return {
            "gradprobe_version": gradprobe.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "model": type(self.model).__name__,
            "device": str(self.device),
            "dtypes": dtypes,
            "seed": self.cfg.seed,
            "init": self.plan.describe(),
            "loss": self.cfg.loss
            if isinstance(self.cfg.loss, str)
            else getattr(self.cfg.loss, "__name__", "callable"),
            "mode": self.cfg.mode,
            "batch_size": batch_size,
            "batches": len(batches),
            "samples": batch_size * len(batches),
            "modules_selected": len(called),
            "kept_as_built": kept,
        }

    def _attach_unit_analysis(
        self, report: Report, params: dict[int, nn.Parameter] | None, grads: dict[int, torch.Tensor]
    ) -> None:
        """Symmetry analysis needs the initialised weights and their gradients: do it while we have them."""
        try:
            from gradprobe.diagnose.units import analyse_units
        except ImportError:
            return
        analyse_units(report, self.model, params, grads, groups=self._unit_groups)


def _leaves_of(batch: Batch) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(batch)
    return out
