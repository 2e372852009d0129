"""FedBN sites start their local batch norm from the server's initial model once, then keep their own."""

from pathlib import Path

import numpy as np

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import PresetUNet
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
BN_MEAN = "model.0.conv.unit0.adn.N.running_mean"
BN_WEIGHT = "model.0.conv.unit0.adn.N.weight"


def _site1_datalist(tiny_sites: Path):
    return load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)


def _trainer(tiny_sites: Path, tmp_path: Path, keep_local: bool = True) -> SiteTrainer:
    datalist = _site1_datalist(tiny_sites)
    prep = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="mr_percentile")
    training = TrainingConfig(local_steps=1, keep_batchnorm_local=keep_local)
    return SiteTrainer("site-1", datalist, CLASSES, prep, training, tmp_path, "cpu")


def _server_model(**changes: float) -> dict[str, np.ndarray]:
    weights = {k: v.numpy().copy() for k, v in PresetUNet("unet3d_tiny", 3, seed=0).state_dict().items()}
    for key, value in changes.items():
        weights[key.replace("__", ".")][:] = value
    return weights


def test_local_batch_norm_starts_from_the_first_server_model_then_stays_local(tiny_sites: Path, tmp_path: Path):
    trainer = _trainer(tiny_sites, tmp_path)
    assert not trainer.local_state_adopted
    # another site's model (cross-site evaluation) carries no local state: nothing to start from yet
    trainer.evaluate_weights(trainer.shared_weights())
    assert not trainer.local_state_adopted
    pretrained = _server_model(**{BN_MEAN.replace(".", "__"): 5.0, BN_WEIGHT.replace(".", "__"): 2.0})
    trainer.evaluate_weights(pretrained)
    state = trainer.model.state_dict()
    assert trainer.local_state_adopted
    assert np.allclose(state[BN_MEAN].numpy(), 5.0) and np.allclose(state[BN_WEIGHT].numpy(), 2.0)
    trainer.train_round(_server_model(**{BN_MEAN.replace(".", "__"): 7.0}), 0)
    assert not np.allclose(trainer.model.state_dict()[BN_MEAN].numpy(), 7.0)  # the site's own from now on


def test_a_fresh_server_model_changes_nothing(tiny_sites: Path, tmp_path: Path):
    trainer = _trainer(tiny_sites, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if k in trainer.split.local}
    trainer.evaluate_weights(_server_model())
    after = trainer.model.state_dict()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
