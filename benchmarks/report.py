"""``report.md`` and the stdout summary from ``results.json`` (see ``render`` for tables and plots)."""

from __future__ import annotations

from benchmarks.render import dice_tables, label, local_only_matrix, table
from benchmarks.summary import mean_curve


def rounds_table(results: dict) -> str:
    """Mean Dice over sites after each round, one column per method (the numbers behind dice_per_round.png)."""
    curves = {m: mean_curve(raw["per_round"]) for m, raw in results["methods"].items()}
    rounds = sorted({r for c in curves.values() for r in c})
    rows = [[r, *(curves[m].get(r) for m in curves)] for r in rounds]
    return table(["round", *(label(m) for m in curves)], rows)


def cost_sections(results: dict) -> list[str]:
    out = []
    sims = results["methods"]
    rows = []
    for method, raw in sims.items():
        b = raw.get("bytes")
        if b:
            rows.append([label(method), b.get("server_to_site_per_round"), b.get("site_to_server_per_round"),
                         b.get("total"), raw.get("wall_seconds")])  # fmt: skip
    if rows:
        out += ["### Bytes per round (serialised messages, summed over sites; simulator runs)", "",
                table(["method", "server->sites per round", "sites->server per round", "total bytes", "run wall s"],
                      rows, ".0f"), ""]  # fmt: skip
    poc = results.get("poc")
    if not poc:
        out += ["### POC cost figures", "", "POC was not run (`--no-poc`).", ""]
        return out
    if poc.get("error"):
        out += ["### POC cost figures", "", f"POC run failed: `{poc['error']}`", ""]
        return out
    out += [f"### POC cost figures ({label(poc['job'])}, job `{poc['job']}`, same rounds and epochs)", "",
            f"- time from `nvflare poc start` to all sites registered: **{poc['registration_seconds']:.1f} s**",
            f"- job wall time (submission to completion, incl. cross-site evaluation): {poc['wall_seconds']:.1f} s",
            f"- federation overhead (round wall time / slowest site's pure training time), median over rounds "
            f"1..{len(poc['overhead'])}: **{poc['overhead_median']:.2f}**", ""]  # fmt: skip
    rows = [[r, poc["round_wall_seconds"][r], poc["slowest_train_seconds"][r], poc["overhead"][r]]
            for r in poc["overhead"]]  # fmt: skip
    out += [table(["round", "round wall s", "slowest site train s", "overhead"], rows, ".2f"), ""]
    rows = [[name, rss / 2**20] for name, rss in poc["peak_rss_bytes"].items()]
    out += ["Peak resident memory (sum over each participant's processes, sampled every 0.5 s):", "",
            table(["participant", "peak RSS MiB"], rows, ".0f"), ""]  # fmt: skip
    b = poc.get("bytes", {})
    out += [f"Bytes per round in POC: server->sites {b.get('server_to_site_per_round', float('nan')):.0f}, "
            f"sites->server {b.get('site_to_server_per_round', float('nan')):.0f}.", ""]  # fmt: skip
    rows = [[t["site"], t["rounds"], t["train_seconds"], t["cases_per_s"], t["patches_per_s"], t["voxels_per_s"]]
            for t in poc["throughput"]]  # fmt: skip
    rows += [[t["site"], t["rounds"], t["train_seconds"], t["cases_per_s"],
              t["patches_per_s"], t["voxels_per_s"]] for t in results.get("centralised_throughput", [])]  # fmt: skip
    out += ["Training throughput per site (pure training time; a case = one pass over a volume = "
            "`samples_per_volume` patches):", "",
            table(["site", "rounds", "train s", "cases/s", "patches/s", "voxels/s"], rows, ".1f"), ""]  # fmt: skip
    return out


def summary_text(results: dict) -> str:
    """The final tables (also printed to stdout)."""
    glob, own = dice_tables(results)
    goal_rows = [[g["goal"], g["measured"], {True: "met", False: "NOT met", None: "not measured"}[g["met"]]]
                 for g in results["goals"]]  # fmt: skip
    lines = ["### Global / reference model, validation Dice per site", "", glob, "",
             "### Each site's own final model at that site", "", own, "",
             "### Goals (issue 6)", "", table(["goal", "measured", "result"], goal_rows), ""]  # fmt: skip
    return "\n".join(lines + cost_sections(results))


def report_markdown(results: dict, plots: dict[str, str | None]) -> str:
    meta, cfg = results["meta"], results["config"]
    lines = [
        "# fedseg3d benchmark: does federation pay, and what does it cost",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date_utc']}; benchmark wall time {meta['wall_seconds'] / 60:.1f} min",
        f"- machine: {meta['machine']}",
        f"- load (os.getloadavg, 1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
        f"1-min load sampled every 10 s: min {meta['load_1min']['min']:.2f}, mean {meta['load_1min']['mean']:.2f}, "
        f"max {meta['load_1min']['max']:.2f} (the CPU was shared with other work: timings are indicative)",
        "- phases: "
        + "; ".join(
            f"{p['phase']} {p['seconds']:.0f} s (1-min load {p['load_1min_at_start']:.1f} at its start)"
            for p in meta.get("phases", [])
        )  # fmt: skip
        + ".",
        "- GPU: none on this machine; GPU figures were not run.",
        f"- setup: mode `{cfg['mode']}`, {cfg['sites']} synthetic sites (seed {cfg['seed']}, fov {cfg['fov_mm']} mm, "
        f"cases_scale {cfg['cases_scale']}), {cfg['rounds']} rounds x {cfg['local_epochs']} local epochs = "
        f"**{cfg['total_epochs']} epochs over each site's training data for every method**; model and "
        f"preprocessing from `jobs/unet3d_fedbn`.",
        "- Dice is mean foreground Dice (organ, lesion) on each site's validation cases, which no method trains on "
        "and which select nothing here (final models are scored, not best checkpoints).",
        "- federated methods ran for real in the FLARE simulator (Dice, bytes); the cost figures come from a "
        "separate POC run of the same job. Every method starts from the same seeded initial model.",
        "- equal data budget is not equal optimizer steps: per epoch the pooled model takes one step per batch of "
        "*all* sites' patches, while each federated round averages site models that each took steps on their own "
        "data only.",
        "- one seed, one run per method: the per-round table below shows how much the mean Dice swings from one "
        "round to the next; differences smaller than that swing are not established by this run.",
        "- throughput: in POC the sites train at the same time, 4 single-thread processes on the shared cores; the "
        '"no FLARE" rows train one model at a time on one thread, so they are not slowed by the other sites.',
        "",
        summary_text(results),
        "### Mean Dice after each round",
        "",
        "Federated: the global model each site received at the start of the round (round 0: the initial model; the "
        "last row: the final global model). Local-only: each site's own model on its own validation cases. Pooled: "
        "the pooled model on every site's validation cases.",
        "",
        rounds_table(results),
        "",
        "### Local-only models on every site",
        "",
        local_only_matrix(results),
        "",
        "### Plots",
        "",
    ]
    captions = {
        "dice_per_round": "Mean Dice per round",
        "dice_per_site": "Final Dice per site",
        "dice_vs_bytes": "Dice against bytes",
        "dice_vs_epsilon": "Dice against epsilon",
    }
    for key, caption in captions.items():
        lines.append(f"![{caption}]({plots[key]})" if plots.get(key) else f"{caption}: not drawn (no data).")
        lines.append("")
    lines += ["", "### Not run / not available", ""]
    lines += [f"- {name}: {why}" for name, why in results["not_run"].items()]
    return "\n".join(lines) + "\n"
