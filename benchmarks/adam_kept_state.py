"""What keeping Adam's moments across rounds should do to a DP-SGD round, on a toy with no network at all.

``keep_optimizer_state`` was built on a prediction: under DP-SGD each coordinate's gradient is mostly noise, and a
fresh Adam's first steps are its largest (bias correction makes step one ``lr * sign(g)``, and the first momentum
averages few gradients), so a fresh Adam every round moves the weights further in random directions than a kept
one, for the same signal. This script measures that prediction where it can be measured exactly: every coordinate
gets ``signal + N(0, 1)`` per step, one round is ``--steps`` Adam steps, and the figure is the round's displacement
(in units of the learning rate) along the signal, divided by its spread across coordinates. A fresh Adam starts
each round from zero moments; a kept one has run ``--warm-rounds`` earlier rounds.

It is a prediction, not a measurement of the benchmark: the real rows are in ``docs/privacy.md``
(keeping Adam's state at the site), and they did not bear it out.

Usage:
    python benchmarks/adam_kept_state.py [--steps 20,35] [--signal 0.05] [--warm-rounds 5] [--coords 200000]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoundDisplacement:
    """One round's displacement per coordinate, in units of the learning rate."""

    mean: float  # along the signal
    spread: float  # standard deviation across coordinates: the noise's share

    @property
    def signal_to_noise(self) -> float:
        return self.mean / self.spread


def round_displacement(steps: int, warm_rounds: int, signal: float, coords: int, seed: int = 0) -> RoundDisplacement:
    """``torch.optim.Adam`` (the site trainer's optimizer, its default betas and eps) over ``warm_rounds`` earlier
    rounds with its state kept, then one measured round of ``steps`` steps.

    With ``warm_rounds`` 0 the measured round starts from zero moments, as a fresh Adam does. The learning rate is 1,
    so the weights' change is the displacement in units of the learning rate.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros(coords, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=1.0)
    start = weights.detach().clone()
    for round_index in range(warm_rounds + 1):
        if round_index == warm_rounds:
            start = weights.detach().clone()
        for _ in range(steps):
            weights.grad = signal + torch.randn(coords, generator=generator, dtype=torch.float64)
            optimizer.step()
    # Adam steps against the gradient, so the displacement along the signal is start - end.
    displacement = start - weights.detach()
    return RoundDisplacement(float(displacement.mean()), float(displacement.std(correction=0)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="20,35", help="comma-separated steps per round (the 16x sites: 20, 35)")
    parser.add_argument("--signal", type=float, default=0.05, help="mean gradient per coordinate, in noise sds")
    parser.add_argument("--warm-rounds", type=int, default=5, help="earlier rounds the kept Adam has run")
    parser.add_argument("--coords", type=int, default=200_000, help="coordinates (independent samples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"signal {args.signal} noise sd per step, torch.optim.Adam defaults; displacement in units of lr")
    print("steps | fresh: mean / spread / SNR | kept: mean / spread / SNR | SNR kept / fresh")
    for steps in (int(s) for s in args.steps.split(",")):
        fresh = round_displacement(steps, 0, args.signal, args.coords, args.seed)
        kept = round_displacement(steps, args.warm_rounds, args.signal, args.coords, args.seed)
        print(
            f"{steps:5d} | {fresh.mean:.3f} / {fresh.spread:.2f} / {fresh.signal_to_noise:.3f} | "
            f"{kept.mean:.3f} / {kept.spread:.2f} / {kept.signal_to_noise:.3f} | "
            f"{kept.signal_to_noise / fresh.signal_to_noise:.2f}"
        )


if __name__ == "__main__":
    main()
