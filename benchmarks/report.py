"""``report.md`` and the stdout summary from ``results.json`` (see ``render`` for tables and plots)."""

from __future__ import annotations

from benchmarks.power import power_markdown
from benchmarks.render import dice_tables, label, local_only_matrix, table
from benchmarks.report_stats import dice_interval_tables, goals_table, paired_table, wall_table
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
    """The final tables (also printed to stdout): intervals over seeds, paired differences, goals, power, cost."""
    lines = [*dice_interval_tables(results), *paired_table(results), *goals_table(results),
             *power_markdown(results["power"]), *wall_table(results)]  # fmt: skip
    return "\n".join(lines + cost_sections(results))


def _setup_lines(results: dict) -> list[str]:
    meta, cfg = results["meta"], results["config"]
    work = (
        f"{cfg['rounds']} rounds x {cfg['local_steps']} local steps"
        if cfg.get("local_steps")
        else f"{cfg['rounds']} rounds x {cfg['local_epochs']} local epochs"
    )
    data = (
        f"{cfg['sites']} synthetic sites drawn afresh for every seed (fov {cfg['fov_mm']} mm, cases_scale "
        f"{cfg['cases_scale']})"
        if cfg["task"] == "synthetic"
        else f"{cfg['sites']} real sites (`fedseg3d data real`, one subject each, the same for every seed)"
    )
    modalities = ", ".join(f"{s} {m}" for s, m in cfg.get("modalities", {}).items())
    val = ", ".join(f"{s} {n}" for s, n in cfg.get("val_cases_per_site", {}).items())
    knobs = ", ".join(f"`{k}={v}`" for k, v in cfg.get("task_overrides", {}).items()) or "none (the stock task)"
    return [
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date_utc']}; benchmark wall time {meta['wall_seconds'] / 60:.1f} min",
        f"- machine: {meta['machine']}",
        f"- load (os.getloadavg, 1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
        f"1-min load sampled every 10 s: min {meta['load_1min']['min']:.2f}, mean {meta['load_1min']['mean']:.2f}, "
        f"max {meta['load_1min']['max']:.2f} (the CPU was shared with other work: timings are indicative)",
        "- phases: " + "; ".join(f"{p['phase']} {p['seconds']:.0f} s" for p in meta.get("phases", [])) + ".",
        f"- task `{cfg['task']}`: {data}; modality per site: {modalities}; validation cases per site: {val}; "
        f"task knobs: {knobs}",
        f"- seeds {', '.join(map(str, cfg['seeds']))}, the same for every method (a seed fixes the initial model, "
        f"training order and, for synthetic sites, the data); {work} for every method; model and preprocessing "
        "from `jobs/unet3d_fedbn` built with the task knobs. Runs are not bit-reproducible: the simulator aggregates "
        "in arrival order, so the interval covers that too.",
        "- Dice is mean foreground Dice on each site's validation cases, which no method trains on and which select "
        "nothing here (final models are scored). A class absent from a site's validation cases is left out of that "
        "site's figures (docs/real_data.md).",
        "- local-only and pooled build each site's data from its own `site.json` (label map, intensity), as the "
        "federated sites do; pooled takes `local_steps` steps per site per round when work is counted in steps.",
    ]


def report_markdown(results: dict, plots: dict[str, str | None]) -> str:
    first = results["stats"]["seeds"][0]
    lines = [
        "# fedseg3d benchmark: does federation pay, and what does it cost",
        "",
        *_setup_lines(results),
        "",
        summary_text(results),
        f"### Seed {first} alone: global and own models per site",
        "",
        *_first_seed_tables(results),
        f"### Mean Dice after each round (seed {first})",
        "",
        "Federated: the global model each site received at the start of the round (round 0: the initial model; the "
        "last row: the final global model). Local-only: each site's own model on its own validation cases. Pooled: "
        "the pooled model on every site's validation cases.",
        "",
        rounds_table(results),
        "",
        f"### Local-only models on every site (seed {first})",
        "",
        local_only_matrix(results) if "local_only" in results["methods"] else "local-only did not run.",
        "",
        "### Plots",
        "",
    ]
    captions = {
        "dice_intervals": "Dice per method and site, 95% intervals over seeds",
        "dice_per_round": f"Mean Dice per round (seed {first})",
        "dice_per_site": f"Final Dice per site (seed {first})",
        "dice_vs_bytes": f"Dice against bytes (seed {first})",
    }
    for key, caption in captions.items():
        lines.append(f"![{caption}]({plots[key]})" if plots.get(key) else f"{caption}: not drawn (no data).")
        lines.append("")
    lines += ["", "### Not run / not available", ""]
    lines += [f"- {name}: {why}" for name, why in results["not_run"].items()]
    return "\n".join(lines) + "\n"


def _first_seed_tables(results: dict) -> list[str]:
    glob, own = dice_tables(results)
    return ["Global / reference model:", "", glob, "", "Each site's own final model at that site:", "", own, ""]
