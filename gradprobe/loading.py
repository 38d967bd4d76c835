"""Load what the command line names: a model (factory, TorchScript, ``torch.export``, pickle) and inputs.

Model forms (the ``MODEL`` argument of ``gradprobe probe``):

* ``path/to/file.py:factory`` and ``package.module:factory``: import the file or module and call
  ``factory(**args)`` (``--arg key=value``). ``factory`` may also be an ``nn.Module`` class or an
  instance; it may return a module or ``(module, example_inputs)``.
* a TorchScript archive (``torch.jit.save``). Python hooks cannot be attached to scripted modules
  (torch raises "register_forward_hook is not supported on ScriptModules"), so gradprobe rebuilds
  what it can as ordinary modules: ``Sequential`` containers are unrolled and standard ``torch.nn``
  leaves (Linear, Conv, norms, activations, …) are rebuilt eagerly with the archive's weights; any
  other scripted submodule (or a scripted top-level ``forward``) is measured as one opaque layer.
  The rebuilt copy is checked against the archive's own output before the probe; what stays opaque
  is listed in :attr:`LoadedModel.notes` and in the report.
* a ``torch.export`` program (``.pt2``), unflattened with ``torch.export.unflatten`` so that every
  submodule is an ``InterpreterModule`` whose forward hooks fire; original type names are recovered
  from the program's ``nn_module_stack`` metadata, and the example inputs stored in the archive are
  used when no ``--input`` is given.
* a fully pickled module (``torch.save(model)``) only with ``trust_pickle=True``. Without it the file
  is opened with ``torch.load(weights_only=True)``, whose restricted unpickler never runs code from
  the file; a file that needs more than that is refused.

Input SPEC grammar (``--input``), documented in docs/cli.md::

    SPEC      := [NAME "="] SOURCE                 NAME: keyword argument of forward
    SOURCE    := FILE | [KIND ":"] SHAPE (":" OPTION)*
    FILE      := *.pt | *.pth | *.npy              torch.load(weights_only=True) / numpy.load(allow_pickle=False)
    KIND      := float (default) | int | mask
    SHAPE     := N ("x" N)*                        e.g. 8x3x224x224
    OPTION    := KEY "=" VALUE                     options may also be separated by ","
        float: mean=0 std=1 dtype=float32|float64|float16|bfloat16     values ~ N(mean, std²)
        int:   vocab=V (ids in [0, V)) | low=L high=H ([L, H))  dtype=int64|int32
        mask:  dtype=int64|bool|float32            all ones (attention masks)
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprobe.errors import GradprobeError, UsageError

__all__ = [
    "InputSpec",
    "LoadedModel",
    "parse_input_spec",
    "make_inputs",
    "parse_arg_values",
    "parse_overrides",
    "load_model",
    "as_probe_inputs",
    "DTYPES",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_KINDS = ("float", "int", "mask")
_KIND_OPTIONS = {
    "float": ("mean", "std", "dtype"),
    "int": ("vocab", "low", "high", "dtype"),
    "mask": ("dtype",),
}
_FILE_SUFFIXES = (".pt", ".pth", ".npy")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHAPE = re.compile(r"^[0-9]+(x[0-9]+)*$")


# --------------------------------------------------------------------------------------------
# Small parsers
# --------------------------------------------------------------------------------------------


def dtype_from_name(name: str, *, floating: bool = False) -> torch.dtype:
    """A torch dtype from its short name (``float32``, ``bfloat16``, …); a bad name lists the valid ones."""
    valid = _FLOAT_DTYPES if floating else tuple(DTYPES)
    key = name.strip().lower().replace("torch.", "")
    key = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}.get(
        key, key
    )
    if key not in valid:
        raise UsageError(f"unknown dtype {name!r}", hint=f"valid: {', '.join(valid)}")
    return DTYPES[key]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --arg act=relu


def parse_arg_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``["depth=8", "act='relu'", "dims=(2, 3)"]`` → keyword arguments, values read as Python literals
    (``ast.literal_eval``); a value that is not a literal is kept as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not _IDENT.match(key):
            raise UsageError(f"bad --arg {pair!r}", hint="write key=value, e.g. --arg depth=8 --arg act=relu")
        out[key] = _literal(value.strip())
    return out


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``["head=zeros", "blocks.*.attn=normal:std=0.02"]`` → ``{glob: initializer spec}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        glob, sep, spec = pair.partition("=")
        if not sep or not glob.strip() or not spec.strip():
            raise UsageError(f"bad --override {pair!r}", hint="write GLOB=INIT, e.g. --override head=zeros")
        out[glob.strip()] = spec.strip()
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One ``--input``: a keyword ``name`` (None for positional) and either a file or a generated tensor."""

    text: str  # as the user wrote it
    name: str | None = None  # keyword argument of forward; None: positional
    kind: str = "float"  # "float" | "int" | "mask" | "file"
    shape: tuple[int, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None


def parse_input_spec(text: str) -> InputSpec:
    """Parse one input SPEC (grammar in the module docstring); errors show the grammar."""
    raw = text.strip()
    name: str | None = None
    head, sep, rest = raw.partition("=")
    if sep and _IDENT.match(head) and head not in ("vocab", "low", "high", "mean", "std", "dtype"):
        name, raw = head, rest.strip()
    example = (
        "8x3x224x224, int:8x128:vocab=50257, input_ids=int:8x128:vocab=1000, mask:8x128, batch.pt, x.npy"
    )
    if raw.lower().endswith(_FILE_SUFFIXES):
        return InputSpec(text=text, name=name, kind="file", path=raw)
    parts = [p for p in re.split(r"[:,]", raw) if p != ""]
    if not parts:
        raise UsageError(f"empty --input {text!r}", hint=f"examples: {example}")
    kind = "float"
    if parts[0].lower() in _KINDS:
        kind = parts.pop(0).lower()
    if not parts or not _SHAPE.match(parts[0]):
        raise UsageError(
            f"bad --input {text!r}: expected a shape like 8x3x224x224 or a .pt/.npy file",
            hint=f"SPEC is [NAME=][float|int|mask:]SHAPE[:key=value…] or a file; examples: {example}",
        )
    shape = tuple(int(d) for d in parts.pop(0).split("x"))
    options: dict[str, Any] = {}
    for opt in parts:
        key, eq, value = opt.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KIND_OPTIONS[kind]:
            raise UsageError(
                f"bad option {opt!r} in --input {text!r}",
                hint=f"options for {kind} inputs: {', '.join(_KIND_OPTIONS[kind])}",
            )
        if key == "dtype":
            dtype_from_name(value)
            options[key] = value.strip().lower()
        else:
            try:
                options[key] = float(value) if kind == "float" else int(value)
            except ValueError:
                raise UsageError(f"bad number {value!r} for {key} in --input {text!r}") from None
    if kind == "int":
        if "vocab" in options:
            options.setdefault("low", 0)
            options["high"] = options["vocab"]
        if "high" not in options:
            raise UsageError(
                f"integer input {text!r} needs a bound",
                hint="add vocab=V (ids in [0, V)) or low=L:high=H, e.g. int:8x128:vocab=50257",
            )
        if options.setdefault("low", 0) >= options["high"]:
            raise UsageError(
                f"empty id range in --input {text!r}: low {options['low']} ≥ high {options['high']}"
            )
    if kind == "float" and options.get("std", 1.0) < 0:
        raise UsageError(f"negative std in --input {text!r}")
    return InputSpec(text=text, name=name, kind=kind, shape=shape, options=options)


def _load_input_file(spec: InputSpec, base: Path | None, dtype: torch.dtype | None) -> Any:
    path = _resolve_path(spec.path or "", base)
    if not path.is_file():
        raise UsageError(f"input file not found: {path}", hint="check the path given to --input")
    if path.suffix.lower() == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UsageError(
                f"cannot read {path} as a numeric .npy array: {e}", hint="object arrays are refused"
            ) from e
        value: Any = torch.from_numpy(np.ascontiguousarray(array))
        if value.is_floating_point():
            value = value.to(dtype or torch.float32)  # numpy defaults to float64; models to float32
        return value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's protocol notes would break the one-line error
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"{path} is not a tensor file that loads with weights_only=True ({type(e).__name__})",
            hint="save inputs with torch.save(tensor | tuple | dict of tensors); pickled objects are never loaded",
        ) from e
    if dtype is not None:
        value = _map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)
    return value


