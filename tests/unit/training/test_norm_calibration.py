"""The FedBN evaluation collapse, reproduced: stale batch-norm running statistics, not the weights, sink the Dice.

Batch norm makes a network blind to the scale and offset of the convolution that feeds it while it trains (each batch
is normalised by its own statistics), so training loss cannot see weights drift in scale; evaluation mode normalises
with running averages of *earlier* weights (or, for a global model at a FedBN site, of the site's local weights) and
can. Here the drift is made exact (the first convolution scaled down), which leaves training-mode outputs
unchanged and collapses evaluation-mode Dice; recalibration restores it.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.checkpoint import load_checkpoint_state
from fedseg3d.training.norm_calibration import recalibrate_batchnorm
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
# Weight decay shrinks a convolution that feeds batch norm without changing what it computes in training mode.
SHRINK = 0.1
FIRST_CONV = "model.0.conv.unit0.conv"  # MONAI UNet: the first convolution, feeding the first batch norm directly


def _blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy volumes with one bright cube each, and the cube as a binary label."""
    images = 0.1 * torch.randn(n, 1, 12, 12, 12, generator=generator)
    labels = torch.zeros(n, 12, 12, 12, dtype=torch.long)
    for i in range(n):
        x, y, z = torch.randint(0, 6, (3,), generator=generator).tolist()
        images[i, 0, x : x + 6, y : y + 6, z : z + 6] += 1.0
        labels[i, x : x + 6, y : y + 6, z : z + 6] = 1
    return images, labels


def _dice(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(images).argmax(1)
    overlap = ((predicted == 1) & (labels == 1)).sum().item()
    return 2 * overlap / ((predicted == 1).sum().item() + (labels == 1).sum().item())


def _trained_toy() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)
    )
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        images, labels = _blobs(4, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model, *_blobs(8, generator)


def test_stale_running_statistics_collapse_evaluation_and_recalibration_restores_it():
    model, images, labels = _trained_toy()
    model.eval()
    healthy = _dice(model, images, labels)
    assert healthy > 0.9
    with torch.no_grad():  # the drift batch norm hides during training: the scale of the feeding convolution
        model[0].weight.mul_(SHRINK)
        model[0].bias.mul_(SHRINK)
    collapsed = _dice(model, images, labels)
    model.train()
    batch_statistics = _dice(model, images, labels)  # what the training loss sees
    model.eval()
    assert collapsed < 0.2 < 0.9 < batch_statistics
    recalibrate_batchnorm(model, [images[:4], images[4:]], torch.device("cpu"))
    assert not model.training
    assert _dice(model, images, labels) == pytest.approx(healthy, abs=0.02)


def test_recalibration_keeps_learned_parameters_and_restores_momentum():
    model, images, _ = _trained_toy()
    before = {k: v.clone() for k, v in model.named_parameters()}
    used = recalibrate_batchnorm(model, [images], torch.device("cpu"))
    assert used == 1 and model[1].momentum == 0.1
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert torch.allclose(model[1].running_mean, model[0](images).mean(dim=(0, 2, 3, 4)).detach(), atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(model, [], torch.device("cpu"))
    assert recalibrate_batchnorm(torch.nn.Conv3d(1, 1, 1), [], torch.device("cpu")) == 0  # no batch norm: no-op


def _trainer(tiny_sites: Path, tmp_path: Path, recalibrate: bool) -> SiteTrainer:
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    prep = PreprocessConfig(roi_size=(16, 16, 16))
    training = TrainingConfig(local_steps=2, recalibrate_norm=recalibrate, amp=False)
    return SiteTrainer("site-1", datalist, CLASSES, prep, training, tmp_path, "cpu")


def _drifted(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same function under batch norm in training mode, different under stale running statistics."""
    drifted = dict(weights)
    for name in ("weight", "bias"):
        drifted[f"{FIRST_CONV}.{name}"] = weights[f"{FIRST_CONV}.{name}"] * SHRINK
    return drifted


def test_a_fedbn_site_scores_a_received_model_with_statistics_for_its_weights(tiny_sites: Path, tmp_path: Path):
    for recalibrate in (True, False):
        trainer = _trainer(tiny_sites, tmp_path / str(recalibrate), recalibrate)
        trainer.train_round(trainer.shared_weights(), 0)
        weights = trainer.shared_weights()
        same = trainer.evaluate_weights(weights).mean_dice
        drifted = trainer.evaluate_weights(_drifted(weights)).mean_dice
        if recalibrate:
            assert drifted == pytest.approx(same, abs=1e-3)
        else:
            assert abs(drifted - same) > 0.01  # the stale statistics change the score of the same function


def test_the_site_keeps_coherent_best_models_and_says_which_to_deploy(tiny_sites: Path, tmp_path: Path):
    trainer = _trainer(tiny_sites, tmp_path, recalibrate=True)
    for current_round in range(2):
        trainer.evaluate_global(trainer.shared_weights(), current_round)
        trainer.train_round(trainer.shared_weights(), current_round)
    index = json.loads((tmp_path / "models.json").read_text())["models"]
    assert {"local_model.pt", "best_local_model.pt", "best_global_model.pt", "best_model.pt"} <= set(index)
    for name in ("best_local_model.pt", "best_global_model.pt", "best_model.pt"):
        # what was scored is what was saved: the file alone reproduces its Dice at this site, batch norm included
        candidate = copy.deepcopy(trainer.model)
        candidate.load_state_dict(load_checkpoint_state(tmp_path / name))
        assert trainer._evaluate(candidate, lambda: False).mean_dice == pytest.approx(index[name]["val_mean_dice"])
    best = max(index["best_local_model.pt"]["val_mean_dice"], index["best_global_model.pt"]["val_mean_dice"])
    assert index["best_model.pt"]["val_mean_dice"] == best
