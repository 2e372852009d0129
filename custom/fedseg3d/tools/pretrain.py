"""Pretrain a model preset on public data and write a checkpoint a job can start from (``initial_checkpoint``).

Differential privacy costs nothing on data that is public: the usual way to make DP-SGD affordable (De et al. 2022,
"Unlocking high-accuracy differentially private image classification through scale"; Li et al. 2022, "Large
language models can be strong differentially private learners") is to learn what public data can teach first and
spend the privacy budget only on fine-tuning with the private data. The public data here must be just that: a
published data set (e.g. the Medical Segmentation Decathlon), never a hospital's own patients, which would then be
used without any privacy accounting.

The data folders have the layout ``fedseg3d.data.synthetic`` writes for a site (``datalist.json`` with training and
validation cases); several are pooled. Training is the package's own round (``SiteTrainer.train_round``, one epoch
per call, the whole network trained in one place) with the job's classes, preprocessing and learning rate, so the
checkpoint is made exactly like the federated models it will seed. The checkpoint is in FLARE's persistor format
(``fedseg3d.models.checkpoint``) with its provenance; ``<out>.json`` repeats the provenance for people.

Example:
    fedseg3d pretrain --data PUBLIC_DIR [--data PUBLIC_DIR2] --job jobs/unet3d_fedbn \
        --out public_unet3d_tiny.pt [--model-preset unet3d_tiny] [--epochs 15] [--learning-rate 0.002] [--seed 0] \
        [--threads 1] [--evaluate-on PRIVATE_SITE_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedseg3d.data.datalist import Datalist, load_datalist
from fedseg3d.data.dataset import CasePreparer, prepare_cases
from fedseg3d.data.task import parse_class_names
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.checkpoint import check_state_matches, read_checkpoint, save_checkpoint
from fedseg3d.models.presets import build_model
from fedseg3d.tools.job_config import learner_args
from fedseg3d.training.device import resolve_device
from fedseg3d.training.loops import EvalResult, evaluate
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

logger = logging.getLogger(__name__)
DATALIST_FILE = "datalist.json"


@dataclass
class PretrainResult:
    """What pretraining made: the checkpoint and how it was trained.

    Attributes:
        checkpoint: the file written.
        provenance: the facts stored in the checkpoint (preset, data, epochs, learning rate, seed, ...).
        per_epoch_dice: validation Dice on the public data's own validation cases after each epoch.
    """

    checkpoint: Path
    provenance: dict[str, Any]
    per_epoch_dice: list[float] = field(default_factory=list)


def job_settings(job_dir: Path) -> tuple[dict[int, str], PreprocessConfig, TrainingConfig]:
    """The classes, preprocessing and training knobs of a job, as its sites would train with them."""
    args = learner_args(job_dir)
    class_names = parse_class_names(args["class_names"])
    preprocessing = PreprocessConfig.from_dict(args.get("preprocessing"))
    return class_names, preprocessing, TrainingConfig(**args.get("training", {}))


def pooled_datalist(data_dirs: list[Path], class_names: dict[int, str]) -> Datalist:
    """The training and validation cases of every data folder, in one list.

    Raises:
        ValueError: no folder given, or a folder has no ``datalist.json``.
    """
    if not data_dirs:
        raise ValueError("pretraining needs at least one public data folder")
    lists = []
    for folder in data_dirs:
        if not (Path(folder) / DATALIST_FILE).is_file():
            raise ValueError(f"public data folder {folder} has no {DATALIST_FILE}")
        lists.append(load_datalist(Path(folder) / DATALIST_FILE, Path(folder), label_names=class_names))
    return Datalist(
        path=Path(data_dirs[0]),
        labels=class_names,
        training=tuple(c for dl in lists for c in dl.training),
        validation=tuple(c for dl in lists for c in dl.validation),
    )


def pretrain(
    data_dirs: list[Path],
    job_dir: Path,
    out: Path,
    *,
    model_preset: str | None = None,
    epochs: int = 15,
    learning_rate: float | None = None,
    seed: int = 0,
    device: str = "auto",
    log=print,
) -> PretrainResult:
    """Train ``model_preset`` (default: the job's) on the pooled public data for ``epochs`` and write ``out``.

    Args:
        data_dirs: public data folders (site layout: ``datalist.json`` plus images and labels).
        job_dir: the job whose classes, preprocessing and learning rate to use (e.g. ``jobs/unet3d_fedbn``).
        out: the checkpoint to write; ``<out>.json`` gets the provenance and ``<out stem>_work/`` the trainer's
            per-epoch checkpoints.
        model_preset: the network; default the job's ``model_preset``.
        epochs: passes over the public training cases.
        learning_rate: Adam learning rate; default the job's.
        seed: initial weights, patch sampling and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        log: where progress lines go.

    Raises:
        ValueError: a bad argument or data folder, naming it.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    class_names, preprocessing, job_training = job_settings(job_dir)
    training = replace(
        job_training,
        model_preset=model_preset or job_training.model_preset,
        keep_batchnorm_local=False,  # one model trained in one place: its whole state is the checkpoint
        local_epochs=1,
        local_steps=0,
        learning_rate=learning_rate or job_training.learning_rate,
        seed=seed,
        fedprox_mu=0.0,
    )
    datalist = pooled_datalist([Path(d) for d in data_dirs], class_names)
    out = Path(out)
    started = time.perf_counter()
    work_dir = out.parent / f"{out.stem}_work"
    trainer = SiteTrainer("public", datalist, class_names, preprocessing, training, work_dir, device)
    log(
        f"pretraining {training.model_preset} on {trainer.num_train_cases} public cases "
        f"({len(trainer.val_cases.items)} for validation) for {epochs} epoch(s), lr {training.learning_rate:g}"
    )
    per_epoch = []
    for epoch in range(epochs):
        result = trainer.train_round(trainer.shared_weights(), epoch)
        per_epoch.append(result.local_eval.mean_dice)
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {result.train.mean_loss:.4f}, public val Dice "
            f"{result.local_eval.mean_dice:.4f} {_rounded(result.local_eval.class_dice)} ({result.train.seconds:.1f} s)"
        )
    state = trainer.model.state_dict()  # built from training.model_preset, so it fits that preset by construction
    provenance = {
        "tool": "fedseg3d.tools.pretrain",
        "model_preset": training.model_preset,
        "num_classes": len(class_names),
        "class_names": {str(k): v for k, v in class_names.items()},
        "data": [str(Path(d)) for d in data_dirs],
        "train_cases": trainer.num_train_cases,
        "val_cases": len(trainer.val_cases.items),
        "epochs": epochs,
        "learning_rate": training.learning_rate,
        "batch_size": training.batch_size,
        "samples_per_volume": preprocessing.samples_per_volume,
        "seed": seed,
        "job": str(job_dir),
        "public_val_dice": per_epoch[-1],
        "public_val_class_dice": dict(result.local_eval.class_dice),
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_checkpoint(state, out, provenance)
    Path(f"{out}.json").write_text(json.dumps({**provenance, "per_epoch_dice": per_epoch}, indent=2) + "\n")
    log(f"wrote {out} ({provenance['seconds']:.0f} s)")
    return PretrainResult(checkpoint=out, provenance=provenance, per_epoch_dice=per_epoch)


def evaluate_checkpoint(
    checkpoint: Path, site_dirs: list[Path], job_dir: Path, device: str = "auto"
) -> dict[str, EvalResult]:
    """Dice of a checkpoint, as it is (its own normalisation state), on each site's validation cases.

    What pretraining alone gives a site, before any federated round: the same as a job's round-0 validation of a
    job started from this checkpoint (with FedBN the sites start their batch norm from it).

    Raises:
        ValueError: the checkpoint does not fit the preset it names, or has no provenance.
    """
    state, provenance = read_checkpoint(checkpoint)
    if "model_preset" not in provenance:
        raise ValueError(f"{checkpoint}: no fedseg3d provenance (model_preset); was it written by this tool?")
    class_names, preprocessing, _ = job_settings(job_dir)
    model = build_model(provenance["model_preset"], out_channels=len(class_names))
    check_state_matches(model.state_dict(), state, checkpoint, f"preset '{provenance['model_preset']}'")
    model.load_state_dict(state)
    torch_device = resolve_device(device)
    model.to(torch_device)
    preparer = CasePreparer(preprocessing, num_classes=len(class_names))
    results = {}
    for folder in site_dirs:
        datalist = load_datalist(Path(folder) / DATALIST_FILE, Path(folder), label_names=class_names)
        cases = prepare_cases(datalist.validation, preparer, skip_bad_cases=False, split="validation")
        results[Path(folder).name] = evaluate(model, cases.items, torch_device, preprocessing.roi_size, class_names)
    return results


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) if math.isfinite(v) else v for k, v in values.items()}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, action="append", required=True, help="public data folder (repeatable)")
    parser.add_argument("--job", type=Path, required=True, help="job folder whose classes and preprocessing to use")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--model-preset", default=None, help="default: the job's model_preset")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the job's learning_rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--evaluate-on", type=Path, action="append", default=[], help="site folder to score the checkpoint on"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = pretrain(
            args.data,
            args.job,
            args.out,
            model_preset=args.model_preset,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            seed=args.seed,
            device=args.device,
        )
        scores = evaluate_checkpoint(result.checkpoint, args.evaluate_on, args.job, args.device)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for site, score in scores.items():
        print(f"{site}: Dice {score.mean_dice:.4f} {_rounded(score.class_dice)} ({score.cases} validation cases)")
    if scores:
        summary = {site: asdict(score) for site, score in scores.items()}
        Path(f"{args.out}.eval.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