def _generate(spec: InputSpec, generator: torch.Generator, dtype: torch.dtype | None) -> torch.Tensor:
    opts = spec.options
    if spec.kind == "int":
        out = torch.randint(int(opts["low"]), int(opts["high"]), spec.shape, generator=generator)
        return out.to(dtype_from_name(opts["dtype"])) if "dtype" in opts else out
    if spec.kind == "mask":
        return torch.ones(spec.shape, dtype=dtype_from_name(opts.get("dtype", "int64")))
    x = torch.randn(spec.shape, generator=generator, dtype=torch.float64)
    x = x * float(opts.get("std", 1.0)) + float(opts.get("mean", 0.0))
    target = dtype_from_name(opts["dtype"], floating=True) if "dtype" in opts else (dtype or torch.float32)
    return x.to(target)


def make_inputs(
    specs: Sequence[InputSpec | str],
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    base: Path | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Build the model inputs ``(args, kwargs)`` from specs, in order, from one generator seeded with
    ``seed`` (the same specs and seed give identical tensors). ``dtype`` is the default for floating
    inputs (per-spec ``dtype=`` wins); relative file paths resolve against ``base``."""
    generator = torch.Generator().manual_seed(seed)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for raw in specs:
        spec = parse_input_spec(raw) if isinstance(raw, str) else raw
        if spec.kind == "file":
            value = _load_input_file(spec, base, dtype)
            if spec.name is None and isinstance(value, dict):
                kwargs.update(value)
                continue
            if spec.name is None and isinstance(value, (tuple, list)):
                args.extend(value)
                continue
        else:
            value = _generate(spec, generator, dtype)
        if spec.name is None:
            if kwargs:
                raise UsageError(
                    f"positional --input {spec.text!r} after keyword inputs",
                    hint="give positional inputs first, then NAME=SPEC ones",
                )
            args.append(value)
        else:
            if spec.name in kwargs:
                raise UsageError(f"keyword input {spec.name!r} given twice")
            kwargs[spec.name] = value
    return tuple(args), kwargs


def as_probe_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What :func:`gradprobe.probe` accepts: a tensor, a tuple (positional) or a dict (keyword).

    Mixed positional and keyword inputs are bound to ``forward``'s signature and passed all by
    keyword, which works for every parameter that is not positional-only or ``*args``.
    """
    if not kwargs:
        return args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)
    if not args:
        return dict(kwargs)
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(
            f"cannot pass {len(args)} positional and {len(kwargs)} keyword inputs to {type(model).__name__}.forward: {e}",
            hint="name every input (NAME=SPEC) or give them all positionally",
        ) from e
    params = sig.parameters
    if any(
        params[k].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
        for k in bound.arguments
    ):
        raise UsageError(
            f"{type(model).__name__}.forward takes positional-only or *args inputs; gradprobe cannot mix them with keyword inputs",
            hint="give every input positionally",
        )
    out: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if params[key].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[key] = value
    return out


