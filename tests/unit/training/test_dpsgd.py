"""Patient-level DP-SGD: one patch per patient, Poisson sampling, Opacus attached, ledger accounting = Opacus's."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import PRESETS, build_model, count_parameters
from fedseg3d.privacy.accounting import epsilon_for
from fedseg3d.training.dpsgd import (
    ClipStatistics,
    DPSGDConfig,
    PatientPatches,
    average_grad_samples_per_patient,
    check_model_supports_dpsgd,
    make_patient_loader,
    per_patient_grad_norms,
    train_dpsgd,
)

PREPROCESSING = PreprocessConfig(roi_size=(16, 16, 16), samples_per_volume=4)


def patients(n: int, seed: int = 0) -> list[dict]:
    """``n`` small preprocessed cases (channel-first image and label), as ``prepare_cases`` returns them."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index in range(n):
        image = torch.rand((1, 24, 24, 24), generator=generator)
        label = torch.zeros((1, 24, 24, 24))
        label[:, 8:16, 8:16, 8:16] = 1
        label[:, 10:12, 10:12, 10:12] = 2
        items.append({"image": image, "label": label, "case_id": f"case_{index:03d}"})
    return items


def test_each_patient_yields_exactly_one_patch_although_samples_per_volume_is_larger():
    dataset = PatientPatches(patients(3), PREPROCESSING, seed=0)
    assert len(dataset) == 3
    sample = dataset[1]
    assert set(sample) == {"image", "label"}
    # One patch under the patient axis, not the samples_per_volume (4) patches of the ordinary loader.
    assert tuple(sample["image"].shape) == (1, 1, 16, 16, 16)
    assert tuple(sample["label"].shape) == (1, 1, 16, 16, 16)


def test_several_patches_of_one_patient_stay_together_under_one_element():
    dataset = PatientPatches(patients(3), PREPROCESSING, seed=0, patches=3)
    assert len(dataset) == 3  # still one element per patient: the sampler draws patients, not patches
    sample = dataset[0]
    assert tuple(sample["image"].shape) == (3, 1, 16, 16, 16)
    crops = sample["image"].flatten(1)
    assert not torch.equal(crops[0], crops[1]) or not torch.equal(crops[1], crops[2]), "the patches are not random"


def test_loader_samples_patients_independently_at_the_configured_rate_never_twice_per_step():
    n, per_step = 10, 3
    loader = make_patient_loader(patients(n), PREPROCESSING, DPSGDConfig(patients_per_step=per_step), seed=0)
    assert loader.sample_rate == pytest.approx(per_step / n)
    sizes = []
    for _ in range(100):
        for indices in loader.batch_sampler:
            assert len(indices) == len(set(indices)), "a patient appears twice in one step"
            sizes.append(len(indices))
    mean = sum(sizes) / len(sizes)
    # Poisson (binomial) sampling: the mean is n*q = 3, the size varies (fixed-size shuffled batches would not).
    assert abs(mean - per_step) < 0.3
    assert len(set(sizes)) > 2


