"""Compare real-task benchmark runs at two training budgets: what is learnt, the goals, the MR site.

Usage (from the repository root):
    python research/real_training_budget/analyse.py docs/benchmark/real/results.json \
        research/real_training_budget/results.json

For each run: mean Dice per method, Dice per class, the goals with the seeds a resolved verdict would need if the
measured mean and spread held, and what the MR site gets from the others (the CT sites' local-only models, the
federated global model) against its own model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.stats import mean_interval, seeds_for_half_width

MR = "site-3"


def fmt(values) -> str:
    i = mean_interval(values)
    return f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def analyse(path: Path) -> None:
    r = json.loads(path.read_text())
    cfg, per_seed, stats = r["config"], r["per_seed"], r["stats"]
    seconds = sum(sum(v["wall_seconds"].values()) for v in per_seed.values()) / len(per_seed)
    wall = r["meta"]["wall_seconds"] / 60
    print(f"## {path}: {cfg['rounds']} rounds x {cfg['local_steps']} steps, seeds {cfg['seeds']}, "
          f"{seconds:.0f} s of method wall time a seed, benchmark wall {wall:.1f} min")  # fmt: skip
    for m, v in stats["mean"].items():
        classes = stats["per_class"].get(m, {})
        per_class = ", ".join(f"{c} {classes[c]['mean']:.3f}" for c in sorted(classes))
        print(f"- {m}: mean {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]; {per_class}")
    for g in r["goals"]:
        i = g["interval"]
        if i.get("n", 0) < 2:
            print(f"- goal {g['goal']}: {g['sentence']}")
            continue
        gap = abs(i["mean"] - g["threshold"])
        n = seeds_for_half_width(i["sd"], gap) if gap > 0 else float("inf")
        hours = n * seconds / 3600
        print(f"- goal {g['goal']}: {i['mean']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}] (sd {i['sd']:.3f}), "
              f"{g['status']}; a resolved verdict at this mean and spread needs {n} seeds ({hours:.1f} h)")  # fmt: skip
    summaries = [v["summary"] for v in per_seed.values()]
    if all("local_only" in s for s in summaries):
        print(
            f"- at {MR}: its own local-only model {fmt(s['local_only']['own'][MR] for s in summaries)}, "
            f"the CT sites' local-only models {fmt(s['local_only']['others_models'][MR] for s in summaries)}"
        )
        matrix = r["methods"]["local_only"]["matrix"]  # evaluating site -> model owner, first seed only
        print(
            f"- seed {cfg['seeds'][0]}: {MR}'s local-only model at the CT sites "
            + ", ".join(f"{site} {matrix[site][MR]:.3f}" for site in matrix if site != MR)
        )
    for m in ("fedavg", "fedbn"):
        if all(m in s for s in summaries):
            print(
                f"- {m} at {MR}: final global model {fmt(s[m]['global'][MR] for s in summaries)}, "
                f"{MR}'s own final model {fmt(s[m]['own'][MR] for s in summaries)}"
            )
    print()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        analyse(Path(arg))
