"""Local calibration keeps the better of the original and the adapted network, and fixes over-confidence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dataset import CasePreparer, make_train_loader, prepare_cases
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.calibration import calibrate
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.temperature import fit_temperature
from fedseg3d.models.presets import build_model
from fedseg3d.training.loops import train_local
from fedseg3d.training.norm_calibration import patch_batches, recalibrate_batchnorm

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
PREP = PreprocessConfig(roi_size=(16, 16, 16))


class Sharpened(torch.nn.Module):
    """The same label map with every logit multiplied: an over-confident copy of a network."""

    def __init__(self, network: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.network, self.factor = network, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * self.factor


@pytest.fixture(scope="module")
def trained(tiny_sites: Path) -> torch.nn.Module:
    """A network trained a few steps at site-1 (batch norm recomputed for its weights, as training saves it), so that
    it has a Dice to lose."""
    torch.manual_seed(0)
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    items = prepare_cases(datalist.training, CasePreparer(PREP, len(CLASSES)), False, "training").items
    network = build_model("unet3d_tiny")
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    train_local(network, make_train_loader(items, PREP, 2, seed=0), optimizer, torch.device("cpu"), max_steps=10)
    recalibrate_batchnorm(network, patch_batches(items, PREP), torch.device("cpu"))
    return network.eval()


def deployable(network: torch.nn.Module) -> DeployableModel:
    return DeployableModel(network, "unet3d_tiny", CLASSES, PREP, {"job_id": "job-1", "site": "site-1"})


def test_temperature_fit_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5_000, 3, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits * 4.0, labels) == pytest.approx(4.0, rel=0.1)


def test_calibration_keeps_the_original_when_fine_tuning_makes_it_worse(trained, tiny_sites, tmp_path):
    # The site's training labels are all background: fine-tuning on them teaches the network to find nothing.
    site_dir = tmp_path / "site-1"
    shutil.copytree(tiny_sites / "site-1", site_dir)
    datalist = json.loads((site_dir / "datalist.json").read_text())
    for case in datalist["training"]:
        label = nib.load(site_dir / case["label"])
        nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), site_dir / case["label"])
    original = {k: v.clone() for k, v in trained.state_dict().items()}
    model, report = calibrate(
        deployable(trained), SiteConfig.from_file(site_dir / "site.json"), fine_tune_steps=10, learning_rate=0.05
    )
    assert report.before.mean_dice > 0.1, "the fixture needs a model with a Dice to lose"
    assert not report.adapted_network_kept and "kept the original network" in report.decision
    assert report.after.mean_dice == report.before.mean_dice
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert model.provenance["local_calibration"]["adapted_network_kept"] is False


def test_calibration_lowers_the_error_of_an_over_confident_model(trained, tiny_sites):
    site = SiteConfig.from_file(tiny_sites / "site-1" / "site.json")
    model, report = calibrate(deployable(Sharpened(trained, 8.0)), site)
    assert report.temperature > 2.0, report.decision
    assert report.after.ece < report.before.ece, report.decision
    assert report.after.mean_dice >= report.before.mean_dice  # never worse, whatever was kept
    assert model.temperature == report.temperature
