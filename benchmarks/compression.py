"""Dice against bytes on the wire for each compression scheme, from real FLARE simulator runs on synthetic sites.

Every variant runs the same FedBN job (same data, seeds, rounds and local steps) in the FLARE simulator; only the
filters differ. Bytes come from the server's ``fedseg3d/message_sizes.jsonl`` (each message as serialised: what the
server sends after its quantiser, what it receives before its dequantiser), Dice from the sites' validation of each
round's incoming global model (``contributions.jsonl``) and from cross-site evaluation of the final global model
(``cross_site_val/cross_val_results.json``, sent in float32 so it scores the model, not the codec).

Every variant runs ``--repeats`` times; repeat i sets the sites' training seed (patch sampling, augmentation) and
the rounding seed to i for every variant, so repeat i of two variants differ only in their filters. Single runs are
too noisy to judge a 0.01 Dice change (two float32 runs with the same seeds differed by 0.018: FLARE aggregates in
arrival order and the site threads race), so the report gives each variant's mean and spread over its repeats and
the difference from float32 with a 95% confidence interval (Welch's t).

Variants: ``fp32`` (``unet3d_fedbn``), ``fp16`` / ``int8`` / ``int4`` / ``int3`` / ``int2`` / ``topk``
(``unet3d_fedbn_quantized`` built with ``--set scheme=...``: fedseg3d's filters, both directions, downlink as
differences, one payload per message), and ``nvflare_fp16``: NVFlare's own ``ModelQuantizer`` / ``ModelDequantizer``
(float16) in both directions. That one needs ``bitsandbytes``; its 8- and 4-bit modes need CUDA, and it rejects
int64 arrays, so the downlink drops ``num_batches_tracked`` with ``ExcludeVars`` first (FedBN sites ignore norm
state). ``int4_per_tensor`` is ``int4`` with one array per tensor (``single_payload`` false), the wire format before
one payload per message, to show what the framing costs; ``int3_no_ef`` is ``int3`` without the uplink's error
feedback.

Usage:
    python benchmarks/compression.py [--rounds 10] [--local-steps 20] [--repeats 3] [--variants fp32,int8]
        [--workspace workspace/bench_compression] [--out-dir docs] [--resume] [--report-only]

It writes the one current report, ``<out-dir>/compression_benchmark.md``, ``.json`` (every round of every run) and
``.png`` (Dice against bytes).

``--resume`` keeps runs that already finished under ``--workspace`` (so variants can be added in later calls);
``--report-only`` summarises every finished run there without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "custom"), str(REPO)]

from benchmarks.config import is_quantised_job  # noqa: E402
from benchmarks.federated import read_jsonl  # noqa: E402
from benchmarks.machine import describe, machine_info  # noqa: E402
from benchmarks.report_plots import plot_compression_variants  # noqa: E402
from fedseg3d.data.synthetic import generate_sites  # noqa: E402
from fedseg3d.tools.build_jobs import build_jobs  # noqa: E402
from fedseg3d.tools.simulate import run_simulation  # noqa: E402

SITES = ["site-1", "site-2"]
# Every scheme is the one quantised job with ``--set`` overrides, as a user would build it.
QUANT_JOB = "unet3d_fedbn_quantized"
VARIANTS = {
    "fp32": ("unet3d_fedbn", {}),
    "nvflare_fp16": ("unet3d_fedbn", {}),
    # FLARE's default polling (the jobs ask every 0.25 s): a control for the float32 runs' spread.
    "fp32_slowpoll": ("unet3d_fedbn", {"task_request_interval": 2.0, "task_check_period": 0.5}),
    "fp16": (QUANT_JOB, {"scheme": "fp16"}),
    "int8": (QUANT_JOB, {"scheme": "int8"}),
    "int4": (QUANT_JOB, {"scheme": "int4"}),
    "int3": (QUANT_JOB, {"scheme": "int3"}),
    "int2": (QUANT_JOB, {"scheme": "int2"}),
    "int4_per_tensor": (QUANT_JOB, {"scheme": "int4", "single_payload": False}),
    # What the uplink's error feedback buys at 3 bits (the downlink always has it: differences from the site's copy).
    "int3_no_ef": (QUANT_JOB, {"scheme": "int3", "error_feedback": False}),
    "topk": (QUANT_JOB, {"scheme": "topk"}),
}
REPORT_NAME = "compression_benchmark"
NVFLARE_Q = "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer"
NVFLARE_DQ = "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer"


def _filters(chains: list[dict], task: str) -> list[dict]:
    return next(c["filters"] for c in chains if task in c["tasks"])


def _use_nvflare_quantizer(app_config: Path) -> None:
    """Rewrite the fp32 job's train-task chains to NVFlare's float16 quantiser pair (recorders stay where they are)."""
    quantize = {"path": NVFLARE_Q, "args": {"quantization_type": "float16"}}
    dequantize = {"path": NVFLARE_DQ, "args": {}}
    server_path, client_path = app_config / "config_fed_server.json", app_config / "config_fed_client.json"
    server, client = json.loads(server_path.read_text()), json.loads(client_path.read_text())
    exclude = {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars", "args": {"exclude_vars": "num_batches"}}
    _filters(server["task_data_filters"], "train")[:0] = [exclude, quantize]
    _filters(server["task_result_filters"], "train").append(dequantize)
    client["task_data_filters"] = [{"tasks": ["train"], "filters": [dequantize]}]
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [quantize]}]
    server_path.write_text(json.dumps(server, indent=2))
    client_path.write_text(json.dumps(client, indent=2))


def build_variant(name: str, out: Path, rounds: int, local_steps: int, repeat: int) -> Path:
    """The variant's job with the benchmark's budget; ``repeat`` seeds the sites' training and the rounding."""
    job, overrides = VARIANTS[name]
    seeds = {"seed": repeat, "quant_seed": repeat} if is_quantised_job(job) else {"seed": repeat}
    overrides = {
        **overrides,
        **seeds,
        "num_rounds": rounds,
        "sites_per_round": len(SITES),
        "local_steps": local_steps,
    }
    (job_dir,) = build_jobs(REPO / "jobs", out, [job], overrides, min_clients=len(SITES))
    if name == "nvflare_fp16":
        _use_nvflare_quantizer(job_dir / "app" / "config")
    return job_dir


