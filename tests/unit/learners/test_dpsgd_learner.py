"""The learner's DP-SGD round: charged to the site ledger before the reply, refused (nothing sent) when over budget."""

from __future__ import annotations

import logging

import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedseg3d.data.datalist import load_datalist
from fedseg3d.learners.segmentation_learner import SegmentationLearner
from fedseg3d.models.presets import build_model
from fedseg3d.privacy.accounting import PATIENT, epsilon_for
from fedseg3d.privacy.ledger import PrivacyLedger
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget
from fedseg3d.training.site_trainer import SiteTrainer

DELTA = 1e-5
PRESET = "unet3d_tiny_instancenorm"


def make_learner(tiny_sites, tmp_path, require_budget=True, training: dict | None = None, **dp_sgd):
    learner = SegmentationLearner(
        class_names={"0": "background", "1": "organ", "2": "lesion"},
        preprocessing={"roi_size": [16, 16, 16], "samples_per_volume": 1},
        training={"model_preset": PRESET, "keep_batchnorm_local": False, "amp": False} | (training or {}),
        tb_writer_id="",
        dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "patients_per_step": 1, "steps_per_round": 2} | dp_sgd,
        require_budget=require_budget,
    )
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", learner.class_names)
    trainer = SiteTrainer(
        "site-1", datalist, learner.class_names, learner.preprocessing, learner.training, tmp_path / "models",
        dp_sgd=learner.dp_sgd,
    )  # fmt: skip
    learner.start(trainer, site_config_dir=None)
    return learner


def planned(learner: SegmentationLearner):
    return learner.trainer.plan_round(0, 3)


def train_task(round_: int, num_rounds: int | None = 3):
    weights = {k: v.numpy().copy() for k, v in build_model(PRESET).state_dict().items()}
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_)
    if num_rounds is not None:
        shareable.set_header(AppConstants.NUM_ROUNDS, num_rounds)
    return shareable


def test_round_is_charged_then_the_next_one_is_refused_and_the_ledger_is_left_alone(
    tiny_sites, tmp_path, monkeypatch, caplog
):
    learner = make_learner(tiny_sites, tmp_path)
    one_round = epsilon_for([planned(learner)], DELTA)
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path / "privacy"))
    write_site_budget(tmp_path / "privacy" / "site-1", epsilon_budget=one_round * 1.001, delta=DELTA)
    ledger_path = tmp_path / "privacy" / "site-1" / "privacy_ledger.json"

    reply = learner.train(train_task(0), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.get_meta_prop("dp_epsilon") == pytest.approx(one_round)
    assert (dxo.get_meta_prop("dp_delta"), dxo.get_meta_prop("dp_unit")) == (DELTA, PATIENT)
    assert dxo.get_meta_prop("dp_scope") == "site_ledger"
    (entry,) = PrivacyLedger(ledger_path).entries()
    assert (entry.round, entry.unit, entry.steps) == (0, PATIENT, 2)
    assert entry.sample_rate == pytest.approx(1 / learner.trainer.num_train_cases)

    before = ledger_path.read_bytes()
    with caplog.at_level(logging.ERROR):
        refused = learner.train(train_task(1), FLContext(), Signal())
    assert refused.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert refused.get_header(ReservedHeaderKey.CONTENT_TYPE) is None, "no update leaves"
    assert ledger_path.read_bytes() == before
    assert learner.trainer.rounds_done == 1, "the refusal came before training: no work was wasted"
    message = caplog.text
    assert "site site-1 refuses round 2" in message and "privacy_budget.json" in message
    assert "this release would make it" in message and "> budget" in message


def test_without_a_budget_dpsgd_refuses_unless_the_job_allows_job_only_accounting(tiny_sites, tmp_path):
    strict = make_learner(tiny_sites, tmp_path)
    assert strict.train(train_task(0), FLContext(), Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION

    lenient = make_learner(tiny_sites, tmp_path, require_budget=False)
    dxo = from_shareable(lenient.train(train_task(0), FLContext(), Signal()))
    assert dxo.get_meta_prop("dp_scope") == "job"
    assert dxo.get_meta_prop("dp_epsilon") == pytest.approx(epsilon_for([planned(lenient)], DELTA))


def test_learner_refuses_a_batch_norm_preset_for_dpsgd(tiny_sites, tmp_path):
    learner = SegmentationLearner(
        class_names={"0": "background", "1": "organ", "2": "lesion"},
        training={"model_preset": "unet3d_tiny"},
        tb_writer_id="",
        dp_sgd={"noise_multiplier": 1.0},
    )
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", learner.class_names)
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        SiteTrainer("site-1", datalist, learner.class_names, learner.preprocessing, learner.training, tmp_path,
                    dp_sgd=learner.dp_sgd)  # fmt: skip


def test_target_epsilon_calibrates_the_noise_once_and_the_job_ends_within_it(tiny_sites, tmp_path, monkeypatch):
    target = 6.0
    learner = make_learner(tiny_sites, tmp_path, target_epsilon=target, steps_per_round=1)
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path / "privacy"))
    write_site_budget(tmp_path / "privacy" / "site-1", epsilon_budget=100.0, delta=DELTA)
    ledger_path = tmp_path / "privacy" / "site-1" / "privacy_ledger.json"

    epsilons = []
    for round_ in range(3):
        reply = learner.train(train_task(round_, num_rounds=3), FLContext(), Signal())
        assert reply.get_return_code() == ReturnCode.OK
        epsilons.append(from_shareable(reply).get_meta_prop("dp_epsilon"))
    entries = PrivacyLedger(ledger_path).entries()
    sigmas = {entry.noise_multiplier for entry in entries}
    assert len(sigmas) == 1 and sigmas != {1.0}, "one calibrated sigma for the whole job, not the job's default"
    assert learner.trainer.dp_plan.config.noise_multiplier == sigmas.pop()
    assert epsilons[0] < epsilons[1] < epsilons[2] <= target
    assert epsilons[2] > target - 0.05
    assert {entry.details["target_epsilon"] for entry in entries} == {target}


def test_target_epsilon_without_the_number_of_rounds_refuses_to_train(tiny_sites, tmp_path, monkeypatch, caplog):
    learner = make_learner(tiny_sites, tmp_path, require_budget=False, target_epsilon=8.0)
    with caplog.at_level(logging.ERROR):
        reply = learner.train(train_task(0, num_rounds=None), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert learner.trainer.rounds_done == 0
    assert "dp_sgd.target_epsilon needs the job's number of rounds" in caplog.text

    patients = learner.trainer.num_train_cases  # rate 1: Opacus's search up to its largest sigma is quick then
    unreachable = make_learner(tiny_sites, tmp_path, False, target_epsilon=1e-4, patients_per_step=patients)
    with caplog.at_level(logging.ERROR):
        reply = unreachable.train(train_task(0), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "dp_sgd.target_epsilon=0.0001 cannot be calibrated" in caplog.text