def describe_inputs(inputs: Any) -> str:
    """``float32[8, 16], input_ids=int64[8, 128]`` — for headers and messages."""

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')}[{', '.join(str(s) for s in v.shape)}]"
        if isinstance(v, (tuple, list)):
            return ", ".join(one(x) for x in v)
        if isinstance(v, Mapping):
            return ", ".join(f"{k}={one(x)}" for k, x in v.items())
        return type(v).__name__

    return one(inputs)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    """Floating tensors to ``dtype``; integer ids and masks unchanged."""
    return _map_tensors(inputs, lambda t: t.to(dtype) if t.is_floating_point() else t)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for :func:`gradprobe.probe`, with what the loader learnt about it.

    Attributes:
        module: the module to probe.
        example_inputs: inputs supplied with the model (factory tuple, ``.pt2`` archive), or None.
        kind: ``"factory"``, ``"torchscript"``, ``"export"`` or ``"pickle"``.
        source: the MODEL argument as given.
        notes: what could not be probed or initialised, in sentences (shown with the report).
        layer_types: module name → original type name, where the probed module's own type hides it.
        opaque: names of layers measured as a whole (scripted code gradprobe cannot look inside).
        location: ``(file, line)`` of the factory, for CI annotations.
        validate: checks the rebuilt copy against the original on the real inputs (TorchScript).
    """

    module: nn.Module
    example_inputs: Any = None
    kind: str = "factory"
    source: str = ""
    notes: list[str] = field(default_factory=list)
    layer_types: dict[str, str] = field(default_factory=dict)
    opaque: list[str] = field(default_factory=list)
    location: tuple[str, int] | None = None
    validate: Callable[[Any], None] | None = None

    def annotate(self, report: Any) -> Any:
        """Write what the loader knows into a report: original type names, opaque layers, notes."""
        for layer in report.layers:
            if layer.name in self.layer_types:
                layer.type = self.layer_types[layer.name]
        if "model" in self.layer_types:
            report.meta["model"] = self.layer_types["model"]
        report.meta["model_source"] = self.source
        report.meta["model_kind"] = self.kind
        if self.notes:
            report.meta["notes"] = list(self.notes)
        if self.opaque:
            report.meta["opaque_layers"] = list(self.opaque)
        return report


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _resolve_path(text: str, base: Path | None) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() or base is None else base / p


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``file.py:make`` / ``pkg.mod:make`` → (target, attribute path); None for a plain file."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or len(target) == 1:  # a Windows drive letter is not a factory
        return None
    if not all(_IDENT.match(part) for part in attr.split(".")):
        return None
    return target, attr


def _callables_in(module: Any) -> list[str]:
    names = []
    for key, value in vars(module).items():
        if key.startswith("_") or inspect.ismodule(value):
            continue
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value) or (inspect.isclass(value) and issubclass(value, nn.Module)):
            names.append(key)
        elif isinstance(value, nn.Module):
            names.append(key)
    return names


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_gradprobe_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path} as Python", hint="MODEL is path/to/file.py:factory")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except GradprobeError:
        raise
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UsageError(
            f"importing {path} failed: {type(e).__name__}: {e}",
            hint="run with --debug for the traceback",
        ) from e
    return module


def _load_factory(
    target: str, attr: str, args: Mapping[str, Any], base: Path | None, source: str
) -> LoadedModel:
    if target.endswith(".py"):
        path = _resolve_path(target, base)
        if not path.is_file():
            raise UsageError(f"model file not found: {path}", hint="MODEL is path/to/file.py:factory")
        module = _import_file(path)
        where = str(path)
        directory = path.parent
    else:
        directory = base or Path.cwd()
        with _on_sys_path(directory):
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as e:
                raise UsageError(
                    f"cannot import module {target!r}: {e}",
                    hint="MODEL is package.module:factory (importable from the current directory) or path/to/file.py:factory",
                ) from e
            except Exception as e:
                raise UsageError(
                    f"importing {target} failed: {type(e).__name__}: {e}",
                    hint="run with --debug for the traceback",
                ) from e
        where = target
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = _callables_in(module)
            raise UsageError(
                f"no factory {attr!r} in {where}",
                hint=f"callables there: {', '.join(found)}"
                if found
                else "define a function that returns an nn.Module",
            )
        obj = getattr(obj, part)
    location = None
    with contextlib.suppress(TypeError, OSError):
        file = inspect.getsourcefile(obj if not isinstance(obj, nn.Module) else type(obj))
        line = inspect.getsourcelines(obj if not isinstance(obj, nn.Module) else type(obj))[1]
        if file:
            location = (file, line)
    if isinstance(obj, nn.Module):
        if args:
            raise UsageError(f"{attr!r} in {where} is a module instance; it takes no --arg")
        result: Any = obj
    elif callable(obj):
        try:
            with _on_sys_path(directory):
                result = obj(**args)
        except TypeError as e:
            try:
                signature = f"{attr}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = attr
            raise UsageError(
                f"calling {attr}(**{dict(args)!r}) failed: {e}",
                hint=f"its signature is {signature}; pass keywords with --arg key=value",
            ) from e
        except GradprobeError:
            raise
        except Exception as e:
            raise UsageError(
                f"factory {attr!r} raised {type(e).__name__}: {e}", hint="run with --debug for the traceback"
            ) from e
    else:
        raise UsageError(
            f"{attr!r} in {where} is a {type(obj).__name__}, not a factory",
            hint="name a function that returns an nn.Module",
        )
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
    if not isinstance(result, nn.Module):
        raise UsageError(
            f"factory {attr!r} returned {_short(result)} ({type(result).__name__}), not a torch.nn.Module",
            hint="return the model, or (model, example_inputs) with a tensor, tuple or dict of inputs",
        )
    if isinstance(result, torch.jit.ScriptModule):
        loaded = _from_torchscript(result, source)
        loaded.example_inputs, loaded.location = example, location
        return loaded
    return LoadedModel(
        module=result, example_inputs=example, kind="factory", source=source, location=location
    )


def load_model(
    spec: str,
    *,
    args: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    base: Path | None = None,
) -> LoadedModel:
    """Load MODEL in any of the forms listed in the module docstring. Relative paths resolve
    against ``base`` (default: the current directory)."""
    args = dict(args or {})
    factory = _split_factory(spec)
    if factory is not None and (factory[0].endswith(".py") or not Path(spec).exists()):
        target, attr = factory
        if target.endswith(".py") or all(_IDENT.match(p) for p in target.split(".")):
            return _load_factory(target, attr, args, base, spec)
    path = _resolve_path(spec, base)
    if path.suffix == ".py":
        names: list[str] = []
        if path.is_file():
            names = _callables_in(_import_file(path))
        raise UsageError(
            f"name the factory in {spec}: {spec}:FACTORY",
            hint=f"callables there: {', '.join(names)}" if names else "MODEL is path/to/file.py:factory",
        )
    if not path.exists():
        raise UsageError(
            f"model file not found: {path}",
            hint="MODEL is path/to/file.py:factory, package.module:factory, a TorchScript archive, a .pt2 program or (with --trust-pickle) a pickled module",
        )
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a model file")
    if args:
        raise UsageError("--arg only applies to factories (file.py:factory)", hint=f"{spec} is a file")
    kind = _sniff(path)
    if kind == "export":
        return _from_export(path, spec)
    if kind == "torchscript":
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise UsageError(f"cannot load TorchScript archive {path}: {type(e).__name__}: {e}") from e
        return _from_torchscript(scripted, spec)
    return _from_pickle(path, spec, trust_pickle)


def _sniff(path: Path) -> str:
    """``"export"``, ``"torchscript"`` or ``"pickle"`` from the archive's layout (nothing is unpickled)."""
    if not zipfile.is_zipfile(path):
        return "pickle"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return "export"
    if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
        return "torchscript"
    return "pickle"


