"""The learner's round trip with real FLARE Shareables and a bare FLContext (no federation needed)."""

from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants, ValidateType

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.task import JobConfigError
from fedseg3d.learners.segmentation_learner import SegmentationLearner
from fedseg3d.models.local_state import batchnorm_state_keys, shared_state_numpy, split_local_state
from fedseg3d.models.presets import build_model
from fedseg3d.tools.job_config import learner_args as job_learner_args
from fedseg3d.training.site_trainer import SiteTrainer

CLIENT_CONFIG = "jobs/unet3d_fedbn/app/config/config_fed_client.json"


def learner_args():
    args = job_learner_args(Path(CLIENT_CONFIG).parents[2])  # the job's variables resolved, as FLARE does
    training = {"model_preset": "unet3d_tiny", "keep_batchnorm_local": True, "local_steps": 2, "batch_size": 2}
    preprocessing = dict(args["preprocessing"], roi_size=[16, 16, 16])
    return {
        "class_names": args["class_names"],
        "preprocessing": preprocessing,
        "training": training,
        "tb_writer_id": "",
    }


@pytest.fixture
def learner(tiny_sites, tmp_path):
    learner = SegmentationLearner(**learner_args())
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", learner.class_names)
    trainer = SiteTrainer(
        "site-1", datalist, learner.class_names, learner.preprocessing, learner.training, tmp_path / "models"
    )
    learner.start(trainer, site_config_dir=None)
    return learner


def global_weights():
    model = build_model("unet3d_tiny")
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def task(kind=DataKind.WEIGHTS, data=None, validate_type=None):
    shareable = DXO(data_kind=kind, data=data if data is not None else global_weights()).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 0)
    shareable.set_header(AppConstants.NUM_ROUNDS, 2)
    if validate_type:
        shareable.set_header(AppConstants.VALIDATE_TYPE, validate_type)
    return shareable


def test_train_returns_shared_weight_difference_weighted_by_cases(learner):
    reply = learner.train(task(), FLContext(), Signal())
    dxo = from_shareable(reply)
    model = build_model("unet3d_tiny")
    split = split_local_state(model, keep_batchnorm_local=True)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert set(dxo.data) == set(split.shared)
    assert not set(dxo.data) & batchnorm_state_keys(model)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == learner.trainer.num_train_cases
    assert any(np.abs(v).max() > 0 for v in dxo.data.values())
    assert (learner.trainer.output_dir / "local_model.pt").is_file()


def test_local_batchnorm_survives_the_next_global_model(learner):
    learner.train(task(), FLContext(), Signal())
    split = learner.trainer.split
    before = {k: v.clone() for k, v in learner.trainer.model.state_dict().items() if k in split.local}
    learner.train(task(), FLContext(), Signal())  # a fresh global model with untouched BN values arrives
    after = learner.trainer.model.state_dict()
    changed = [k for k in before if k.endswith("running_mean") and not np.allclose(before[k], after[k])]
    assert changed, "local BN statistics should keep evolving from their own values"
    fresh = build_model("unet3d_tiny").state_dict()
    assert not all(np.allclose(after[k], fresh[k]) for k in changed)


def test_validate_before_train_reports_initial_metrics(learner):
    reply = learner.validate(task(validate_type=ValidateType.BEFORE_TRAIN_VALIDATE), FLContext(), Signal())
    metrics = from_shareable(reply).data[MetaKey.INITIAL_METRICS]
    assert set(metrics) == {"val_mean_dice", "val_dice_organ", "val_dice_lesion"}
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    # the round's global model is kept at the site, with its batch norm, as the best global model for this site
    assert (learner.trainer.output_dir / "best_global_model.pt").is_file()


def test_cross_site_validation_keeps_the_final_global_model_and_no_other(learner):
    other_site = task(validate_type=ValidateType.MODEL_VALIDATE)
    other_site.set_header(AppConstants.MODEL_OWNER, "site-2")
    learner.validate(other_site, FLContext(), Signal())
    assert not (learner.trainer.output_dir / "best_global_model.pt").exists()
    final_global = task(validate_type=ValidateType.MODEL_VALIDATE)
    final_global.set_header(AppConstants.MODEL_OWNER, "SRV_FL_global_model.pt")  # the name cross-site evaluation uses
    learner.validate(final_global, FLContext(), Signal())
    assert (learner.trainer.output_dir / "best_global_model.pt").is_file()


def test_submitted_model_is_the_shared_part_only(learner):
    learner.train(task(), FLContext(), Signal())
    dxo = from_shareable(learner.get_model_for_validation("site-1", FLContext()))
    assert dxo.data_kind == DataKind.WEIGHTS
    assert set(dxo.data) == set(learner.trainer.split.shared)


def test_wrong_task_data_kind_is_refused(learner):
    model = build_model("unet3d_tiny")
    diff = shared_state_numpy(model, split_local_state(model, True))
    reply = learner.train(task(kind=DataKind.WEIGHT_DIFF, data=diff), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA


def test_site_with_broken_data_fails_its_tasks_with_the_reason():
    learner = SegmentationLearner(**learner_args())
    learner.setup_error = "/data/site-3/imagesTr/case_001.nii.gz: unreadable or truncated file"
    for reply in (
        learner.train(task(), FLContext(), Signal()),
        learner.validate(task(), FLContext(), Signal()),
        learner.get_model_for_validation("x", FLContext()),
    ):
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_bad_job_config_fails_at_construction():
    args = learner_args()
    with pytest.raises(ValueError, match="preprocessing has unknown field"):
        SegmentationLearner(**{**args, "preprocessing": {"roi": [1, 2, 3]}})
    with pytest.raises(JobConfigError, match="class_names keys must be class indices 0..N-1"):
        SegmentationLearner(**{**args, "class_names": {"1": "organ"}})


def test_cosine_schedule_reads_the_round_from_the_task_and_refuses_a_task_without_the_round_count(
    tiny_sites, tmp_path, caplog
):
    args = learner_args()
    args["training"] = {**args["training"], "learning_rate": 0.01, "lr_schedule": "cosine"}
    learner = SegmentationLearner(**args)
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", learner.class_names)
    trainer = SiteTrainer(
        "site-1", datalist, learner.class_names, learner.preprocessing, learner.training, tmp_path / "models"
    )
    learner.start(trainer, site_config_dir=None)
    shareable = task()
    shareable.set_header(AppConstants.CURRENT_ROUND, 1)  # round 1 of 2: half the rate
    reply = learner.train(shareable, FLContext(), Signal())
    assert from_shareable(reply).get_meta_prop("site_metrics")["learning_rate"] == pytest.approx(0.005)
    shareable = task()
    shareable.set_header(AppConstants.NUM_ROUNDS, None)
    assert learner.train(shareable, FLContext(), Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "lr_schedule 'cosine' needs the job's number of rounds" in caplog.text
