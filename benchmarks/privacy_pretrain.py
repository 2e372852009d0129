"""Public pretraining for the privacy benchmark (``privacy_tradeoff.py --pretrain``).

The remedy the DP literature uses when DP-SGD loses too much (De et al. 2022; Li et al. 2022): learn what *public*
data can teach first, which costs no privacy, then spend the budget only on fine-tuning with the private data. Here
the "public" data is one more synthetic data set, disjoint from the private sites: its own generator seed (the
benchmark's seed + ``PUBLIC_SEED_OFFSET``), so its patients and its scanners' intensity scale, offset, contrast,
noise and bias field are drawn afresh. ``generate_sites`` takes geometry and lesion polarity from fixed tables by
site index, so one public site has private ``site-1``'s voxel grid (1 x 1 x 2 mm, RAS) and bright lesions, and
never shows a dark lesion like ``site-2``'s; two public sites show both (see ``--public-sites``). In practice this
would be a published data set (e.g. the Medical Segmentation Decathlon), never a hospital's data.

Every network the selected rows use gets one checkpoint (``fedseg3d.tools.pretrain``, run as a subprocess per
preset, in parallel, one thread each), with one recipe for all: the reference job's (``unet3d_fedbn``)
preprocessing, batch size and learning rate, only the preset differs. Rows that do not name their own
``initial_checkpoint`` start from their preset's checkpoint, so private and non-private rows start from the same
weights; ``public_only_<preset>`` rows score each checkpoint as it is on the private sites' validation cases.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.federated import job_variables
from fedseg3d.data.synthetic import generate_sites
from fedseg3d.models.checkpoint import checkpoint_provenance
from fedseg3d.tools.pretrain import evaluate_checkpoint

REPO = Path(__file__).resolve().parents[1]
PUBLIC_SEED_OFFSET = 1000
PRETRAIN_JOB = "unet3d_fedbn"  # the public recipe for every preset: this job's preprocessing, batch and lr
CHECKPOINT_KNOB = "initial_checkpoint"


@dataclass(frozen=True)
class PublicSettings:
    """The public data and its pretraining.

    Attributes:
        sites: public scanners pooled (1: site-1's grid and bright lesions only; 2: both lesion polarities).
        seed: the public data's generator seed (never the private sites').
        cases_scale: size of each public scanner's data, as ``generate_sites``'s ``cases_scale``.
        fov_mm: volume side, as the private sites'.
        epochs: pretraining passes over the public training cases.
        train_seed: initial weights and patch sampling of the pretraining.
    """

    sites: int
    seed: int
    cases_scale: float
    fov_mm: float
    epochs: int
    train_seed: int


def job_preset(job: str, overrides: dict[str, Any]) -> str:
    """The network a row trains: its ``model_preset`` knob, or the job's."""
    if "model_preset" in overrides:
        return str(overrides["model_preset"])
    config = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
    return str(config["model_preset"])


def public_data(settings: PublicSettings, workspace: Path, private_seed: int) -> list[Path]:
    """Generate (or reuse) the public data under ``<workspace>/public/data``; returns its site folders.

    Raises:
        ValueError: the public seed is the private sites' (the data would not be disjoint).
    """
    if settings.seed == private_seed:
        raise ValueError(f"public data seed {settings.seed} is the private sites' seed: the data would not be disjoint")
    root = workspace / "public" / "data"
    wanted = {"n_sites": settings.sites, "seed": settings.seed, "fov_mm": settings.fov_mm}
    wanted["cases_scale"] = settings.cases_scale
    summary = root / "sites.json"
    if not (summary.is_file() and {k: json.loads(summary.read_text()).get(k) for k in wanted} == wanted):
        generate_sites(root, dicom_sites=(), **wanted)
    return [root / f"site-{i + 1}" for i in range(settings.sites)]


def pretrain_command(settings: PublicSettings, preset: str, data_dirs: list[str], out: str) -> list[str]:
    """The ``fedseg3d.tools.pretrain`` command line for one preset (run from the repository root)."""
    data = [arg for d in data_dirs for arg in ("--data", d)]
    return [
        "python", "-m", "fedseg3d.tools.pretrain", *data, "--job", f"jobs/{PRETRAIN_JOB}", "--model-preset", preset,
        "--epochs", str(settings.epochs), "--seed", str(settings.train_seed), "--threads", "1", "--device", "cpu",
        "--out", out,
    ]  # fmt: skip


def _reusable(out: Path, settings: PublicSettings, preset: str, data_dirs: list[str]) -> bool:
    if not out.is_file():
        return False
    made = checkpoint_provenance(out)
    return (made.get("model_preset"), made.get("epochs"), made.get("seed"), made.get("data")) == (
        preset,
        settings.epochs,
        settings.train_seed,
        data_dirs,
    )


