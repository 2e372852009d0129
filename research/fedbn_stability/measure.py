"""FedBN in one process, driving the product's SiteTrainer, with batch-norm diagnostics at every site-round.

Why in one process rather than the simulator: the diagnostics need the site's model between rounds (eval-mode
versus batch-statistics Dice on the same weights, running statistics versus recalibrated ones), and the aggregation
is plain FedAvg of the shared keys weighted by training cases, as ``ResilientFedAvg`` does.

Example:
    python research/fedbn_stability/measure.py --data /tmp/syn --sites site-1,site-2 --rounds 10 --seeds 0,1,2 \
        --recalibrate off --out research/fedbn_stability/reports/synthetic_before.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from fedseg3d.data.dataset import make_train_loader
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.local_state import load_shared_state
from fedseg3d.models.presets import PresetUNet
from fedseg3d.training.loops import SW_BATCH_SIZE, SW_OVERLAP
from fedseg3d.training.norm_calibration import batchnorm_layers, patch_batches, recalibrate_batchnorm
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig


def window_batches(items: list[dict], roi_size: tuple[int, int, int]) -> list[torch.Tensor]:
    """The batches of tiles sliding-window evaluation feeds the model for each volume of ``items``."""
    batches: list[torch.Tensor] = []

    def record(tiles: torch.Tensor) -> torch.Tensor:
        batches.append(tiles.clone())
        return tiles

    inferer = SlidingWindowInferer(roi_size, sw_batch_size=SW_BATCH_SIZE, overlap=SW_OVERLAP)
    with torch.no_grad():
        for item in items:
            inferer(item["image"].unsqueeze(0), record)
    return batches


def dice(trainer: SiteTrainer, model: torch.nn.Module) -> float:
    return trainer._evaluate(model, lambda: False).mean_dice


class BatchStats(torch.nn.Module):
    """Evaluates with batch-norm layers in training mode (each sliding-window batch normalised by its own stats)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        for layer in batchnorm_layers(self.model):
            layer.train()
        return self.model(x)


