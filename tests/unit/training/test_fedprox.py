"""FedProx's proximal term in the plain training path, with FLARE's own PTFedProxLoss as the term."""

from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import build_model
from fedseg3d.training.dpsgd import DPSGDConfig
from fedseg3d.training.loops import train_local
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

CLASSES = {0: "background", 1: "organ", 2: "lesion"}


def _batches(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(2, 1, 16, 16, 16, generator=gen),
            "label": torch.randint(0, 3, (2, 1, 16, 16, 16), generator=gen),
        }
        for _ in range(n)
    ]


def _drift(mu: float) -> float:
    """Squared distance from the start after a few steps, with the proximal term at weight ``mu``."""
    torch.manual_seed(0)
    model = build_model("unet3d_tiny")
    anchor = build_model("unet3d_tiny")
    anchor.load_state_dict(model.state_dict())
    anchor.requires_grad_(False)
    term = PTFedProxLoss(mu=mu)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # lr * mu < 1: the pull is stable
    stats = train_local(
        model, _batches(), optimizer, torch.device("cpu"), epochs=1, regulariser=lambda m: term(m, anchor)
    )
    assert stats.steps == 4
    with torch.no_grad():
        return sum(float(((p - q) ** 2).sum()) for p, q in zip(model.parameters(), anchor.parameters(), strict=True))


def test_proximal_term_keeps_local_weights_closer_to_the_global_model():
    assert _drift(mu=5.0) < 0.5 * _drift(mu=0.0)


def test_fedprox_mu_is_validated():
    with pytest.raises(ValueError, match="fedprox_mu"):
        TrainingConfig(fedprox_mu=-0.1)


def test_site_trainer_refuses_fedprox_without_the_term_and_uses_it_when_given(tiny_sites: Path, tmp_path: Path):
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    prep = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="mr_percentile")
    training = TrainingConfig(local_steps=2, fedprox_mu=0.5)
    with pytest.raises(ValueError, match="proximal_loss"):
        SiteTrainer("site-1", datalist, CLASSES, prep, training, tmp_path)

    calls = []

    class CountingProx(PTFedProxLoss):
        def forward(self, input, target):
            calls.append(1)
            return super().forward(input, target)

    trainer = SiteTrainer("site-1", datalist, CLASSES, prep, training, tmp_path, proximal_loss=CountingProx(mu=0.5))
    result = trainer.train_round(trainer.shared_weights(), 0)
    assert len(calls) == result.train.steps == 2
    for key in ("train_seconds", "train_patches", "train_cases", "train_voxels", "local_eval_seconds"):
        assert np.isfinite(result.metrics[key]) and result.metrics[key] > 0, key
    assert result.metrics["train_voxels"] == result.metrics["train_patches"] * 16**3


def test_site_trainer_refuses_fedprox_together_with_dpsgd(tiny_sites: Path, tmp_path: Path):
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    prep = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="mr_percentile", samples_per_volume=1)
    training = TrainingConfig(model_preset="unet3d_tiny_instancenorm", keep_batchnorm_local=False, fedprox_mu=0.5)
    with pytest.raises(ValueError, match="cannot be combined with dp_sgd"):
        SiteTrainer(
            "site-1",
            datalist,
            CLASSES,
            prep,
            training,
            tmp_path,
            proximal_loss=PTFedProxLoss(mu=0.5),
            dp_sgd=DPSGDConfig(),
        )
