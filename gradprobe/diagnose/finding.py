"""A diagnosis result: what is wrong, where, how bad, and what to do."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Finding", "SEVERITIES"]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


def _enc(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _enc(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_enc(v) for v in x]
    return x


def _dec(x: Any) -> Any:
    if x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _dec(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_dec(v) for v in x]
    return x


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        code: stable identifier (public contract), e.g. ``"vanishing_gradients"``.
        severity: ``"error"`` (will not train as is), ``"warning"`` or ``"info"``.
        layers: qualified names of the modules concerned, in execution order.
        message: one sentence with the numbers.
        suggestion: the fix, matched to the activation that follows.
        evidence: the numbers behind the message (plain JSON-able values).
    """

    code: str
    severity: Severity
    layers: tuple[str, ...]
    message: str
    suggestion: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "layers": list(self.layers),
            "message": self.message,
            "suggestion": self.suggestion,
            "evidence": _enc(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            code=d["code"],
            severity=d["severity"],
            layers=tuple(d.get("layers", ())),
            message=d.get("message", ""),
            suggestion=d.get("suggestion", ""),
            evidence=_dec(d.get("evidence", {})),
        )

    def __str__(self) -> str:
        where = ", ".join(self.layers[:3]) + ("…" if len(self.layers) > 3 else "")
        text = f"[{self.severity}] {self.code}"
        if where:
            text += f" at {where}"
        text += f": {self.message}"
        if self.suggestion:
            text += f" Fix: {self.suggestion}"
        return text