def build_checkpoints(
    settings: PublicSettings, presets: list[str], workspace: Path, private_seed: int, log=print
) -> dict[str, dict[str, Any]]:
    """One public checkpoint per preset (reused when one with the same settings exists); returns per preset its
    checkpoint path, provenance and command.

    Raises:
        RuntimeError: a pretraining process failed (its log is named).
    """
    data_dirs = [_relative(d) for d in public_data(settings, workspace, private_seed)]  # as the command names them
    out_dir = workspace / "public"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "custom"), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    running, done = {}, {}
    for preset in presets:
        out = out_dir / f"{preset}.pt"
        command = pretrain_command(settings, preset, data_dirs, _relative(out))
        done[preset] = {"checkpoint": out, "command": shlex.join(command)}
        if _reusable(out, settings, preset, data_dirs):
            log(f"    public checkpoint {out} already made with these settings: reused")
            continue
        log(f"    pretraining {preset}: {shlex.join(command)}")
        stream = (out_dir / f"{preset}.log").open("w")
        running[preset] = (subprocess.Popen([sys.executable, *command[1:]], cwd=REPO, env=env, stdout=stream,
                                            stderr=subprocess.STDOUT), stream, time.perf_counter())  # fmt: skip
    for preset, (process, stream, started) in running.items():
        code = process.wait()
        stream.close()
        if code != 0:
            raise RuntimeError(f"pretraining {preset} failed ({code}); see {out_dir / f'{preset}.log'}")
        done[preset]["wall_seconds"] = round(time.perf_counter() - started, 1)
    for info in done.values():
        info["provenance"] = checkpoint_provenance(info["checkpoint"])
    return done


def with_checkpoints(configs: list, checkpoints: dict[str, dict[str, Any]]) -> list:
    """Rows start from their preset's public checkpoint unless they name their own ``initial_checkpoint``."""
    result = []
    for config in configs:
        if CHECKPOINT_KNOB in config.overrides or CHECKPOINT_KNOB not in job_variables(config.job):
            result.append(config)
            continue
        path = checkpoints[job_preset(config.job, config.overrides)]["checkpoint"]
        result.append(replace(config, overrides={**config.overrides, CHECKPOINT_KNOB: str(Path(path).resolve())}))
    return result


def public_only_row(preset: str, info: dict[str, Any], sites_root: Path, sites: list[str], command: str) -> dict:
    """The checkpoint alone on the private sites: no private data, no privacy spent (a report row)."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    scores = evaluate_checkpoint(info["checkpoint"], [sites_root / s for s in sites], REPO / "jobs" / PRETRAIN_JOB)
    seconds = time.perf_counter() - started
    classes = list(next(iter(scores.values())).class_dice)
    provenance = info["provenance"]
    return {
        "command": command,
        "name": f"public_only_{preset}",
        "job": "-",
        "overrides": {"model_preset": preset},
        "note": "the public checkpoint as it is, scored on each private site's validation cases (no private training)",
        "mean_dice": sum(s.mean_dice for s in scores.values()) / len(scores),
        "site_dice": {site: s.mean_dice for site, s in scores.items()},
        "class_dice": {c: sum(s.class_dice[c] for s in scores.values()) / len(scores) for c in classes},
        "site_class_dice": {site: dict(s.class_dice) for site, s in scores.items()},
        "per_round_dice": {},
        "epsilon": None,
        "delta": None,
        "unit": None,
        "site_epsilon": {},
        "dp_sgd": {},
        "attack_auc": None,
        "site_train_seconds_per_round": {},
        "simulator_seconds": None,
        "evaluation_seconds": round(seconds, 1),
        "pretraining": {k: provenance.get(k) for k in ("epochs", "train_cases", "public_val_dice", "seconds")},
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def describe(
    settings: PublicSettings, checkpoints: dict[str, dict[str, Any]], earlier: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the report says about the public data and the checkpoints (paths relative to the repository); with
    ``--merge``, the earlier report's checkpoints that this run did not use are kept (its rows started from them)."""
    kept = dict((earlier or {}).get("checkpoints", {}))
    return {
        "settings": asdict(settings),
        "checkpoints": kept
        | {
            preset: {
                "checkpoint": _relative(info["checkpoint"]),
                "command": info["command"],
                **{k: info["provenance"].get(k) for k in ("train_cases", "val_cases", "public_val_dice", "seconds")},
                "public_val_class_dice": info["provenance"].get("public_val_class_dice"),
            }
            for preset, info in checkpoints.items()
        },
    }


def _relative(path: Path | str) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def display_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A row's knobs for the report: the checkpoint relative to the repository, not an absolute path."""
    if CHECKPOINT_KNOB not in overrides or not overrides[CHECKPOINT_KNOB]:
        return overrides
    return {**overrides, CHECKPOINT_KNOB: _relative(overrides[CHECKPOINT_KNOB])}