def recalibrated(trainer: SiteTrainer, model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The product's recalibration: at least 64 un-augmented training patches."""
    model = copy.deepcopy(model)
    recalibrate_batchnorm(
        model, patch_batches(trainer.train_cases.items, trainer.preprocessing, seed=seed), trainer.device
    )
    return model


def recalibrated_on_windows(trainer: SiteTrainer, model: torch.nn.Module, items: list[dict]) -> torch.nn.Module:
    """A copy recalibrated on ``items`` (volumes) tiled as sliding-window evaluation tiles them."""
    model = copy.deepcopy(model)
    recalibrate_batchnorm(model, window_batches(items, trainer.preprocessing.roi_size), trainer.device)
    return model


def recalibrated_on_training_loader(trainer: SiteTrainer, model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """As ``recalibrated`` but on the training batches: label-centred patches with flips and intensity jitter."""
    model = copy.deepcopy(model)
    loader = make_train_loader(trainer.train_cases.items, trainer.preprocessing, trainer.training.batch_size, seed)
    recalibrate_batchnorm(model, [batch["image"] for batch in loader], trainer.device)
    return model


def stat_gap(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Mean over layers of |mean_a - mean_b| / sd_b and |log(var_a / var_b)|, and the worst layer of each."""
    z, logv = [], []
    for la, lb in zip(batchnorm_layers(a), batchnorm_layers(b), strict=True):
        sd = lb.running_var.clamp_min(1e-5).sqrt()
        z.append(float(((la.running_mean - lb.running_mean).abs() / sd).mean()))
        logv.append(float((la.running_var.clamp_min(1e-5) / lb.running_var.clamp_min(1e-5)).log().abs().mean()))
    return {"z_mean": float(np.mean(z)), "z_max": float(np.max(z)), "logvar_mean": float(np.mean(logv)),
            "logvar_max": float(np.max(logv))}  # fmt: skip


def run(args, seed: int) -> dict:
    classes = {i: n for i, n in enumerate(["background", *args.classes.split(",")])}
    prep = PreprocessConfig(roi_size=tuple([args.roi] * 3), samples_per_volume=args.samples_per_volume)
    training = TrainingConfig(
        model_preset=args.preset, keep_batchnorm_local=True, local_epochs=args.local_epochs,
        local_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.lr, amp=False, seed=seed,
        recalibrate_norm=args.recalibrate == "on",
    )  # fmt: skip
    out_root = Path(args.workdir) / f"seed{seed}"
    trainers = []
    for site in args.sites.split(","):
        cfg = SiteConfig.from_file(Path(args.data) / site / "site.json", site_name=site)
        trainers.append(SiteTrainer.from_site_config(cfg, classes, prep, training, out_root / site))
    torch.set_num_threads(args.threads)
    global_w = {k: v.numpy().copy() for k, v in PresetUNet(args.preset, len(classes), seed=seed).state_dict().items()}
    records, best_mean, best_global = [], -1.0, None
    for rnd in range(args.rounds):
        global_scores, updates = [], []
        for t in trainers:
            rec = {"round": rnd, "site": t.site_name}
            # what the server's selector sees; the site keeps it as its best global model when it is (the learner's
            # before-training validation)
            rec["global_site"] = t.evaluate_global(global_w, rnd).mean_dice
            if args.diagnose:
                cand = copy.deepcopy(t.model)
                load_shared_state(cand, t.split, global_w)
                rec["global_running"] = dice(t, cand)
                rec["global_batchstats"] = dice(t, BatchStats(copy.deepcopy(cand)))
                rec["global_recal"] = dice(t, recalibrated(t, cand, seed))
            global_scores.append(rec["global_site"])
            res = t.train_round(global_w, rnd)
            rec.update(train_loss=res.train.mean_loss, steps=res.train.steps, own=res.local_eval.mean_dice)
            if args.diagnose:
                rec["own_batchstats"] = dice(t, BatchStats(copy.deepcopy(t.model)))
                recal = recalibrated(t, t.model, seed)
                rec["own_recal"] = dice(t, recal)
                rec["own_recal_jitter"] = dice(t, recalibrated_on_training_loader(t, t.model, seed))
                rec["own_recal_windows"] = dice(t, recalibrated_on_windows(t, t.model, t.train_cases.items))
                val = recalibrated_on_windows(t, t.model, t.val_cases.items)  # the validation tiles' own stats
                rec["own_val_windows"] = dice(t, val)
                rec["gap_running_vs_recal"] = stat_gap(t.model, recal)  # lag: stats of older weights
                rec["gap_recal_vs_val"] = stat_gap(recal, val)  # shift: training patches vs validation windows
            updates.append((res.update, res.num_cases))
            records.append(rec)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                              if not isinstance(v, dict)}), flush=True)  # fmt: skip
        mean = float(np.mean(global_scores))
        if mean > best_mean:  # IntimeModelSelector: best mean pre-training Dice over sites
            best_mean, best_global = mean, {k: v.copy() for k, v in global_w.items()}
        total = sum(n for _, n in updates)
        for key in updates[0][0]:
            global_w[key] = global_w[key] + sum(u[key] * n for u, n in updates) / total
    final = {}
    for t in trainers:
        row = {"own_final": records[-len(trainers) + trainers.index(t)]["own"],
               "global_final": t.evaluate_global(global_w, args.rounds).mean_dice,  # cross-site eval of the final
               "server_best_global": t.evaluate_weights(best_global).mean_dice}  # fmt: skip
        for name in ("best_local_model.pt", "best_global_model.pt", "best_model.pt"):
            path = t.output_dir / name
            if path.is_file():
                model = copy.deepcopy(t.model)
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                row[name] = dice(t, model)
        final[t.site_name] = row
    print(json.dumps(final), flush=True)
    return {"seed": seed, "records": records, "final": final}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--sites", default="site-1,site-2")
    p.add_argument("--classes", default="organ,lesion")
    p.add_argument("--preset", default="unet3d_tiny")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", default="0")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--samples-per-volume", type=int, default=2)
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--recalibrate", choices=["on", "off"], default="on")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/fedbn_stability")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    runs = [run(args, int(s)) for s in args.seeds.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "seconds": time.time() - started, "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
