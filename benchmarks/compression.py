"""Dice against bytes on the wire for each compression scheme, from real FLARE simulator runs on synthetic sites.

Every variant runs the same FedBN job (same data, seeds, rounds and local steps) in the FLARE simulator; only the
filters differ. Bytes come from the server's ``fedseg3d/message_sizes.jsonl`` (each message as serialised: what the
server sends after its quantiser, what it receives before its dequantiser), Dice from the sites' validation of each
round's incoming global model (``contributions.jsonl``) and from cross-site evaluation of the final global model
(``cross_site_val/cross_val_results.json``, sent in float32 so it scores the model, not the codec). The float32 job
runs more than once: FLARE aggregates in arrival order and the site threads race, so its spread is the noise floor
against which a Dice change is judged.

Variants: ``fp32`` (``unet3d_fedbn``), ``fp16`` / ``int8`` / ``int4`` / ``topk`` (fedseg3d's filters, both
directions, downlink as differences), and ``nvflare_fp16``: NVFlare's own ``ModelQuantizer`` / ``ModelDequantizer``
(float16) in both directions. That one needs ``bitsandbytes``; its 8- and 4-bit modes need CUDA, and it rejects int64
arrays, so the downlink drops ``num_batches_tracked`` with ``ExcludeVars`` first (FedBN sites ignore norm state).

Usage:
    python benchmarks/compression.py [--rounds 10] [--local-steps 20] [--fp32-repeats 2] [--variants fp32,int8]
        [--workspace workspace/bench_compression] [--out docs/compression_benchmark]
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

from benchmarks.machine import describe, machine_info  # noqa: E402
from fedseg3d.data.synthetic import generate_sites  # noqa: E402
from fedseg3d.tools.build_jobs import build_jobs  # noqa: E402
from fedseg3d.tools.simulate import run_simulation  # noqa: E402

SITES = ["site-1", "site-2"]
QUANT_JOB = "unet3d_fedbn_int8"
VARIANTS = {
    "fp32": ("unet3d_fedbn", {}),
    "nvflare_fp16": ("unet3d_fedbn", {}),
    # fp16 has no blocks: the filters refuse a block size rather than ignore it, hence the nulls.
    "fp16": (
        QUANT_JOB,
        {
            "uplink_scheme": "fp16",
            "uplink_block_size": None,
            "downlink_scheme": "fp16",
            "downlink_block_size": None,
            "downlink_full_scheme": "fp16",
        },
    ),
    "int8": (QUANT_JOB, {}),
    "int4": ("unet3d_fedbn_int4", {}),
    "topk": ("unet3d_fedbn_topk", {}),
    "topk20": ("unet3d_fedbn_topk", {"uplink_topk_fraction": 0.2, "downlink_topk_fraction": 0.2}),
    # Which direction costs top-k its Dice: top-k one way, int8 the other.
    "topk_up_int8_down": ("unet3d_fedbn_topk", {"downlink_scheme": "int8"}),
    "int8_up_topk_down": ("unet3d_fedbn_topk", {"uplink_scheme": "int8"}),
}
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


def build_variant(name: str, out: Path, rounds: int, local_steps: int) -> Path:
    job, overrides = VARIANTS[name]
    overrides = {**overrides, "num_rounds": rounds, "sites_per_round": len(SITES), "local_steps": local_steps}
    (job_dir,) = build_jobs(REPO / "jobs", out, [job], overrides, min_clients=len(SITES))
    if name == "nvflare_fp16":
        _use_nvflare_quantizer(job_dir / "app" / "config")
    return job_dir


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarise(workspace: Path) -> dict:
    """Per round: mean bytes per site and direction (train task), mean Dice of the incoming global model."""
    run = workspace / "server" / "simulate_job"
    sizes = [e for e in _jsonl(run / "fedseg3d" / "message_sizes.jsonl") if e["task"] == "train"]
    contributions = _jsonl(run / "fedseg3d" / "contributions.jsonl")
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


def render(results: dict, meta: dict) -> str:
    fp32 = [results[k] for k in results if k.startswith("fp32")]
    base = {k: statistics.mean(r[k] for r in fp32) for k in fp32[0] if k.endswith("_total")}
    base_dice = statistics.mean(r["final_global_dice"] for r in fp32)
    spread = max(r["final_global_dice"] for r in fp32) - min(r["final_global_dice"] for r in fp32)
    lines = [
        "# Compression benchmark: Dice against bytes on the wire",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; load average before/after "
        f"{meta['load_before']} / {meta['load_after']}; {meta['seconds']:.0f} s in all). Raw numbers: "
        f"`{meta['raw_numbers']}`. {meta.get('note', '')}",
        "",
        f"Setup: FedBN `unet3d_tiny`, {meta['sites']} synthetic sites (`generate_sites(seed={meta['data_seed']})`), "
        f"{meta['rounds']} rounds of {meta['local_steps']} local steps, FLARE simulator, same seeds for every "
        "variant. Bytes: `train` messages only, as serialised (server's `fedseg3d/message_sizes.jsonl`), summed over "
        "rounds and sites; ratios against the mean of the float32 runs. Dice: final global model, cross-site "
        "evaluation, mean over sites (each with its own batch norm); delta against the float32 mean. "
        f"Run-to-run spread of the float32 runs' final Dice (max - min over {len(fp32)} runs): {spread:.4f}. "
        "`streamed x`: the same ratio for the bytes FLARE moves through its download service between real "
        "processes (one npz item per array, see `fedseg3d.filters.message_size`).",
        "",
        "| variant | up bytes | up x | up streamed x | down bytes | down x | down streamed x "
        "| down x after round 0 | final Dice | Dice - fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        later = [p for p in r["per_round"] if p["round"] > 0 and p["down_bytes"]]
        base_later = [p["down_bytes"] for f in fp32 for p in f["per_round"] if p["round"] > 0 and p["down_bytes"]]
        down_later = (
            f"{statistics.mean(base_later) / statistics.mean(p['down_bytes'] for p in later):.2f}"
            if later and base_later
            else "-"
        )
        dice = r["final_global_dice"]
        x = {k: base[k] / max(r[k], 1) for k in base}
        lines.append(
            f"| {name} | {r['up_bytes_total']:,} | {x['up_bytes_total']:.2f} | {x['up_streamed_bytes_total']:.2f} | "
            f"{r['down_bytes_total']:,} | {x['down_bytes_total']:.2f} | {x['down_streamed_bytes_total']:.2f} | "
            f"{down_later} | {dice:.4f} | {dice - base_dice:+.4f} |"
        )
    lines += ["", "Per round (mean over sites): bytes up / down, Dice of the global model the sites received.", ""]
    lines += ["| variant | round | up bytes | down bytes | global Dice |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for p in r["per_round"]:
            dice = p["global_dice_before_round"]
            lines.append(
                f"| {name} | {p['round']} | {p['up_bytes'] or 0:,.0f} | {p['down_bytes'] or 0:,.0f} | "
                f"{'-' if dice is None else f'{dice:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--fp32-repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench_compression")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "compression_benchmark")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--note", default="", help="a sentence added to the report (for example about the machine)")
    parser.add_argument(
        "--report-only", action="store_true", help="summarise the run folders already under --workspace, no runs"
    )
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "fp32" not in names:
        parser.error(f"variants must include fp32 and come from {sorted(VARIANTS)}; unknown: {unknown}")
    runs = [f"fp32#{i + 1}" for i in range(args.fp32_repeats)] + [n for n in names if n != "fp32"]

    started, load_before = time.time(), os.getloadavg()
    data = args.workspace / "data"
    if not args.report_only and not (data / "site-2" / "datalist.json").is_file():
        print(f"writing synthetic sites to {data}", flush=True)
        generate_sites(data, n_sites=len(SITES), seed=args.data_seed)
    results = {}
    for run in runs:
        name = run.split("#")[0]
        workspace = args.workspace / "runs" / run.replace("#", "_")
        if args.report_only:
            results[run] = {**summarise(workspace), "seconds": None}
            continue
        job_dir = build_variant(name, args.workspace / "jobs" / run.replace("#", "_"), args.rounds, args.local_steps)
        shutil.rmtree(workspace, ignore_errors=True)  # the recorders append: a stale run would add its lines
        t0 = time.time()
        print(f"{run}: simulating {job_dir.name} ...", flush=True)
        code = run_simulation(job_dir, workspace, data, SITES, timeout=args.timeout)
        if code != 0:
            raise SystemExit(f"{run}: simulator exited with {code}; logs under {workspace}")
        results[run] = {**summarise(workspace), "seconds": time.time() - t0}
        r = results[run]
        print(
            f"{run}: {r['seconds']:.0f} s, up {r['up_bytes_total']:,} B, down {r['down_bytes_total']:,} B, "
            f"final global Dice {r['final_global_dice']:.4f}",
            flush=True,
        )
    meta = {
        "command": "python benchmarks/compression.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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
        "raw_numbers": os.path.relpath(args.out.with_suffix(".json"), REPO),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = render(results, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