def summarise(workspace: Path) -> dict:
    """Per round: mean bytes per site and direction (train task), mean Dice of the incoming global model."""
    run = workspace / "server" / "simulate_job"
    sizes = [e for e in read_jsonl(run / "fedseg3d" / "message_sizes.jsonl") if e["task"] == "train"]
    contributions = read_jsonl(run / "fedseg3d" / "contributions.jsonl")
    rounds = sorted({e["round"] for e in sizes if isinstance(e["round"], int)})
    per_round = []
    for r in rounds:
        up = [e["bytes"] for e in sizes if e["round"] == r and e["direction"] == "site_to_server"]
        down = [e["bytes"] for e in sizes if e["round"] == r and e["direction"] == "server_to_site"]
        dice = [
            c["initial_metrics"]["val_mean_dice"]
            for c in contributions
            if c.get("round") == r and isinstance(c.get("initial_metrics"), dict)
        ]
        per_round.append(
            {
                "round": r,
                "up_bytes": statistics.mean(up) if up else None,
                "down_bytes": statistics.mean(down) if down else None,
                "global_dice_before_round": statistics.mean(dice) if dice else None,
            }
        )
    matrix_path = run / "cross_site_val" / "cross_val_results.json"
    final = None
    if matrix_path.is_file():
        matrix = json.loads(matrix_path.read_text())
        final = statistics.mean(matrix[s]["SRV_FL_global_model.pt"]["val_mean_dice"] for s in matrix)
    totals = {}
    for field in ("bytes", "streamed_bytes"):
        for direction, short in (("site_to_server", "up"), ("server_to_site", "down")):
            totals[f"{short}_{field}_total"] = sum(e[field] for e in sizes if e["direction"] == direction)
    return {"per_round": per_round, "final_global_dice": final, **totals}


def _variant(run: str) -> str:
    return run.split("#")[0]