def _from_pickle(path: Path, source: str, trust_pickle: bool) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise UsageError(
                f"{path} is a pickled Python object (e.g. torch.save(model)); loading it would run code stored in the file, "
                "so gradprobe refuses (torch.load with weights_only=True could not read it)",
                hint="pass --trust-pickle only if you trust its source, or save a TorchScript/torch.export program or a factory instead",
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise UsageError(f"cannot load {path}: {type(e2).__name__}: {e2}") from e2
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        return LoadedModel(module=obj[0], example_inputs=obj[1], kind="pickle", source=source)
    if isinstance(obj, nn.Module):
        return LoadedModel(module=obj, kind="pickle", source=source)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path} holds a state dict (weights only), not a model",
            hint="write a factory that builds the model and loads it: file.py:make_model",
        )
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


# --------------------------------------------------------------------------------------------
# torch.export programs
# --------------------------------------------------------------------------------------------


def _from_export(path: Path, source: str) -> LoadedModel:
    import torch.export

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise UsageError(f"cannot load torch.export program {path}: {type(e).__name__}: {e}") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own deprecation chatter, not the user's problem
            module = torch.export.unflatten(program)
    except Exception as e:
        raise UsageError(f"cannot unflatten torch.export program {path}: {type(e).__name__}: {e}") from e
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, type_path in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(fqn or "model", str(type_path).rsplit(".", 1)[-1])
    example: Any = None
    stored = getattr(program, "example_inputs", None)
    if stored is not None:
        ex_args, ex_kwargs = stored
        example = dict(ex_kwargs) if ex_kwargs and not ex_args else tuple(ex_args) if not ex_kwargs else None
        if len(ex_args) == 1 and not ex_kwargs and isinstance(ex_args[0], torch.Tensor):
            example = ex_args[0]
    loaded = LoadedModel(
        module=module, example_inputs=example, kind="export", source=source, layer_types=types
    )
    loaded.notes.append(_export_note([], module))

    def validate(inputs: Any) -> None:
        rebuilt = _rebuild_exported_leaves(module, types, inputs)
        loaded.notes[:] = [_export_note(rebuilt, module)]

    loaded.validate = validate
    return loaded