def test_config_refuses_more_patients_per_step_than_the_site_has_and_bad_values():
    with pytest.raises(ValueError, match="patients_per_step"):
        DPSGDConfig(patients_per_step=5).mechanism(n_patients=3, steps=1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGDConfig(noise_multiplier=0)
    with pytest.raises(ValueError, match="unknown field"):
        DPSGDConfig.from_dict({"noise": 1.0})
    assert DPSGDConfig.from_dict({}) is None


@pytest.mark.skipif(importlib.util.find_spec("torchcsprng") is not None, reason="torchcsprng is installed")
def test_secure_mode_without_torchcsprng_is_refused_not_silently_insecure():
    with pytest.raises(RuntimeError, match="torchcsprng"):
        DPSGDConfig(secure_mode=True)
    assert DPSGDConfig(patients_per_step=2).steps_for(5) == 3  # one expected pass: ceil(5 / 2)


def test_steps_per_round_follow_the_passes_unless_set_exactly():
    assert DPSGDConfig(patients_per_step=2, passes_per_round=3).steps_for(5) == 9  # 3 expected passes of ceil(5/2)
    assert DPSGDConfig(patients_per_step=2, passes_per_round=3, steps_per_round=4).steps_for(5) == 4
    with pytest.raises(ValueError, match="passes_per_round"):
        DPSGDConfig(passes_per_round=0)


@pytest.mark.parametrize(("n_patients", "rounds", "target"), [(104, 10, 8.0), (64, 10, 4.0), (5, 3, 8.0)])
def test_calibrated_noise_keeps_the_whole_job_within_the_target_epsilon(n_patients, rounds, target):
    config = DPSGDConfig(patients_per_step=4 if n_patients > 5 else 2, passes_per_round=2, target_epsilon=target)
    calibrated = config.calibrated(n_patients, rounds, delta=1e-5)
    assert calibrated.target_epsilon == 0 and calibrated.noise_multiplier != config.noise_multiplier
    assert (calibrated.patients_per_step, calibrated.passes_per_round) == (config.patients_per_step, 2)
    # What the site ledger is charged with, round after round, adds up to at most the target.
    one_round = calibrated.mechanism(n_patients, calibrated.steps_for(n_patients))
    assert one_round.sample_rate == config.patients_per_step / n_patients
    assert target - 0.05 < epsilon_for([one_round] * rounds, 1e-5) <= target
    assert epsilon_for([one_round] * (rounds + 1), 1e-5) > target, "calibrated for exactly the job's rounds"


def test_more_patients_per_site_need_less_noise_for_the_same_epsilon():
    config = DPSGDConfig(patients_per_step=16, target_epsilon=8.0)
    small, large = (config.calibrated(n, 10, 1e-5).noise_multiplier for n in (32, 320))
    assert large < small


def test_target_epsilon_is_validated_and_an_uncalibrated_config_refuses_to_train():
    for bad in (-1.0, math.nan, math.inf, True, "8"):
        with pytest.raises(ValueError, match="dp_sgd.target_epsilon must be a finite number >= 0"):
            DPSGDConfig(target_epsilon=bad)
    config = DPSGDConfig(patients_per_step=2, target_epsilon=8.0)
    with pytest.raises(RuntimeError, match="dp_sgd.target_epsilon is 8.0: calibrate"):
        config.mechanism(n_patients=10, steps=1)
    with pytest.raises(RuntimeError, match="calibrate"):
        make_patient_loader(patients(4), PREPROCESSING, config, seed=0)
    with pytest.raises(ValueError, match="dp_sgd.target_epsilon=0.001 cannot be calibrated"):
        # (rate 1: Opacus's search up to its largest sigma is quick without subsampling)
        DPSGDConfig(patients_per_step=4, target_epsilon=1e-3).calibrated(4, rounds=100, delta=1e-5)
    with pytest.raises(ValueError, match="dp_sgd.target_epsilon is 0"):
        DPSGDConfig().calibrated(10, rounds=1, delta=1e-5)
    with pytest.raises(ValueError, match="number of rounds"):
        config.calibrated(10, rounds=0, delta=1e-5)
    with pytest.raises(ValueError, match="patients_per_step"):
        config.calibrated(1, rounds=1, delta=1e-5)
    assert DPSGDConfig.from_dict({"target_epsilon": 8}).target_epsilon == 8


def test_batch_norm_preset_is_refused_and_instance_norm_accepted():
    with pytest.raises(ValueError, match="unet3d_tiny.*cannot be trained with DP-SGD.*instancenorm"):
        check_model_supports_dpsgd(build_model("unet3d_tiny"), "unet3d_tiny")
    instance_norm = [name for name in PRESETS if name.endswith("_instancenorm")]
    # every DP-SGD preset is checked, and the list is not silently empty
    assert {"unet3d_tiny_instancenorm", "unet3d_shallow_instancenorm"} <= set(instance_norm)
    for preset in instance_norm:
        check_model_supports_dpsgd(build_model(preset), preset)


def test_shallow_preset_has_about_a_quarter_of_the_parameters():
    # Its reason to exist: DP noise on a step grows as sqrt(parameters), so a quarter of them halves it.
    ratio = count_parameters(build_model("unet3d_shallow_instancenorm")) / count_parameters(
        build_model("unet3d_tiny_instancenorm")
    )
    assert 0.2 < ratio < 0.3


def run(config: DPSGDConfig, n_patients: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("unet3d_tiny_instancenorm")
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats, mechanism, accountant = train_dpsgd(
        model, patients(n_patients), PREPROCESSING, config, optimizer, torch.device("cpu"), seed=seed
    )
    return model, before, stats, mechanism, accountant


def test_privacy_engine_is_attached_and_ledger_accounting_matches_opacus():
    config = DPSGDConfig(noise_multiplier=1.3, max_grad_norm=0.5, patients_per_step=1, steps_per_round=6)
    model, before, stats, mechanism, accountant = run(config, n_patients=4)
    assert stats.steps == 6
    assert stats.patches <= 6 * 4
    # The Opacus accountant hooked on the DPOptimizer saw every step, at the sampler's real rate.
    assert isinstance(accountant, RDPAccountant)
    assert accountant.history == [(1.3, 0.25, 6)]
    assert tuple(mechanism) == (1.3, 0.25, 6)
    for delta in (1e-5, 1e-3):
        assert epsilon_for([mechanism], delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert math.isfinite(epsilon_for([mechanism], 1e-5))
    # Training changed the model, and Opacus's hooks and per-sample attributes are gone afterwards.
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_noise_is_added_with_the_configured_scale():
    """Same data, same sampling seed: the only difference between two runs is the optimizer's noise, and a larger
    noise multiplier moves the weights further from the noiseless-direction result."""
    quiet = DPSGDConfig(noise_multiplier=0.01, max_grad_norm=1.0, patients_per_step=2, steps_per_round=2)
    loud = DPSGDConfig(noise_multiplier=50.0, max_grad_norm=1.0, patients_per_step=2, steps_per_round=2)

    def sgd_update(config):
        torch.manual_seed(0)
        model = build_model("unet3d_tiny_instancenorm")
        start = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_dpsgd(model, patients(4), PREPROCESSING, config, optimizer, torch.device("cpu"), seed=0)
        return torch.cat([(v - start[k]).flatten() for k, v in model.state_dict().items()])

    quiet_norm, loud_norm = sgd_update(quiet).norm(), sgd_update(loud).norm()
    # SGD with lr 1: the update is the sum over steps of (clipped gradient sum + noise) / expected batch size. Each
    # clipped sum is at most per_step * C; the noise of std 50 over ~0.15 M parameters dwarfs that.
    assert loud_norm > 20 * quiet_norm


def test_per_patient_gradient_norms_equal_those_of_separate_backward_passes():
    """The norms the site logs are those Opacus clips: each patient's whole-model gradient, computed here the slow
    way (one backward pass per patient) and compared."""
    from opacus import GradSampleModule  # noqa: PLC0415 - only this test builds one directly

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    inputs, targets = torch.randn(5, 1, 6, 6, 6), torch.tensor([0, 1, 1, 0, 1])
    model(inputs)  # materialise the lazy layer
    expected = []
    for i in range(5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        expected.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    wrapped = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(wrapped(inputs), targets, reduction="sum").backward()
    norms = per_patient_grad_norms(list(wrapped.parameters()))
    wrapped._close()
    assert torch.allclose(norms, torch.stack(expected), rtol=1e-4)


def test_clip_statistics_report_median_tail_and_clipped_share():
    stats = ClipStatistics.of(torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0]), max_grad_norm=0.25)
    assert stats.median == pytest.approx(0.3)
    assert stats.p90 == pytest.approx(1.36)  # linear interpolation between 0.4 and 2.0
    assert stats.clipped_fraction == pytest.approx(0.6)
    assert stats.count == 5
    assert ClipStatistics.of(torch.zeros(0), 1.0) is None


def test_training_logs_clip_statistics_in_the_site_log(caplog):
    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1e-6, patients_per_step=2, steps_per_round=2)
    with caplog.at_level("INFO", logger="fedseg3d.training.dpsgd"):
        run(config, n_patients=4)
    [message] = [r.getMessage() for r in caplog.records if "gradient norms before clipping" in r.getMessage()]
    assert "100% clipped at max_grad_norm=1e-06" in message


def test_averaged_patch_gradients_equal_the_gradient_of_each_patients_mean_patch_loss():
    """Augmentation multiplicity: after averaging, each row is one patient's gradient of its mean patch loss (the
    slow way: one backward pass per patient over its patches), so the clip bounds a patient, not a patch."""
    from opacus import GradSampleModule  # noqa: PLC0415 - only these tests build one directly

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    n_patients, k = 3, 4
    inputs, targets = torch.randn(n_patients * k, 1, 6, 6, 6), torch.randint(0, 2, (n_patients * k,))
    model(inputs)  # materialise the lazy layer
    expected = []
    for b in range(n_patients):
        model.zero_grad()
        rows = slice(b * k, (b + 1) * k)
        torch.nn.functional.cross_entropy(model(inputs[rows]), targets[rows]).backward()
        expected.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    wrapped = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    torch.nn.functional.cross_entropy(wrapped(inputs), targets).backward()
    params = list(wrapped.parameters())
    average_grad_samples_per_patient(params, n_patients, k)
    per_patient = torch.cat([p.grad_sample.reshape(n_patients, -1) for p in params], dim=1)
    wrapped._close()
    assert per_patient.shape[0] == n_patients
    assert torch.allclose(per_patient, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_averaging_refuses_gradients_that_do_not_split_into_patients_and_patches():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad_sample = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="5 rows, expected 2 patient"):
        average_grad_samples_per_patient([param], 2, 2)


def test_several_patches_per_patient_clip_one_gradient_per_patient_and_cost_no_epsilon(caplog):
    single = DPSGDConfig(noise_multiplier=1.3, max_grad_norm=1e-6, patients_per_step=2, steps_per_round=3)
    multi = dataclasses.replace(single, patches_per_patient=3)
    with caplog.at_level("INFO", logger="fedseg3d.training.dpsgd"):
        _, _, stats, mechanism, accountant = run(multi, n_patients=4)
    # The accountant sees the same Poisson rate and steps as with one patch: the unit is still one patient.
    assert tuple(mechanism) == tuple(run(single, n_patients=4)[3])
    assert accountant.history == [(1.3, 0.5, 3)]
    [message] = [r.getMessage() for r in caplog.records if "gradient norms before clipping" in r.getMessage()]
    counted = int(message.split(" over ")[1].split(" gradients")[0])
    assert stats.patches == 3 * counted  # three patches trained, one clipped gradient per sampled patient


def test_patches_per_patient_must_be_a_whole_number_of_at_least_one():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="patches_per_patient"):
            DPSGDConfig(patches_per_patient=bad)
