"""Write docs/figures/compare_relu.png: five initializers on a 30-layer ReLU network.

The picture of He et al. (2015) and Glorot & Bengio (2010), measured: each line is one initializer,
probed by gradprobe on the same network and the same inputs. Forward (top), each Linear layer's
between-sample signal variance relative to the first Linear layer; backward (bottom), each layer's
per-sample gradient energy relative to the last. Kaiming/He and orthogonal with the ReLU gain keep
both near 1; Xavier halves the signal at every layer (2^-29 at the end); PyTorch's default init
(Var = 1/(3·fan_in), a sixth per ReLU layer) and small random weights vanish within a few layers.

Re-run from the repository root (a few seconds on a laptop CPU)::

    python scripts/make_readme_figure.py [--out docs/figures/compare_relu.png] [--depth 30] [--width 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from gradprobe.probing import probe
from gradprobe.render.plots import plot_compare

# (initializer spec, legend label)
INITS = (
    ("normal:std=0.01", "normal, std 0.01"),
    ("default", "PyTorch default (reset_parameters)"),
    ("xavier_normal", "Xavier / Glorot normal"),
    ("kaiming_normal", "Kaiming / He normal"),
    ("orthogonal:gain=auto", "orthogonal, ReLU gain √2"),
)


def relu_mlp(depth: int, width: int, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/compare_relu.png"))
    parser.add_argument("--depth", type=int, default=30, help="Linear layers (default 30, as He et al.)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = relu_mlp(args.depth, args.width)
    inputs = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(args.seed))
    reports = {}
    for spec, label in INITS:
        report = probe(model, inputs, init=spec, seed=args.seed)
        reports[label] = report
        print(
            f"{label:24s} verdict {report.verdict}: {', '.join(sorted({f.code for f in report.errors})) or '-'}"
        )
    figure = plot_compare(
        reports,
        title=f"{args.depth}-layer ReLU MLP (width {args.width}, batch {args.batch}): five initializations",
        width=11,
        floor=1e-24,  # std 0.01 reaches 1e-56: let it leave the axes rather than flatten the others
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out, dpi=120)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