def _export_note(rebuilt: list[str], module: nn.Module) -> str:
    text = (
        "torch.export program: unflattened, so every submodule's forward hooks fire; shapes are specialised "
        "to the exported ones unless the program has dynamic dimensions"
    )
    interpreted = sum(
        1
        for name, m in module.named_modules()
        if name
        and type(m).__name__ == "InterpreterModule"
        and any(p is not None for p in m._parameters.values())
    )
    if rebuilt:
        text += (
            f"; {len(rebuilt)} standard layer(s) were rebuilt as eager torch.nn modules (checked against the "
            "program's own outputs), so initializers apply to them"
        )
    if interpreted:
        text += (
            f"; {interpreted} submodule(s) run as InterpreterModule graphs and keep their exported weights"
        )
    return text


def _rebuild_exported_leaves(module: nn.Module, types: Mapping[str, str], inputs: Any) -> list[str]:
    """Replace each leaf ``InterpreterModule`` whose original type is a standard ``torch.nn`` layer by
    an eager rebuild that reproduces its output on the real inputs (initializers recognise those).
    Returns the names replaced."""
    from gradprobe.probing import normalize_batches

    args, kwargs = normalize_batches(inputs)[0]
    candidates = {
        name: m
        for name, m in module.named_modules()
        if name and next(iter(m.children()), None) is None and types.get(name) in _REBUILDABLE
    }
    seen: dict[str, tuple[Any, Any]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, hook_args: Any, output: Any) -> None:
            seen.setdefault(name, (hook_args, output))

        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    except Exception as e:
        raise UsageError(
            f"the torch.export program failed on the inputs {describe_inputs(args)}: {type(e).__name__}: {e}",
            hint="a torch.export program is specialised to the shapes it was exported with: omit --input to "
            "use the example inputs stored in the archive, or re-export with dynamic_shapes",
        ) from e
    finally:
        for h in handles:
            h.remove()
    replaced = []
    for name, (hook_args, output) in seen.items():
        if len(hook_args) != 1 or not isinstance(hook_args[0], torch.Tensor):
            continue
        source = candidates[name]
        new = _rebuild_leaf(source, types[name])
        if new is None:
            continue
        new.eval()
        try:
            with torch.no_grad():
                same = _same(new(hook_args[0]), output)
        except Exception:
            same = False
        if not same:
            continue
        new.train(source.training)
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        owner._modules[leaf] = new
        replaced.append(name)
    return replaced