def dice_difference(values: list[float], baseline: list[float]) -> dict[str, float | None]:
    """Mean Dice difference from the baseline and its 95% confidence interval (Welch's t; None below 2 runs each)."""
    from scipy import stats  # only the report needs it (installed with opacus)

    diff = statistics.mean(values) - statistics.mean(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return {"diff": diff, "low": None, "high": None}
    test = stats.ttest_ind(values, baseline, equal_var=False)
    interval = test.confidence_interval(0.95)
    return {"diff": diff, "low": float(interval.low), "high": float(interval.high)}


def summarise_variants(results: dict) -> dict[str, dict]:
    """Per variant: runs, byte ratios against float32 (mean bytes over its runs), Dice mean/sd and difference."""
    fp32 = [r for k, r in results.items() if _variant(k) == "fp32"]
    base = {k: statistics.mean(r[k] for r in fp32) for k in fp32[0] if k.endswith("_total")}
    base_later = [p["down_bytes"] for f in fp32 for p in f["per_round"] if p["round"] > 0 and p["down_bytes"]]
    base_dice = [r["final_global_dice"] for r in fp32]
    out = {}
    for name in dict.fromkeys(_variant(k) for k in results):
        runs = [r for k, r in results.items() if _variant(k) == name]
        dice = [r["final_global_dice"] for r in runs]
        later = [p["down_bytes"] for r in runs for p in r["per_round"] if p["round"] > 0 and p["down_bytes"]]
        ratios = {k: base[k] / max(statistics.mean(r[k] for r in runs), 1) for k in base}
        out[name] = {
            "runs": len(runs),
            "up_bytes_per_round": statistics.mean(p["up_bytes"] for r in runs for p in r["per_round"]),
            "up_x": ratios["up_bytes_total"],
            "up_streamed_x": ratios["up_streamed_bytes_total"],
            "down_x": ratios["down_bytes_total"],
            "down_streamed_x": ratios["down_streamed_bytes_total"],
            "down_x_after_round_0": statistics.mean(base_later) / statistics.mean(later) if later else None,
            "dice_mean": statistics.mean(dice),
            "dice_sd": statistics.stdev(dice) if len(dice) > 1 else None,
            "dice_runs": dice,
            "dice_vs_fp32": dice_difference(dice, base_dice),
        }
    return out


def _interval(d: dict) -> str:
    return "-" if d["low"] is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]"


