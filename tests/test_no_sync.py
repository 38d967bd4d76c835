"""No host synchronisation while the hooks record: statistics stay tensors until one final transfer.

Two independent proofs, neither a timing:

1. **Meta device.** Tensors on ``meta`` have shapes but no data: any ``.item()``, ``.cpu()``,
   ``.tolist()``, ``bool(t)``, data-dependent shape (``nonzero``, boolean masks) or other read of a
   value raises. The probe's hooked forward/backward passes and the parameter statistics run to
   completion on meta; the first read of a value is the single transfer at the start of
   ``_Session._layers``.
2. **Counting on CPU.** Every tensor method that reads a value on the host is wrapped; calls made
   from gradprobe's own code during the hooked passes are counted: none; then exactly one ``.cpu()``
   when the report is built.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from gradprobe import zoo
from gradprobe.hooks import ActivationTracer
from gradprobe.probing import _Session, probe


class PassesDone(Exception):
    """Raised instead of building the report: the passes are over."""

    def __init__(self, states: dict[str, Any], param_stats: Any) -> None:
        super().__init__("passes done")
        self.states = states
        self.param_stats = param_stats


class PReLUNet(nn.Module):
    """A functional PReLU (its slope is read by the activation tracer) and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 12)
        self.slope = nn.Parameter(torch.full((1,), 0.2))
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.prelu(self.fc1(x), self.slope)
        return self.fc2(h + x)


def _models() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    return {
        "mlp": lambda: (zoo.mlp(depth=3, width=16), torch.randn(8, 16)),
        "resnet": lambda: (zoo.resnet_style(blocks=(1, 1), width=4), torch.randn(4, 3, 8, 8)),
        "transformer": lambda: (zoo.transformer(depth=2, d_model=16, max_len=8), torch.randint(0, 100, (2, 8))),
        "lstm": lambda: zoo.example("lstm_classifier", batch=4),  # type: ignore[dict-item]
        "prelu": lambda: (PReLUNet(), torch.randn(6, 12)),
    }


@pytest.mark.parametrize("init", ["keep", "kaiming_normal"])
@pytest.mark.parametrize("name", list(_models()))
def test_passes_run_on_the_meta_device(name: str, init: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the hooked passes reads a value: they run on ``meta``, where any read raises."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model, inputs = _models()[name]()
    model = model.to("meta")
    inputs = inputs.to("meta")

    def stop(self: _Session, states: dict[str, Any], param_stats: Any) -> None:
        raise PassesDone(states, param_stats)

    monkeypatch.setattr(_Session, "_layers", stop)
    # The tracer reads PReLU slopes once, after its pass (counted in the CPU test below); on meta
    # there is nothing to read, so take the layers it found without their slope values.
    monkeypatch.setattr(
        ActivationTracer,
        "found",
        property(lambda self: {k: (a, 0.25 if isinstance(p, torch.Tensor) else p) for k, (a, p) in self._found.items()}),
    )
    with pytest.raises(PassesDone) as done:
        probe(model, inputs, init=init, diagnose=False, gate_check=False)
    states = done.value.states
    assert states, "no module was recorded"
    recorded = 0
    for st in states.values():
        for acc in (st.act, st.grad):
            if not acc.empty:
                recorded += 1
                assert all(t.is_meta for t in acc.pack())  # still tensors, never read
    assert recorded >= len(states)  # activations everywhere, and gradients
    table, rows_of = done.value.param_stats
    assert table is not None and table.is_meta and table.shape == (sum(len(r) for r in rows_of.values()), 3)


def test_a_per_layer_read_in_a_hook_fails_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta test would catch a hook that reads a statistic (the fastai/mup pattern)."""
    import gradprobe.stats as stats

    add = stats.DeviceMoments.add

    def add_and_read(self: stats.DeviceMoments, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        add(self, x, *args, **kwargs)
        x.float().mean().item()

    monkeypatch.setattr(stats.DeviceMoments, "add", add_and_read)
    with torch.device("meta"):
        model = zoo.mlp(depth=2, width=8)
    with pytest.raises(Exception, match="meta"):
        probe(model, torch.randn(4, 8, device="meta"), diagnose=False, gate_check=False)


def test_reading_a_meta_value_does_raise() -> None:
    """The premise of the test above."""
    t = torch.ones(3, device="meta")
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: t.cpu()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


# --------------------------------------------------------------------------------------------
# counting host reads on CPU
# --------------------------------------------------------------------------------------------

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__", "nonzero")


@contextmanager
def counting_reads() -> Iterator[collections.Counter[str]]:
    """Count host reads of tensor values made from gradprobe's own frames."""
    counts: collections.Counter[str] = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    saved_equal = torch.equal

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("gradprobe"):
                counts[name] += 1
            return original(*args, **kwargs)

        return counted

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, wrap(name, original))
        torch.equal = wrap("equal", saved_equal)
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.equal = saved_equal


@pytest.mark.parametrize("init", ["keep", "kaiming_normal"])
@pytest.mark.parametrize("name", list(_models()))
def test_no_host_read_during_the_hooked_passes(name: str, init: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, inputs = _models()[name]()
    phases: dict[str, collections.Counter[str]] = {}
    passes, layers = _Session._passes, _Session._layers

    def counted_passes(self: _Session, *args: Any, **kwargs: Any) -> Any:
        with counting_reads() as counts:
            result = passes(self, *args, **kwargs)
        phases.setdefault("passes", collections.Counter()).update(counts)
        return result

    def counted_layers(self: _Session, *args: Any, **kwargs: Any) -> Any:
        with counting_reads() as counts:
            result = layers(self, *args, **kwargs)
        phases.setdefault("layers", collections.Counter()).update(counts)
        return result

    monkeypatch.setattr(_Session, "_passes", counted_passes)
    monkeypatch.setattr(_Session, "_layers", counted_layers)
    report = probe(model, inputs, init=init, diagnose=False, gate_check=False)
    assert len(report.layers) > 2
    # none, but the activation tracer's single batched read of PReLU slopes after its pass
    expected = {"cpu": 1, "tolist": 1} if name == "prelu" and init == "keep" else {}
    assert dict(phases["passes"]) == expected, phases["passes"]
    # building the report: the one batched transfer of every statistic of every layer
    assert phases["layers"]["cpu"] == 1 and phases["layers"]["item"] == 0, phases["layers"]
    assert phases["layers"]["tolist"] == 0 and phases["layers"]["__float__"] == 0, phases["layers"]


def test_the_counter_sees_a_read_in_a_hook() -> None:
    """The counter catches a per-layer ``.item()`` when gradprobe code makes one."""
    import gradprobe.stats as stats

    x = torch.randn(4, 3)
    with counting_reads() as counts:
        exec("x.sum().item()", {"__name__": "gradprobe.fake", "x": x})  # noqa: S102 - a gradprobe frame
        acc = stats.DeviceMoments(stats.Scratch())
        acc.add(x, 1)
    assert counts["item"] == 1 and sum(counts.values()) == 1