# --------------------------------------------------------------------------------------------
# TorchScript archives
# --------------------------------------------------------------------------------------------


class ScriptedBlock(nn.Module):
    """A TorchScript submodule seen from Python as one opaque layer.

    Hooks cannot be attached inside scripted code, so the scripted module is held outside the module
    tree (``named_modules`` does not reach it); its parameters and buffers are registered here under
    names with ``.`` replaced by ``__``. Before each call the scripted code is pointed at this block's
    current tensors, so the probe's swapped-in (initialised) parameters are the ones used.
    """

    scripted: Any  # kept out of the module tree on purpose (see the class docstring)

    def __init__(self, scripted: torch.jit.ScriptModule, type_name: str) -> None:
        super().__init__()
        self.__dict__["scripted"] = scripted
        self.type_name = type_name
        self._paths: list[tuple[str, str, str]] = []  # (table, local name, dotted path in scripted)
        for path, p in scripted.named_parameters():
            local = path.replace(".", "__")
            # Scripted modules hold plain tensors; a Parameter view shares their storage.
            self.register_parameter(
                local, p if isinstance(p, nn.Parameter) else nn.Parameter(p, p.requires_grad)
            )
            self._paths.append(("_parameters", local, path))
        for path, b in scripted.named_buffers():
            local = path.replace(".", "__")
            self.register_buffer(local, b)
            self._paths.append(("_buffers", local, path))

    def _owner(self, path: str) -> tuple[Any, str]:
        owner: Any = self.scripted
        *parents, leaf = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        return owner, leaf

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        saved: list[tuple[Any, str, str, Any]] = []
        try:
            for table, local, path in self._paths:
                owner, leaf = self._owner(path)
                saved.append((owner, table, leaf, getattr(owner, table)[leaf]))
                getattr(owner, table)[leaf] = getattr(self, table)[local]
            self.scripted.train(self.training)
            return self.scripted(*args, **kwargs)
        finally:
            for owner, table, leaf, original in reversed(saved):
                getattr(owner, table)[leaf] = original