def render(results: dict, meta: dict) -> str:
    variants = summarise_variants(results)
    if meta.get("report_only"):
        origin = (
            f"Assembled by `{meta['command']}` on {meta['date']} from the finished runs under its workspace "
            f"({meta['machine']}; each run's seconds are listed below). Raw numbers: `{meta['raw_numbers']}`."
        )
    else:
        origin = (
            f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; load average before/after "
            f"{meta['load_before']} / {meta['load_after']}; {meta['seconds']:.0f} s in all). Raw numbers: "
            f"`{meta['raw_numbers']}`."
        )
    lines = [
        "# Compression benchmark: Dice against bytes on the wire",
        "",
        f"{origin} {meta.get('note', '')}",
        "",
        f"Setup: FedBN `unet3d_tiny`, {meta['sites']} synthetic sites (`generate_sites(seed={meta['data_seed']})`), "
        f"{meta['rounds']} rounds of {meta['local_steps']} local steps, FLARE simulator. Repeat i of every variant "
        "uses training seed i and rounding seed i. Bytes: `train` messages only, as serialised (server's "
        "`fedseg3d/message_sizes.jsonl`), summed over rounds and sites; `x` is the float32 runs' mean bytes over "
        "the variant's mean bytes. `streamed x`: the same for the bytes FLARE moves through its download service "
        "between real processes (one npz item per array, see `fedseg3d.filters.message_size`). `down x` counts "
        "every round, including the first, full model; `down x after 0` only the differences. Dice: final global "
        "model, cross-site evaluation, mean over sites (each with its own batch norm). `Dice - fp32`: difference "
        "of means, with the 95% confidence interval of Welch's t over the runs.",
        "",
        "| variant | runs | bytes up / round | up x | up streamed x | down x | down streamed x | down x after 0 "
        "| Dice mean | Dice sd | Dice - fp32 | 95% CI |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in variants.items():
        later = "-" if v["down_x_after_round_0"] is None else f"{v['down_x_after_round_0']:.2f}"
        sd = "-" if v["dice_sd"] is None else f"{v['dice_sd']:.4f}"
        d = v["dice_vs_fp32"]
        diff, interval = ("-", "-") if name == "fp32" else (f"{d['diff']:+.4f}", _interval(d))
        lines.append(
            f"| {name} | {v['runs']} | {v['up_bytes_per_round']:,.0f} | {v['up_x']:.2f} | {v['up_streamed_x']:.2f} | "
            f"{v['down_x']:.2f} | {v['down_streamed_x']:.2f} | {later} | {v['dice_mean']:.4f} | {sd} | "
            f"{diff} | {interval} |"
        )
    lines += ["", f"![Dice against bytes]({REPORT_NAME}.png)", ""]
    lines += ["Every run: final Dice, seconds (bytes and Dice of every round are in the JSON).", ""]
    lines += ["| run | final Dice | seconds |", "| --- | ---: | ---: |"]
    for run, r in results.items():
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {run} | {r['final_global_dice']:.4f} | {seconds} |")
    return "\n".join(lines) + "\n"


def _without_note(argv: list[str]) -> list[str]:
    """The command line without ``--note TEXT`` (the note is printed on its own)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg == "--note":
            skip = not skip
            continue
        out.append(arg)
    return [a for a in out if not a.startswith("--note=")]


def _finished(workspace: Path) -> bool:
    return (workspace / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant (seeds 0 .. repeats-1)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench_compression")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where the report is written")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--note", default="", help="a sentence added to the report (for example about the machine)")
    parser.add_argument("--resume", action="store_true", help="keep runs that already finished under --workspace")
    parser.add_argument(
        "--report-only", action="store_true", help="summarise the finished runs under --workspace, no runs"
    )
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "fp32" not in names or args.repeats < 1:
        parser.error(f"variants must include fp32 and come from {sorted(VARIANTS)} (unknown: {unknown}); repeats >= 1")
    runs = [f"{name}#{i + 1}" for name in names for i in range(args.repeats)]
    out = args.out_dir / REPORT_NAME
    if args.report_only:  # every finished run of a requested variant, whatever its number
        found = sorted((args.workspace / "runs").glob("*_*"))
        runs = ["#".join(d.name.rsplit("_", 1)) for d in found]  # "int3_no_ef_2" is run 2 of "int3_no_ef"
        runs = sorted((r for r in runs if _variant(r) in names), key=lambda r: (names.index(_variant(r)), r))
        runs = [r for r in runs if _finished(args.workspace / "runs" / r.replace("#", "_"))]

    started, load_before = time.time(), os.getloadavg()
    data = args.workspace / "data"
    if not args.report_only and not (data / "site-2" / "datalist.json").is_file():
        print(f"writing synthetic sites to {data}", flush=True)
        generate_sites(data, n_sites=len(SITES), seed=args.data_seed)
    results = {}
    for run in runs:
        name, repeat = _variant(run), int(run.split("#")[1]) - 1
        workspace = args.workspace / "runs" / run.replace("#", "_")
        timing = workspace / "seconds.json"
        if args.report_only or (args.resume and _finished(workspace)):
            seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
            results[run] = {**summarise(workspace), "seconds": seconds}
            continue
        job_dir = build_variant(
            name, args.workspace / "jobs" / run.replace("#", "_"), args.rounds, args.local_steps, repeat
        )
        shutil.rmtree(workspace, ignore_errors=True)  # the recorders append: a stale run would add its lines
        t0 = time.time()
        print(f"{run}: simulating {job_dir.name} ...", flush=True)
        code = run_simulation(job_dir, workspace, data, SITES, timeout=args.timeout)
        if code != 0:
            raise SystemExit(f"{run}: simulator exited with {code}; logs under {workspace}")
        seconds = time.time() - t0
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
        results[run] = {**summarise(workspace), "seconds": seconds}
        r = results[run]
        print(
            f"{run}: {r['seconds']:.0f} s, up {r['up_bytes_total']:,} B, down {r['down_bytes_total']:,} B, "
            f"final global Dice {r['final_global_dice']:.4f}",
            flush=True,
        )
    meta = {
        "command": "python benchmarks/compression.py "
        + " ".join(_without_note(argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe(machine_info()),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": time.time() - started,
        "sites": len(SITES),
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "data_seed": args.data_seed,
        "note": args.note,
        "report_only": args.report_only,
        "raw_numbers": os.path.relpath(out.with_suffix(".json"), REPO),
    }
    summary = summarise_variants(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {"meta": meta, "variants": summary, "results": results}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    plot_compression_variants(summary, out.with_suffix(".png"))
    table = render(results, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
