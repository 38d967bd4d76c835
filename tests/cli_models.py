"""Small models the CLI, gate and plugin tests load by path (``tests/cli_models.py:stable``).

Deterministic: each factory seeds its own generator. ``stable`` is a He-initialised ReLU MLP (no
error finding as built); ``unstable`` draws weights with a tiny std, so signal vanishes over depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(
    depth: int = 6, width: int = 64, std: float | None = None, gain: float = 1.0, seed: int = 0
) -> nn.Sequential:
    """ReLU MLP; weights N(0, std²), by default He (std = gain·√(2/width)); zero biases."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            s = std if std is not None else gain * math.sqrt(2 / width)
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * s)
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    head = nn.Linear(width, 10)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(width))
        head.bias.zero_()
    layers.append(head)
    return nn.Sequential(*layers)


def stable() -> nn.Sequential:
    return mlp()


def unstable() -> nn.Sequential:
    return mlp(depth=8, std=0.02)


def with_inputs() -> tuple[nn.Module, torch.Tensor]:
    return mlp(), torch.randn(128, 64, generator=torch.Generator().manual_seed(1))


def not_a_module() -> int:
    return 42


class Detached(nn.Module):
    """Its output is cut from the graph: nothing to back-propagate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach()


def detached() -> Detached:
    return Detached()


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(h)


def token_model(vocab: int = 100, dim: int = 32) -> TokenModel:
    torch.manual_seed(0)
    return TokenModel(vocab, dim)