# Leaves whose forward depends only on constructor arguments and state: rebuilt eagerly.
_REBUILDABLE = {
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Embedding", "LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "CELU",
    "SELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "Softplus", "Softsign", "Hardtanh", "Hardswish",
    "Hardsigmoid", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Flatten",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "Softmax", "LogSoftmax",
}  # fmt: skip

# Traced archives keep no constants: sizes that can be read off the weight's shape.
_FROM_WEIGHT: dict[str, Callable[[torch.Tensor], dict[str, Any]]] = {
    "Linear": lambda w: {"in_features": w.shape[1], "out_features": w.shape[0]},
    "Embedding": lambda w: {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]},
    "LayerNorm": lambda w: {"normalized_shape": tuple(w.shape)},
    "RMSNorm": lambda w: {"normalized_shape": tuple(w.shape)},
    "BatchNorm1d": lambda w: {"num_features": w.shape[0]},
    "BatchNorm2d": lambda w: {"num_features": w.shape[0]},
    "BatchNorm3d": lambda w: {"num_features": w.shape[0]},
}


def _type_name(scripted: Any) -> str:
    return str(getattr(scripted, "original_name", type(scripted).__name__))


def _rebuild_leaf(scripted: Any, type_name: str) -> nn.Module | None:
    """An eager ``torch.nn.<type_name>`` with the scripted module's settings and state, or None.
    Settings a traced archive did not keep take their defaults; :func:`_validate` catches a leaf
    whose rebuild then computes something else."""
    if type_name not in _REBUILDABLE or not hasattr(nn, type_name):
        return None
    cls = getattr(nn, type_name)
    params = dict(scripted.named_parameters(recurse=False))
    weight = params.get("weight")
    known = _FROM_WEIGHT[type_name](weight) if type_name in _FROM_WEIGHT and weight is not None else {}
    kwargs: dict[str, Any] = {}
    try:
        for pname, param in inspect.signature(cls.__init__).parameters.items():
            if pname in ("self", "device", "dtype") or param.kind in (
                param.VAR_POSITIONAL,
                param.VAR_KEYWORD,
            ):
                continue
            if pname == "bias":
                kwargs[pname] = params.get("bias") is not None
            elif pname in ("affine", "elementwise_affine"):
                kwargs[pname] = weight is not None
            elif hasattr(scripted, pname) and not isinstance(getattr(scripted, pname), torch.Tensor):
                kwargs[pname] = getattr(scripted, pname)
            elif pname in known:
                kwargs[pname] = known[pname]
            elif param.default is inspect.Parameter.empty:
                return None
        module = cls(**kwargs)
        module.load_state_dict(scripted.state_dict(), strict=True)
        if weight is not None and weight.is_floating_point():
            module.to(weight.dtype)
        module.train(scripted.training)
    except Exception:
        return None
    return module


