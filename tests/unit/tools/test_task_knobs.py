"""Any segmentation task from the stock jobs with ``--set`` only: the task knobs reach the server's network, the
learner and the trainer, through FLARE's own variable substitution; settings that do not fit are job errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nvflare.fuel.utils.dict_utils import extract_first_level_primitive
from nvflare.fuel.utils.json_scanner import JsonScanner
from nvflare.fuel.utils.wfconf import resolve_var_refs

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.label_map import LabelMap
from fedseg3d.data.task import JobConfigError
from fedseg3d.learners.segmentation_learner import SegmentationLearner
from fedseg3d.models.presets import PresetUNet
from fedseg3d.tools.build_jobs import build_jobs, parse_override
from fedseg3d.training.site_trainer import SiteTrainer

REPO = Path(__file__).resolve().parents[3]
BINARY = ["background", "organ"]
FIVE = ["background", "spleen", "liver", "stomach", "pancreas"]
SHORT = ["roi_size=[16,16,16]", "local_steps=1", "model_preset=unet3d_tiny"]


def build(tmp_path: Path, job: str, sets: list[str]) -> Path:
    overrides = dict(parse_override(s) for s in sets)
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", [job], overrides, with_code=False)
    return job_dir


def flare_resolved(job_dir: Path, filename: str, component_id: str) -> dict:
    """A component's args after FLARE's own ``{var}`` substitution, as the site or server receives them."""
    config = json.loads((job_dir / "app" / "config" / filename).read_text())
    resolve_var_refs(JsonScanner(config), extract_first_level_primitive(config))
    return next(c["args"] for c in config["components"] if c["id"] == component_id)


@torch.no_grad()
def out_channels(model: torch.nn.Module) -> int:
    """Channels of the network's output on a 16^3 patch: the number of classes it predicts."""
    return int(model.eval()(torch.zeros((1, 1, 16, 16, 16))).shape[1])


@pytest.mark.parametrize(
    ("job", "names", "extra", "weights", "ratios"),
    [
        ("unet3d_fedbn", BINARY, [], (), (1.0, 1.0)),
        (
            "unet3d_fedavg",
            FIVE,
            ["class_loss_weights=[1,1,1,1,3]", "crop_sampling=by_class", "class_crop_ratios=[1,2,2,2,4]"],
            (1.0, 1.0, 1.0, 1.0, 3.0),
            (1.0, 2.0, 2.0, 2.0, 4.0),
        ),
        ("unet3d_dpsgd", FIVE, ["model_preset=unet3d_tiny_instancenorm"], (), (1.0,) * 5),
    ],
    ids=["binary", "five-class", "five-class-dpsgd"],
)
def test_a_task_set_on_the_command_line_reaches_server_learner_and_trainer(
    tmp_path, tiny_sites, job, names, extra, weights, ratios
):
    sets = [*SHORT, f"class_names={json.dumps(names)}", *extra]
    job_dir = build(tmp_path, job, sets)

    persistor = flare_resolved(job_dir, "config_fed_server.json", "persistor")
    assert persistor["model"]["args"]["num_classes"] == len(names)
    server_model = PresetUNet(**persistor["model"]["args"])

    learner = SegmentationLearner(**flare_resolved(job_dir, "config_fed_client.json", "learner"))
    assert learner.class_names == dict(enumerate(names))
    assert learner.training.class_loss_weights == weights
    assert learner.preprocessing.class_crop_ratios == ratios
    assert learner.preprocessing.roi_size == (16, 16, 16)

    # The synthetic site holds organ (1) and lesion (2); a binary consortium maps the lesion to background.
    site = tiny_sites / "site-1"
    relabel = LabelMap(site / "site.json", {1: names[1]}, "background").for_classes(learner.class_names)
    datalist = load_datalist(site / "datalist.json", site)
    datalist = type(datalist)(datalist.path, learner.class_names, datalist.training[:1], datalist.validation[:1])
    trainer = SiteTrainer(
        "site-1", datalist, learner.class_names, learner.preprocessing, learner.training, tmp_path / "m", "cpu",
        relabel=relabel,
    )  # fmt: skip
    assert out_channels(trainer.model) == out_channels(server_model) == len(names)
    assert tuple(trainer.loss_fn.class_weights.tolist()) == weights
    assert trainer.preprocessing.class_crop_ratios == ratios
    shapes = [sorted(tuple(v.shape) for v in m.state_dict().values()) for m in (trainer.model, server_model)]
    assert shapes[0] == shapes[1], "the server's network is the sites' network"
    assert {int(v) for v in trainer.train_cases.items[0]["label"].unique()} <= set(range(len(names)))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['class_names=["background","brain"]', "class_loss_weights=[1,1,3]"], "training.class_loss_weights has 3"),
        (['class_names=["background","brain"]', "class_crop_ratios=[1,1,1]"], "preprocessing.class_crop_ratios has 3"),
        (["roi_size=[32,32]"], "preprocessing.roi_size must be 3 integers"),
    ],
)
def test_settings_that_do_not_fit_stop_the_learner_at_job_start(tmp_path, sets, message):
    job_dir = build(tmp_path, "unet3d_fedbn", sets)
    with pytest.raises(ValueError, match=message) as err:
        SegmentationLearner(**flare_resolved(job_dir, "config_fed_client.json", "learner"))
    if "class" in message:
        assert isinstance(err.value, JobConfigError) and str(err.value).startswith("job config error: ")


def test_class_names_that_are_not_a_json_list_fail_the_build(tmp_path):
    with pytest.raises(JobConfigError, match="class_names must be a JSON list"):
        build(tmp_path, "unet3d_fedbn", ["class_names=background,brain"])


def test_num_classes_is_derived_never_set(tmp_path):
    with pytest.raises(ValueError, match=r"cannot --set \['num_classes'\]: it is the length of class_names"):
        build(tmp_path, "unet3d_fedbn", ["num_classes=2"])


def test_list_values_are_stored_as_json_text_for_flare(tmp_path):
    # FLARE only takes strings, numbers and booleans as job variables: a list is written as its JSON text.
    job_dir = build(tmp_path, "unet3d_fedbn", ["roi_size=[48,48,48]"])
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    assert client["roi_size"] == "[48, 48, 48]"
    assert flare_resolved(job_dir, "config_fed_client.json", "learner")["preprocessing"]["roi_size"] == "[48, 48, 48]"
