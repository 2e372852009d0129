"""Build a federated job for the benchmark, run it for real (FLARE simulator), and read back what it measured.

The benchmark seeds the server's initial model with its ``--seed`` and adds one probe to the built copy of each job
(never to the committed job): FLARE's filter chain gets
``fedseg3d.filters.message_size.MessageSizeRecorder`` last on the site's results (bytes site -> server) and on the
server's task data (bytes server -> site), so byte figures are of serialised messages, after any quantiser.
Everything else comes from files the job writes anyway: the cross-site matrix and ``contributions.jsonl`` (global
model Dice before each round, the site's pure training time and work in ``site_metrics``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import JOBS_DIR, BenchConfig, job_overrides
from fedseg3d.data.site_config import SITES_ROOT_ENV
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.privacy_audit import find_epsilons
from fedseg3d.tools.simulate import job_outcome_code, run_process_group, simulator_command

RECORDER = "fedseg3d.filters.message_size.MessageSizeRecorder"
BYTES_FILES = {"site_to_server": "bench_bytes_up.jsonl", "server_to_site": "bench_bytes_down.jsonl"}
GLOBAL = "global"
# The benchmark measures the epsilon a run spends; a site budget must never stop it (the ledger still records it).
UNREACHABLE_BUDGET = 1e6
BUDGET_DELTA = 1e-5
KEY_METRIC = "val_mean_dice"
CLASS_PREFIX = "val_dice_"


@dataclass
class FederatedResult:
    """What one federated run measured.

    Attributes:
        per_round: rounds completed (0 = initial model) -> site -> Dice of the global model at that site.
        matrix: evaluating site -> model owner (a site, or ``global`` for the final global model) -> Dice.
        class_matrix: the same, with each foreground class's Dice (``val_dice_<class>``) in place of the mean.
        rounds: one dict per (round, site) contribution: time, train_seconds, train_cases, train_voxels, ...
        bytes_per_round: direction -> round -> bytes summed over sites.
        epsilon: site -> the largest privacy epsilon the site reported (DP jobs only).
        wall_seconds: the whole run (simulator process, or POC submission to completion).
    """

    job: str
    per_round: dict[int, dict[str, float]] = field(default_factory=dict)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)
    class_matrix: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    bytes_per_round: dict[str, dict[int, int]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = math.nan


def _append_filter(config: dict, chain: str, entry: dict) -> None:
    """Put ``entry`` last in the chain for the ``train`` task (after a job's own filters, e.g. a quantiser)."""
    chains = config.setdefault(chain, [])
    for item in chains:
        if "train" in item.get("tasks", []):
            item.setdefault("filters", []).append(entry)
            return
    chains.append({"tasks": ["train"], "filters": [entry]})


def add_byte_probes(job_dir: Path) -> None:
    """Add the two ``MessageSizeRecorder`` probes to a built job's config files (see the module docstring)."""
    config_dir = job_dir / "app" / "config"
    for filename, chain, direction in (
        ("config_fed_client.json", "task_result_filters", "site_to_server"),
        ("config_fed_server.json", "task_data_filters", "server_to_site"),
    ):
        path = config_dir / filename
        config = json.loads(path.read_text())
        args = {"direction": direction, "output_file": BYTES_FILES[direction]}
        _append_filter(config, chain, {"path": RECORDER, "args": args})
        path.write_text(json.dumps(config, indent=2) + "\n")


def seed_initial_model(job_dir: Path, seed: int) -> None:
    """Give the server persistor's ``PresetUNet`` the benchmark's seed: every method starts from the same weights
    (the ones ``SiteTrainer`` builds from that seed for local-only and pooled)."""
    path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    models = [
        c["args"]["model"] for c in config.get("components", []) if isinstance(c.get("args", {}).get("model"), dict)
    ]
    presets = [m for m in models if m.get("path", "").endswith("PresetUNet")]
    if not presets:
        raise ValueError(f"{path}: no persistor with a fedseg3d PresetUNet model to seed")
    for model in presets:
        model.setdefault("args", {})["seed"] = seed
    path.write_text(json.dumps(config, indent=2) + "\n")


def job_variables(job: str) -> set[str]:
    """The top-level variables a committed job defines (the knobs ``build_jobs`` can override)."""
    names: set[str] = set()
    for filename in ("config_fed_server.json", "config_fed_client.json"):
        config = json.loads((JOBS_DIR / job / "app" / "config" / filename).read_text())
        names.update(k for k, v in config.items() if not isinstance(v, list | dict))
    return names


def build_bench_job(cfg: BenchConfig, job: str, out_dir: Path, knobs: dict[str, Any] | None = None) -> Path:
    """The committed job with the task's and method's ``knobs``, this benchmark's rounds, local work, seed and
    sites, plus the byte probes.

    A job without a ``local_epochs`` knob keeps its own notion of local work (every committed job has one today;
    DP-SGD reads it as expected passes over the patients).
    """
    overrides = job_overrides(cfg, knobs or {})
    known = job_variables(job)
    if "quant_seed" in known:
        overrides["quant_seed"] = cfg.seed  # the rounding noise is part of a seed's run too
    if "local_epochs" not in known:
        print(f"[bench] {job} has no local_epochs knob: it runs its own local work per round", flush=True)
        overrides.pop("local_epochs")
    (job_dir,) = build_jobs(JOBS_DIR, out_dir, [job], overrides, min_clients=cfg.sites)
    add_byte_probes(job_dir)
    seed_initial_model(job_dir, cfg.seed)
    return job_dir


def run_simulated(
    cfg: BenchConfig,
    job: str,
    sites_root: Path,
    work_dir: Path,
    timeout: float,
    knobs: dict[str, Any] | None = None,
    name: str | None = None,
) -> FederatedResult:
    """Run ``job`` with ``knobs`` in the FLARE simulator (one thread per site) and parse its outputs; ``name`` (the
    method) names its build and workspace folders, so two methods from one job do not overwrite each other.

    Raises:
        RuntimeError: the simulator failed.
    """
    name = name or job
    job_dir = build_bench_job(cfg, job, work_dir / "jobs" / name, knobs)
    workspace = work_dir / "sim" / name
    shutil.rmtree(workspace, ignore_errors=True)  # FLARE and the byte probes append to files left by an earlier run
    workspace.mkdir(parents=True)
    log_path = workspace.parent / f"{name}.log"
    # Each run gets fresh site ledgers, so no run's spend is charged to another's.
    privacy_dir = workspace.parent / "privacy" / name
    shutil.rmtree(privacy_dir, ignore_errors=True)
    for site in cfg.site_names:
        write_site_budget(privacy_dir / site, UNREACHABLE_BUDGET, BUDGET_DELTA, overwrite=True)
    env = dict(os.environ, **{SITES_ROOT_ENV: str(sites_root.resolve()), PRIVACY_DIR_ENV: str(privacy_dir.resolve())})
    command = simulator_command(job_dir.resolve(), workspace.resolve(), cfg.site_names, len(cfg.site_names))
    started = time.perf_counter()
    # The simulator's console output goes to a log file: the benchmark prints its own progress and tables.
    with log_path.open("w") as log_file:
        code = run_process_group(command, env, timeout, stdout=log_file)  # kills every worker on timeout/SIGTERM
    code = code or job_outcome_code(job_dir, workspace)  # the simulator exits 0 for a run that every site left
    if code != 0:
        raise RuntimeError(f"simulator run of {job} exited with {code}; see {log_path}")
    server_run = workspace / "server" / "simulate_job"
    site_runs = {site: workspace / site / "simulate_job" for site in cfg.site_names}
    result = parse_run(job, server_run, site_runs)
    result.wall_seconds = time.perf_counter() - started
    return result


def run_simulated_checked(*args: Any, attempts: int = 2, **kwargs: Any) -> FederatedResult:
    """``run_simulated``, run again (at most ``attempts`` times in all) when a site never took part.

    Why: under load the FLARE 2.9 simulator has once started two of its worker processes as the same site (a
    3-site real-data run whose site-2 worker registered as site-1), so the run went on without that site. A result
    that misses a site would compare methods on different federations; it is refused, never reported.

    Raises:
        SiteMissing: a site took no part in the last attempt either.
    """
    for attempt in range(1, attempts + 1):
        try:
            return run_simulated(*args, **kwargs)
        except SiteMissing as err:
            if attempt == attempts:
                raise
            print(f"[bench] {err}; running it again ({attempt + 1}/{attempts})", flush=True)
    raise AssertionError("unreachable")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class SiteMissing(RuntimeError):
    """A site of the federation took no part in a run: no accepted update, or no cross-site evaluation."""


def check_every_site_took_part(job: str, sites: list[str], matrix: dict, contributions: list[dict]) -> None:
    """Raises: SiteMissing: names each site with no accepted update or no row in the cross-site matrix."""
    contributed = {entry["site"] for entry in contributions if entry.get("return_code") == "OK"}
    missing = [site for site in sites if site not in contributed or site not in matrix]
    if missing:
        raise SiteMissing(f"{job}: site(s) {missing} sent no accepted update or did no cross-site evaluation")


def parse_run(job: str, server_run: Path, site_runs: dict[str, Path]) -> FederatedResult:
    """Read a finished run's server folder (cross-site matrix, contributions) and the sites' byte records.

    Raises:
        FileNotFoundError: the cross-site matrix or the contribution log is missing (the job did not finish).
        SiteMissing: a site of ``site_runs`` took no part (see ``check_every_site_took_part``).
    """
    result = FederatedResult(job=job)
    matrix_path = server_run / "cross_site_val" / "cross_val_results.json"
    contributions_path = server_run / "fedseg3d" / "contributions.jsonl"
    for path in (matrix_path, contributions_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the {job} run did not finish")
    for site, scores in json.loads(matrix_path.read_text()).items():
        owners = {
            (GLOBAL if owner == "SRV_FL_global_model.pt" else owner): metrics
            for owner, metrics in scores.items()
            if owner != "SRV_best_FL_global_model.pt"
        }
        result.matrix[site] = {owner: metrics[KEY_METRIC] for owner, metrics in owners.items()}
        result.class_matrix[site] = {
            owner: {k.removeprefix(CLASS_PREFIX): v for k, v in metrics.items() if k.startswith(CLASS_PREFIX)}
            for owner, metrics in owners.items()
        }
    contributions = read_jsonl(contributions_path)
    check_every_site_took_part(job, list(site_runs), result.matrix, contributions)
    last_round = -1
    for entry in contributions:
        if entry.get("return_code") != "OK":
            continue
        r, site = int(entry["round"]), entry["site"]
        last_round = max(last_round, r)
        initial = (entry.get("initial_metrics") or {}).get(KEY_METRIC)
        if initial is not None:
            result.per_round.setdefault(r, {})[site] = float(initial)
        metrics = entry.get("site_metrics") or {}
        result.rounds.append({"round": r, "site": site, "time": entry["time"], "array_bytes": entry.get("array_bytes"),
                              **{k: v for k, v in metrics.items() if isinstance(v, int | float)}})  # fmt: skip
        for key, value in metrics.items():
            if "epsilon" in key and isinstance(value, int | float):
                result.epsilon[site] = max(result.epsilon.get(site, 0.0), float(value))
    # DP jobs: each site's cumulative epsilon as it declared it with its last update (the job's privacy records).
    declared = find_epsilons(server_run)
    check_privacy_records(contributions, declared, contributions_path)
    result.epsilon.update({site: entry["epsilon"] for site, entry in declared.items()})
    result.per_round[last_round + 1] = {site: scores[GLOBAL] for site, scores in result.matrix.items()}
    result.bytes_per_round = _bytes_per_round(server_run, site_runs, result.rounds)
    return result


def check_privacy_records(contributions: list[dict], declared: dict[str, dict], path: Path) -> None:
    """In a DP run (some site declared an epsilon), every site whose updates were accepted must have declared its
    epsilon with its last one.

    A site missing from the privacy records would be missing from the report's epsilon column, and a reader could
    take its silence for "spent nothing".

    Raises:
        ValueError: names each site whose last accepted round has no privacy record, and the file it was read from.
    """
    if not declared:
        return
    last_round: dict[str, int] = {}
    for entry in contributions:
        if entry.get("return_code") == "OK":
            last_round[entry["site"]] = max(last_round.get(entry["site"], -1), int(entry["round"]))
    missing = {site: r for site, r in last_round.items() if declared.get(site, {}).get("round") != r}
    if missing:
        listed = ", ".join(f"{site} (last accepted round {r})" for site, r in sorted(missing.items()))
        raise ValueError(f"{path}: a DP run, but no privacy record for the last update of {listed}")


def _bytes_per_round(server_run: Path, site_runs: dict[str, Path], rounds: list[dict]) -> dict[str, dict[int, int]]:
    """Serialised bytes per round and direction from the probes; array bytes of the contributions as a fallback."""
    up = []
    for run in site_runs.values():
        # A site's result carries no round header, so the recorder logs round None there: the k-th train result a
        # site sends is round k (the probe sits on the train task only).
        for index, entry in enumerate(read_jsonl(run / "fedseg3d" / BYTES_FILES["site_to_server"])):
            up.append(dict(entry, round=entry["round"] if isinstance(entry.get("round"), int) else index))
    records = {
        "server_to_site": read_jsonl(server_run / "fedseg3d" / BYTES_FILES["server_to_site"]),
        "site_to_server": up,
    }
    totals: dict[str, dict[int, int]] = {}
    for direction, entries in records.items():
        per_round: dict[int, int] = defaultdict(int)
        for entry in entries:
            if isinstance(entry.get("round"), int):
                per_round[entry["round"]] += int(entry["bytes"])
        totals[direction] = dict(sorted(per_round.items()))
    if not totals["site_to_server"]:
        fallback: dict[int, int] = defaultdict(int)
        for row in rounds:
            fallback[row["round"]] += int(row.get("array_bytes") or 0)
        totals["site_to_server_array_bytes_only"] = dict(sorted(fallback.items()))
    return totals