def _unscript(scripted: Any, name: str, opaque: list[str], types: dict[str, str]) -> nn.Module:
    """Eager mirror of a scripted module: Sequential unrolled, standard leaves rebuilt, the rest opaque."""
    type_name = _type_name(scripted)
    if type_name == "Sequential":
        seq = nn.Sequential()
        for child_name, child in scripted.named_children():
            qualified = child_name if name == "model" else f"{name}.{child_name}"
            seq.add_module(child_name, _unscript(child, qualified, opaque, types))
        seq.train(scripted.training)
        return seq
    rebuilt = _rebuild_leaf(scripted, type_name)
    if rebuilt is not None:
        return rebuilt
    opaque.append(name)
    types[name] = type_name
    return ScriptedBlock(scripted, type_name)


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=True))


def _validate(proxy: nn.Sequential, scripted: Any, x: Any, prefix: str, loaded: LoadedModel) -> Any:
    """Run the archive's Sequential children one by one; a rebuilt leaf whose output differs from
    its scripted original is replaced by an opaque :class:`ScriptedBlock`. Returns the output."""
    for child_name, child in scripted.named_children():
        qualified = child_name if prefix == "model" else f"{prefix}.{child_name}"
        mirror = proxy._modules[child_name]
        if _type_name(child) == "Sequential" and isinstance(mirror, nn.Sequential):
            x = _validate(mirror, child, x, qualified, loaded)
            continue
        want = child(x)
        if not isinstance(mirror, ScriptedBlock) and not _same(want, mirror(x)):
            proxy._modules[child_name] = ScriptedBlock(child, _type_name(child))
            loaded.opaque.append(qualified)
            loaded.layer_types[qualified] = _type_name(child)
        x = want
    return x


def _torchscript_note(opaque: list[str], top: str) -> str:
    if opaque == ["model"]:
        return (
            f"TorchScript: forward hooks cannot be attached inside scripted code, and `{top}` has a scripted "
            "forward, so only the model's output is measured (one opaque layer, no per-layer profile); "
            "for per-layer statistics give the Python factory (file.py:factory) or a torch.export program (.pt2)"
        )
    if opaque:
        shown = ", ".join(opaque[:8]) + ("…" if len(opaque) > 8 else "")
        return (
            "TorchScript: Sequential containers were unrolled and standard torch.nn layers rebuilt as eager modules "
            f"with the archive's weights (checked against the archive's own outputs); {len(opaque)} scripted "
            f"submodule(s) are measured only at their output and keep their weights (opaque): {shown}"
        )
    return (
        "TorchScript: every layer was rebuilt as an eager torch.nn module with the archive's weights "
        "and checked against the archive's own outputs"
    )


def _from_torchscript(scripted: Any, source: str) -> LoadedModel:
    opaque: list[str] = []
    types: dict[str, str] = {}
    module = _unscript(scripted, "model", opaque, types)
    top = _type_name(scripted)
    if top != "Sequential" and opaque != ["model"]:  # a single rebuilt leaf
        types.setdefault("model", top)
    loaded = LoadedModel(module=module, kind="torchscript", source=source, layer_types=types, opaque=opaque)
    loaded.notes.append(_torchscript_note(opaque, top))

    def validate(inputs: Any) -> None:
        from gradprobe.probing import normalize_batches

        if not isinstance(module, nn.Sequential):
            return
        args, kwargs = normalize_batches(inputs)[0]
        if kwargs or len(args) != 1:
            raise UsageError(
                "a scripted Sequential takes exactly one positional input", hint="pass one --input"
            )
        modes = [(m, m.training) for m in module.modules()]
        scripted_mode = scripted.training
        before = len(loaded.opaque)
        try:
            module.eval()
            scripted.eval()
            with torch.no_grad():
                _validate(module, scripted, args[0], "model", loaded)
        except GradprobeError:
            raise
        except Exception as e:
            raise UsageError(
                f"the TorchScript archive failed on the inputs {describe_inputs(args)}: {type(e).__name__}: {e}",
                hint="check --input against what the scripted model expects",
            ) from e
        finally:
            for m, flag in modes:
                m.training = flag
            scripted.train(scripted_mode)
        if len(loaded.opaque) != before:
            loaded.notes[:] = [_torchscript_note(loaded.opaque, top)]

    loaded.validate = validate
    return loaded
