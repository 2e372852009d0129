"""How much does DP-SGD's per-patient clip turn a step, for each weighting of the Dice and cross-entropy terms?

DP-SGD (with nearly every gradient clipped, as at ``max_grad_norm`` 0.25 here) averages each patient's gradient
scaled to one length. If every patient's gradient had the same length, that would only rescale the step, which Adam
undoes; the clip turns the step only as far as the lengths differ and the directions disagree. This script measures
that on the synthetic sites, with no noise and no federation: it trains DP-SGD's network (plain FedAvg over the two
sites, Dice + cross-entropy, one pass a round) and, after chosen rounds, draws a batch of patients at each site the
way DP-SGD does (one patch each) and computes their per-patient gradients (Opacus's ``GradSampleModule``) under each
loss. For each it prints:

* ``median``: the median per-patient gradient norm (where a clip norm bites);
* ``cv``: their coefficient of variation (0: equal lengths, so clipping only rescales);
* ``agree``: ``|mean g| / mean |g|``, how much the patients' gradients point the same way (1: all alike);
* ``cos@clip``: the cosine between the mean of the clipped gradients (``--clip``) and the unclipped mean;
* ``cos@unit``: the same with every gradient normalised, the limit of a clip far below the norms.

Usage:
    python benchmarks/clip_distortion.py [--cases-scale 4] [--rounds 6] [--probe-rounds 1,3,6] \
        [--dice-weights 1,0.2,0] [--clip 0.25] [--patients 32] [--workspace workspace/clip-distortion]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "custom"), str(REPO)]  # run from a checkout without an editable install too

from monai.data import list_data_collate  # noqa: E402
from opacus import GradSampleModule  # noqa: E402

from fedseg3d.data.datalist import load_datalist  # noqa: E402
from fedseg3d.data.dataset import make_train_loader  # noqa: E402
from fedseg3d.data.site_config import SiteConfig  # noqa: E402
from fedseg3d.data.synthetic import generate_sites  # noqa: E402
from fedseg3d.data.transforms import PreprocessConfig  # noqa: E402
from fedseg3d.training.dpsgd import PatientPatches  # noqa: E402
from fedseg3d.training.loops import evaluate, make_loss, train_local  # noqa: E402
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig  # noqa: E402

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
PRESET = "unet3d_shallow_instancenorm"


def clip_geometry(grads: torch.Tensor, clip: float) -> dict[str, float]:
    """Length spread, agreement and clip distortion of per-patient gradients ``grads`` (patients x parameters)."""
    norms = grads.norm(dim=1)
    mean = grads.mean(dim=0)
    clipped = (grads * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)[:, None]).mean(dim=0)
    normalised = (grads / norms.clamp_min(1e-12)[:, None]).mean(dim=0)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))

    return {
        "median": float(norms.median()),
        "cv": float(norms.std() / norms.mean()),
        "agree": float(mean.norm() / norms.mean()),
        "clipped_share": float((norms > clip).float().mean()),
        "cos_clip": cosine(clipped, mean),
        "cos_unit": cosine(normalised, mean),
    }


def per_patient_gradients(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each patient's gradient of ``loss_fn`` over all trainable parameters, one row per patient (a copy of
    ``model`` is wrapped, so the model itself never carries Opacus's hooks)."""
    wrapped = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    wrapped.train()
    images, labels = batch["image"].flatten(0, 1), batch["label"].flatten(0, 1)
    loss_fn(wrapped(images), labels).backward()
    rows = [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in wrapped.parameters() if p.requires_grad]
    wrapped._close()
    return torch.cat(rows, dim=1)


def site_trainers(data_dir: Path, seed: int) -> list[SiteTrainer]:
    """One trainer per generated site, built from its ``site.json`` as the simulator's sites are."""
    trainers = []
    for site_dir in sorted(p for p in data_dir.iterdir() if (p / "site.json").is_file()):
        config = SiteConfig.from_file(site_dir / "site.json", site_name=site_dir.name)
        datalist = load_datalist(config.datalist, config.data_root, label_names=CLASSES)
        training = TrainingConfig(model_preset=PRESET, keep_batchnorm_local=False, learning_rate=0.002, seed=seed)
        trainers.append(
            SiteTrainer(site_dir.name, datalist, CLASSES, PreprocessConfig(), training, data_dir / "out", device="cpu")
        )
    return trainers


def train_one_round(model: torch.nn.Module, trainers: list[SiteTrainer], seed: int) -> None:
    """One pass at each site from ``model`` (batches of 2 cases, 0.002), then the plain average of the results."""
    states = []
    for trainer in trainers:
        trainer.model.load_state_dict(model.state_dict())
        loader = make_train_loader(trainer.train_cases.items, trainer.preprocessing, batch_size=2, seed=seed)
        optimizer = torch.optim.Adam(trainer.model.parameters(), lr=0.002)
        train_local(trainer.model, loader, optimizer, torch.device("cpu"), epochs=1)
        states.append(trainer.model.state_dict())
    model.load_state_dict({key: sum(state[key] for state in states) / len(states) for key in states[0]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases-scale", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--probe-rounds", default="0,1,3,6", help="rounds after which to measure (0: the fresh net)")
    parser.add_argument("--dice-weights", default="1,0.2,0", help="dice_loss_weight values to compare")
    parser.add_argument("--clip", type=float, default=0.25, help="max_grad_norm for cos@clip")
    parser.add_argument("--patients", type=int, default=32, help="patients per measured batch (DP-SGD's step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "clip-distortion")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    probe_rounds = {int(r) for r in args.probe_rounds.split(",")}
    losses = {float(w): make_loss(dice_weight=float(w)) for w in args.dice_weights.split(",")}

    data_dir = args.workspace / f"sites-x{args.cases_scale:g}-seed{args.seed}"
    if not (data_dir / "sites.json").is_file():
        generate_sites(data_dir, n_sites=2, seed=args.seed, cases_scale=args.cases_scale, progress=print)
    trainers = site_trainers(data_dir, args.seed)
    model = copy.deepcopy(trainers[0].model)
    started = time.perf_counter()
    print(
        f"{'round':>5} {'site':<7} {'dice_w':>6} {'median':>7} {'cv':>5} {'agree':>6} {'clipped':>7} "
        f"{'cos@clip':>8} {'cos@unit':>8}   (validation Dice of the network: organ / lesion)"
    )
    for round_ in range(args.rounds + 1):
        if round_ > 0:
            train_one_round(model, trainers, args.seed + round_)
        if round_ not in probe_rounds:
            continue
        for trainer in trainers:
            roi = trainer.preprocessing.roi_size
            dice = evaluate(model, trainer.val_cases.items, torch.device("cpu"), roi, CLASSES).class_dice
            patients = PatientPatches(trainer.train_cases.items, trainer.preprocessing, seed=args.seed + round_)
            batch = list_data_collate([patients[i] for i in range(min(args.patients, len(patients)))])
            for weight, loss_fn in losses.items():
                g = clip_geometry(per_patient_gradients(model, loss_fn, batch), args.clip)
                print(
                    f"{round_:>5} {trainer.site_name:<7} {weight:>6g} {g['median']:>7.3g} {g['cv']:>5.2f} "
                    f"{g['agree']:>6.3f} {g['clipped_share']:>7.0%} {g['cos_clip']:>8.3f} {g['cos_unit']:>8.3f}"
                    f"   ({dice['organ']:.3f} / {dice['lesion']:.3f})",
                    flush=True,
                )
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
