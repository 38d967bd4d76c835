"""Reproduce He et al. (2015), "Delving Deep into Rectifiers", Section 2.2: 22- and 30-layer ReLU
networks under Xavier (Var[w] = 1/n for square layers) and under the rectifier-aware init
Var[w] = 2/n ("He"/Kaiming normal).

The paper's number, its Eq. 10: Var[y_L] = Var[y_1] · Π_{l=2..L} (½ n_l Var[w_l]). With He init every
factor is 1; with Xavier every factor is ½, so after L layers the response variance is 2^-(L-1) of
the first layer's: 2^-21 = 4.8e-7 at L = 22, 2^-29 = 1.9e-9 at L = 30, and the back-propagated
gradient falls the same way (Eq. 14, with fan_out). Their 22-layer model still converged under
Xavier, the 30-layer one stalled (their Fig. 2 and 3); gradprobe's verdict is printed beside it.

gradprobe measures it on ReLU MLPs of width 512 (the law is the same for convolutions, n = k²·c;
MLPs keep the run short and free of zero-padding border effects), each L-layer network being L
Linear + ReLU layers and a 10-class head. Writes docs/figures/he2015.png. Run from the repository
root::

    python scripts/reproduce_he2015.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from gradprobe.probing import probe
from gradprobe.report import Report

INITS = (("Xavier", "xavier_normal", 0.5), ("He", "kaiming_normal", 1.0))  # label, spec, ½·n·Var[w]
DEPTHS = (22, 30)


def network(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def profile(report: Report, depth: int) -> dict[str, list[float]]:
    """Per hidden Linear layer: output (response y_l) variance and gradient variance, with predictions."""
    linears = [x for x in report.layers if x.type == "Linear"][:depth]
    out: dict[str, list[float]] = {"act": [], "act_pred": [], "grad": [], "grad_pred": []}
    for x in linears:
        assert x.act is not None and x.grad is not None
        out["act"].append(x.act.var)
        out["act_pred"].append(x.predicted_act_var if x.predicted_act_var is not None else float("nan"))
        out["grad"].append(x.grad.var)
        out["grad_pred"].append(x.predicted_grad_var if x.predicted_grad_var is not None else float("nan"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/he2015.png"))
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    # Inputs from their own generator (the probe's streams are derived from `seed`: gradprobe.rng).
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(10_000 + args.seed))
    results: dict[tuple[int, str], dict[str, list[float]]] = {}
    verdicts: dict[tuple[int, str], str | None] = {}
    for depth in DEPTHS:
        model = network(depth, args.width)
        for label, spec, _ in INITS:
            report = probe(model, x, init=spec, seed=args.seed)
            results[depth, label] = profile(report, depth)
            verdicts[depth, label] = report.verdict

    print(f"He et al. (2015): ReLU MLPs of width {args.width}, batch {args.batch}")
    print("Response variance of the last hidden layer over the first's, Var[y_L]/Var[y_1]; gradient variance")
    print(
        "of the first hidden layer over the last's (backward). Paper: Eq. 10 (forward) and Eq. 14 (backward)."
    )
    print(
        "Verdict: the paper trained them: 22 layers converge under both inits, 30 layers stall under Xavier."
    )
    print(
        f"{'L':>3s} {'init':7s} {'paper':>10s} {'measured fwd':>13s} {'theory fwd':>11s} {'measured bwd':>13s} {'theory bwd':>11s}  verdict"
    )
    for (depth, label), r in results.items():
        factor = {lab: f for lab, _, f in INITS}[label]
        paper = factor ** (depth - 1)
        print(
            f"{depth:3d} {label:7s} {paper:10.2e} {r['act'][-1] / r['act'][0]:13.2e} {r['act_pred'][-1] / r['act_pred'][0]:11.2e}"
            f" {r['grad'][0] / r['grad'][-1]:13.2e} {r['grad_pred'][0] / r['grad_pred'][-1]:11.2e}  {verdicts[depth, label]}"
        )
    save_figure(results, args.out)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")


def save_figure(results: dict[tuple[int, str], dict[str, list[float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    colours = {
        ("Xavier", 22): "tab:orange",
        ("Xavier", 30): "tab:red",
        ("He", 22): "tab:cyan",
        ("He", 30): "tab:blue",
    }
    for ax, key, title, backward in (
        (axes[0], "act", "response variance Var[y_l] / Var[y_1]", False),
        (axes[1], "grad", "gradient variance Var[∂L/∂y_l] / Var[∂L/∂y_L]", True),
    ):
        for (depth, label), r in results.items():
            ref = r[key][-1] if backward else r[key][0]
            ref_pred = r[key + "_pred"][-1] if backward else r[key + "_pred"][0]
            layers = list(range(1, depth + 1))
            colour = colours[label, depth]
            ax.plot(
                layers, [v / ref for v in r[key]], "o-", ms=3, color=colour, label=f"{label}, {depth} layers"
            )
            ax.plot(layers, [v / ref_pred for v in r[key + "_pred"]], "--", color=colour, alpha=0.6)
        xs = list(range(1, max(DEPTHS) + 1))
        if backward:
            ax.plot(
                xs,
                [0.5 ** (30 - layer) for layer in xs],
                ":",
                color="0.3",
                label="2^-(30-l) (Eq. 14, 30 layers)",
            )
        else:
            ax.plot(xs, [0.5 ** (layer - 1) for layer in xs], ":", color="0.3", label="2^-(l-1) (Eq. 10)")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("layer l")
        ax.set_title(title + " (dashed: gradprobe theory)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(
        "He et al. 2015, measured by gradprobe: Xavier halves the ReLU variance per layer, He keeps it"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
