"""The loss-threshold attack, on real tiny MONAI training: blind to a model that saw neither set, sharp on an
overfit one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import DataLoader
from monai.utils import set_determinism

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dataset import CasePreparer
from fedseg3d.data.synthetic import generate_sites
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import build_model
from fedseg3d.privacy.membership_audit import attack_auc, audit_model, bootstrap_auc_interval, case_losses
from fedseg3d.training.loops import train_local

CFG = PreprocessConfig(roi_size=(16, 16, 16))
N = 16  # cases per set: the AUC of a blind attack then has a standard deviation of about 0.1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def three_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], list[dict]]:
    """Three disjoint sets of cases from one synthetic site (same scanner, same anatomy distribution)."""
    root = tmp_path_factory.mktemp("audit_site")
    generate_sites(root, n_sites=1, seed=3, fov_mm=32.0, cases_scale=4.0, dicom_sites=())
    datalist = load_datalist(root / "site-1" / "datalist.json", root / "site-1")
    preparer = CasePreparer(CFG, num_classes=3)
    cases = [preparer(case) for case in (*datalist.training, *datalist.validation)]
    assert len(cases) >= 3 * N
    return cases[:N], cases[N : 2 * N], cases[2 * N : 3 * N]


def overfit(cases: list[dict], steps: int = 150) -> torch.nn.Module:
    """Train a tiny U-Net on whole volumes without augmentation until it memorises them (fixed seed)."""
    set_determinism(seed=0)
    model = build_model("unet3d_tiny")
    data = [{"image": c["image"], "label": c["label"]} for c in cases]
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_local(model, loader, optimizer, CPU, max_steps=steps)
    return model


def test_auc_is_one_zero_and_a_half_where_it_must_be():
    assert attack_auc([0.1, 0.2], [0.3, 0.4]) == 1.0  # every member has a lower loss
    assert attack_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert attack_auc([0.2, 0.2], [0.2, 0.2]) == 0.5  # ties count half
    assert attack_auc([0.1, 0.3], [0.2, 0.4]) == 0.75


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="members and non-members"):
        attack_auc([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        attack_auc([float("nan")], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_auc_interval([0.1], [0.2], confidence=1.5)
    with pytest.raises(ValueError, match="at least one case"):
        case_losses(build_model("unet3d_tiny"), [], CPU, CFG.roi_size)


def test_attack_is_blind_to_a_model_that_saw_neither_set(three_sets):
    members, nonmembers, others = three_sets
    result = audit_model(overfit(others), members, nonmembers, CPU, CFG.roi_size, resamples=300)
    assert (result.n_members, result.n_nonmembers) == (N, N)
    assert abs(result.auc - 0.5) <= 0.25, result
    assert result.auc_low <= 0.5 <= result.auc_high, result


def test_attack_recognises_the_members_of_an_overfit_model(three_sets):
    members, nonmembers, _ = three_sets
    result = audit_model(overfit(members), members, nonmembers, CPU, CFG.roi_size, resamples=300)
    assert result.auc >= 0.9, result
    assert result.auc_low > 0.5, result
    assert result.member_loss < result.nonmember_loss


def test_audit_is_reproducible(three_sets):
    members, nonmembers, _ = three_sets
    model = build_model("unet3d_tiny")
    first = audit_model(model, members, nonmembers, CPU, CFG.roi_size, resamples=50, seed=1)
    second = audit_model(model, members, nonmembers, CPU, CFG.roi_size, resamples=50, seed=1)
    assert first == second


def test_case_losses_name_the_case_when_the_model_output_is_not_finite(three_sets):
    members, _, _ = three_sets
    model = build_model("unet3d_tiny")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=members[0]["case_id"]):
        case_losses(model, members[:1], CPU, CFG.roi_size)


def test_fixture_sets_are_disjoint(three_sets):
    ids = [c["case_id"] for s in three_sets for c in s]
    assert len(ids) == len(set(ids)) == 3 * N
    assert all(Path(i).name == i for i in ids)
