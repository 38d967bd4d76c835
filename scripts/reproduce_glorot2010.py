"""Reproduce Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward neural
networks", Sections 4.2-4.3: tanh and softsign networks of 5 hidden layers of 1000 units, "standard"
init W ~ U[-1/√n, 1/√n] (n = fan_in) against "normalized" init W ~ U[±√6/√(n_j + n_{j+1})],
biases 0. Per layer: the activation variance and the variance of the back-propagated gradient
∂Cost/∂s (s: pre-activation), measured by gradprobe and predicted by its mean-field theory.

The paper's numbers (its Eq. 2-14, in the linear regime it analyses at init):

* standard init: n·Var[W] = 1/3, so the back-propagated gradient variance shrinks by ≈ 1/3 per
  layer towards the input (the activation variance too, forward);
* normalized init: n·Var[W] = 1 for equal widths: both stay ≈ constant across layers;
* the variance of the *weight* gradients is about the same in every layer even under standard init
  (its Eq. 14: the shrinking back-propagated gradient and the shrinking activation multiply to a
  constant).

Writes docs/figures/glorot2010.png. Run from the repository root::

    python scripts/reproduce_glorot2010.py
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from gradprobe.probing import probe
from gradprobe.report import Report

WIDTH, HIDDEN, CLASSES = 1000, 5, 10
ACTIVATIONS = {"tanh": nn.Tanh, "softsign": nn.Softsign}
# (label, initializer spec, the paper's n·Var[W] for square layers)
INITS = (
    ("standard", f"uniform:a={-1 / math.sqrt(WIDTH)!r},b={1 / math.sqrt(WIDTH)!r}", 1 / 3),
    ("normalized", "xavier_uniform", 1.0),
)


def network(activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(HIDDEN):
        layers += [nn.Linear(WIDTH, WIDTH), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    return nn.Sequential(*layers)


def per_layer(report: Report) -> dict[str, list[float]]:
    """Hidden layers 1…5: activation variance (after φ), back-propagated gradient variance (at s),
    their predictions, and the RMS of the weight gradient."""
    linears = [x for x in report.layers if x.type == "Linear"][:HIDDEN]
    acts = [x for x in report.layers if x.type in ("Tanh", "Softsign")][:HIDDEN]
    out: dict[str, list[float]] = {k: [] for k in ("act", "act_pred", "grad", "grad_pred", "weight_grad")}
    for linear, act in zip(linears, acts):
        assert act.act is not None and linear.grad is not None
        out["act"].append(act.act.var)
        out["act_pred"].append(act.predicted_act_var if act.predicted_act_var is not None else math.nan)
        out["grad"].append(linear.grad.var)
        out["grad_pred"].append(
            linear.predicted_grad_var if linear.predicted_grad_var is not None else math.nan
        )
        weight = linear.param("weight")
        out["weight_grad"].append(
            weight.grad_rms if weight is not None and weight.grad_rms is not None else math.nan
        )
    return out


def per_layer_ratio(values: list[float]) -> float:
    """Geometric mean of the layer-to-layer ratio, layer 1 over layer 5 (towards the input)."""
    return (values[0] / values[-1]) ** (1 / (len(values) - 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/glorot2010.png"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    # Inputs from their own generator (the probe's streams are derived from `seed`: gradprobe.rng).
    x = torch.randn(args.batch, WIDTH, generator=torch.Generator().manual_seed(10_000 + args.seed))
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for activation in ACTIVATIONS:
        model = network(activation)
        for label, spec, _ in INITS:
            results[activation, label] = per_layer(probe(model, x, init=spec, seed=args.seed, diagnose=False))

    print("Glorot & Bengio (2010): 5 hidden layers × 1000 units, biases 0, batch", args.batch)
    print(
        f"{'':21s} {'layer':>5s} {'Var[h] meas':>12s} {'theory':>10s} {'Var[dC/ds] meas':>16s} {'theory':>10s} {'rms dC/dW':>10s}"
    )
    for (activation, label), r in results.items():
        for i in range(HIDDEN):
            print(
                f"{activation + ', ' + label:21s} {i + 1:5d} {r['act'][i]:12.3e} {r['act_pred'][i]:10.3e} "
                f"{r['grad'][i]:16.3e} {r['grad_pred'][i]:10.3e} {r['weight_grad'][i]:10.3e}"
            )
    print()
    print(
        "Back-propagated gradient variance, per-layer ratio towards the input (geometric mean, layer 1 ← 5)."
    )
    print(
        "The paper's analysis is linear (φ'(s) = 1): its factor is n·Var[W]; the measured one is n·Var[W]·E[φ'(s)²]."
    )
    for (activation, label), r in results.items():
        paper = {lab: nv for lab, _, nv in INITS}[label]
        measured = per_layer_ratio(r["grad"])
        spread = max(r["weight_grad"]) / min(r["weight_grad"])
        print(
            f"  {activation:8s} {label:10s}  paper {paper:.3f}   gradprobe measured {measured:.3f}"
            f" (= {paper:.3f} × E[φ'²] {measured / paper:.2f})   gradprobe theory {per_layer_ratio(r['grad_pred']):.3f}"
        )
        print(
            f"  {'':8s} {'':10s}  weight-gradient RMS, max/min over the 5 layers: paper ≈ 1, gradprobe {spread:.2f}"
        )
    save_figure(results, args.out)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")


def save_figure(results: dict[tuple[str, str], dict[str, list[float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), layout="constrained")
    axes = figure.subplots(2, 2)
    layers = list(range(1, HIDDEN + 1))
    colours = {"standard": "tab:red", "normalized": "tab:blue"}
    for row, activation in enumerate(ACTIVATIONS):
        for col, (key, title) in enumerate(
            (("act", "activation variance Var[h]"), ("grad", "back-propagated gradient Var[∂C/∂s]"))
        ):
            ax = axes[row][col]
            for label, _, _ in INITS:
                r = results[activation, label]
                ax.plot(layers, r[key], "o-", color=colours[label], label=f"{label}: measured")
                ax.plot(
                    layers, r[key + "_pred"], "--", color=colours[label], alpha=0.7, label=f"{label}: theory"
                )
            ax.set_yscale("log")
            ax.set_xticks(layers)
            ax.set_xlabel("hidden layer")
            ax.set_title(f"{activation}: {title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    figure.suptitle("Glorot & Bengio 2010, measured by gradprobe: standard U[±1/√n] vs normalized init")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
