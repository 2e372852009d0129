"""Poisson sampling can draw nobody in the first step of a round (probability about exp(-patients_per_step)): that
step must be a noise-only step, not a crash of the site."""

from __future__ import annotations

import torch
from monai.data import MetaTensor

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.training.dpsgd import DPSGDConfig, make_patient_loader

CFG = PreprocessConfig(roi_size=(16, 16, 16))


def items(n: int = 16) -> list[dict]:
    cases = []
    for i in range(n):
        label = torch.zeros(1, 16, 16, 16)
        label[0, 4:8, 4:8, 4:8] = 1
        cases.append({"image": MetaTensor(torch.rand(1, 16, 16, 16)), "label": MetaTensor(label), "case_id": f"c{i}"})
    return cases


def test_an_empty_first_batch_is_an_empty_step():
    config = DPSGDConfig(noise_multiplier=1.0, patients_per_step=1)
    data = items()
    empty_seeds = []
    for seed in range(60):
        first = next(iter(make_patient_loader(data, CFG, config, seed)))
        if not (isinstance(first, dict) and first["image"].shape[0] > 0):
            empty_seeds.append(seed)
            assert len(first) == 0, f"seed {seed}: empty first batch should be empty, got {type(first)}"
    # P(empty) = (1 - 1/16)^16 = 0.36: 60 seeds without one would mean the test no longer exercises the case.
    assert empty_seeds, "no seed drew an empty first batch"
