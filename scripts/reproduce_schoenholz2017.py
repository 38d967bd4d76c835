"""Reproduce Schoenholz et al. (2017), "Deep Information Propagation": the depth scale of tanh
networks against σ_w, and the order-to-chaos boundary.

Weights W ~ N(0, σ_w²/n), biases b ~ N(0, σ_b²). At the fixed point q* of the length map, the
back-propagated gradient second moment changes by χ₁ = σ_w²·E[tanh'(√q* z)²] per layer, so over
depth it scales as exp(−(L−l)/ξ) with depth scale ξ = −1/ln χ₁ (their Eq. 16 and Sec. 3). χ₁ = 1 is
the order-to-chaos boundary, where ξ diverges: σ_w = 1 for σ_b = 0 (their Fig. 1, Sec. 2); for
σ_b² = 0.05 the boundary is at σ_w² ≈ 1.76 (REFERENCE #4); at σ_w = 5/3 (torch's tanh gain, σ_b = 0)
χ₁ ≈ 1.21, chaotic.

gradprobe builds each network at its fixed point (inputs scaled so that the first pre-activation
variance is q*), measures the gradient second moment at every Linear layer, and fits ln χ₁ from its
slope over depth; the theory column is gradprobe.theory (Gauss–Hermite quadrature at q*). Writes
docs/figures/schoenholz2017.png. Run from the repository root::

    python scripts/reproduce_schoenholz2017.py
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.probing import probe
from gradprobe.theory import chi1, critical_sigma_w2, depth_scale, fixed_point

SIGMA_W = [0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.7, 1.9, 2.2]
SIGMA_B2 = (0.0, 0.05)
TRANSIENT = 4  # layers left out of the fit at each end


def network(depth: int, width: int, sigma_w: float, sigma_b2: float, seed: int) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.normal_(0.0, sigma_w / math.sqrt(width), generator=generator)
            linear.bias.normal_(0.0, math.sqrt(sigma_b2), generator=generator)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


def measured_log_chi(sigma_w: float, sigma_b2: float, depth: int, width: int, batch: int, seed: int) -> float:
    """ln χ₁ from the slope of ln E[(∂L/∂s_l)²] over the Linear layers (s_l: pre-activations)."""
    q_star = fixed_point("tanh", sigma_w**2, sigma_b2)
    q0 = max(q_star, 1e-3)  # ordered phase with σ_b = 0: q* = 0, start small (the linear regime)
    input_second_moment = max(q0 - sigma_b2, 1e-6) / sigma_w**2
    x = math.sqrt(input_second_moment) * torch.randn(
        batch, width, generator=torch.Generator().manual_seed(10_000 + seed)
    )
    # gate_check=False: gradients that vanish by design here need no zero-gate test (it costs three Adam steps).
    # exclude Tanh: only the Linear layers (pre-activation gradients) are read, at half the cost.
    model = network(depth, width, sigma_w, sigma_b2, seed)
    report = probe(model, x, init="keep", seed=seed, diagnose=False, gate_check=False, exclude=[nn.Tanh])
    grads = [
        layer.grad.var + layer.grad.mean**2
        for layer in report.layers
        if layer.type == "Linear" and layer.grad
    ]
    ys = np.log(np.asarray(grads[TRANSIENT:-TRANSIENT]))
    xs = np.arange(len(ys))
    slope = float(np.polyfit(xs, ys, 1)[0])  # d ln g / d l = −ln χ₁ (g grows towards the output when χ₁ < 1)
    return -slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/schoenholz2017.png"))
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    measured: dict[float, list[float]] = {}
    theory: dict[float, list[float]] = {}
    for sigma_b2 in SIGMA_B2:
        measured[sigma_b2] = [
            measured_log_chi(s, sigma_b2, args.depth, args.width, args.batch, args.seed) for s in SIGMA_W
        ]
        theory[sigma_b2] = [-1.0 / depth_scale("tanh", s**2, sigma_b2) for s in SIGMA_W]  # ln χ₁

    print(f"Schoenholz et al. (2017): tanh, width {args.width}, depth {args.depth}, batch {args.batch}")
    print(
        f"{'σ_b²':>5s} {'σ_w':>6s} {'σ_w²':>6s} {'ξ theory':>10s} {'ξ measured':>11s} {'χ₁ theory':>10s} {'χ₁ measured':>12s}"
    )
    for sigma_b2 in SIGMA_B2:
        for s, lt, lm in zip(SIGMA_W, theory[sigma_b2], measured[sigma_b2]):
            print(
                f"{sigma_b2:5.2f} {s:6.3f} {s * s:6.3f} {_xi(lt):10.1f} {_xi(lm):11.1f} {math.exp(lt):10.3f} {math.exp(lm):12.3f}"
            )
    print()
    print("Order-to-chaos boundary (χ₁ = 1), gradprobe measured = where the fitted ln χ₁ crosses 0:")
    for sigma_b2, paper in ((0.0, 1.0), (0.05, 1.76)):
        crossing = _crossing(SIGMA_W, measured[sigma_b2])
        theory_s2 = critical_sigma_w2("tanh", sigma_b2)
        print(
            f"  σ_b² = {sigma_b2:4.2f}: paper σ_w² = {paper:.2f}   gradprobe theory {theory_s2:.3f}   "
            f"gradprobe measured {crossing**2 if crossing else float('nan'):.3f}"
        )
    chaotic = chi1("tanh", fixed_point("tanh", (5 / 3) ** 2, 0.0), (5 / 3) ** 2)
    at_five_thirds = math.exp(measured_log_chi(5 / 3, 0.0, args.depth, args.width, args.batch, args.seed))
    print(
        f"  χ₁ at σ_w = 5/3, σ_b = 0: paper/REFERENCE ≈ 1.21   gradprobe theory {chaotic:.3f}   measured {at_five_thirds:.3f}"
    )
    save_figure(measured, theory, args.out)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")


def _xi(log_chi: float) -> float:
    """ξ = −1/ln χ₁: positive (ordered) layers over which gradients shrink by e, negative (chaotic)
    over which they grow by e."""
    return math.inf if log_chi == 0 else -1.0 / log_chi


def _crossing(sigmas: list[float], log_chi: list[float]) -> float | None:
    for (s0, y0), (s1, y1) in zip(zip(sigmas, log_chi), zip(sigmas[1:], log_chi[1:])):
        if y0 < 0 <= y1:
            return s0 + (s1 - s0) * (-y0) / (y1 - y0)
    return None


def save_figure(measured: dict[float, list[float]], theory: dict[float, list[float]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    colours = {0.0: "tab:blue", 0.05: "tab:red"}
    s2 = [s * s for s in SIGMA_W]
    fine = np.linspace(SIGMA_W[0], SIGMA_W[-1], 200)
    for sigma_b2 in SIGMA_B2:
        colour = colours[sigma_b2]
        dense = [-1.0 / depth_scale("tanh", float(s) ** 2, sigma_b2) for s in fine]
        left.plot(
            fine**2, [abs(_xi(v)) for v in dense], "-", color=colour, label=f"theory, σ_b² = {sigma_b2}"
        )
        left.plot(
            s2,
            [abs(_xi(v)) for v in measured[sigma_b2]],
            "o",
            color=colour,
            label=f"measured, σ_b² = {sigma_b2}",
        )
        right.plot(fine**2, dense, "-", color=colour, label=f"theory, σ_b² = {sigma_b2}")
        right.plot(s2, measured[sigma_b2], "o", color=colour, label=f"measured, σ_b² = {sigma_b2}")
        critical = critical_sigma_w2("tanh", sigma_b2)
        for ax in (left, right):
            ax.axvline(critical, color=colour, ls=":", lw=1)
    left.set_yscale("log")
    left.set_ylim(0.5, 500)
    left.set_ylabel("|ξ| = 1/|ln χ₁| (layers)")
    left.set_title("gradient depth scale: diverges at the order-to-chaos boundary", fontsize=10)
    right.axhline(0, color="0.3", lw=0.8)
    right.set_ylabel("ln χ₁ per layer (< 0 ordered, > 0 chaotic)")
    right.set_title("ln χ₁: measured slope of ln E[(∂L/∂s)²] over depth", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("σ_w²")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Schoenholz et al. 2017, measured by gradprobe: tanh depth scale against σ_w²")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
