"""The clip-distortion figures: a clip that only rescales scores 1, one that reweights patients does not."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clip_distortion import clip_geometry


def test_equal_lengths_are_only_rescaled_by_the_clip():
    torch.manual_seed(0)
    directions = torch.randn(16, 50)
    grads = 3.0 * directions / directions.norm(dim=1, keepdim=True)
    geometry = clip_geometry(grads, clip=0.25)
    assert geometry["cv"] == pytest.approx(0.0, abs=1e-6)
    assert geometry["cos_clip"] == pytest.approx(1.0, abs=1e-6)
    assert geometry["cos_unit"] == pytest.approx(1.0, abs=1e-6)
    assert geometry["clipped_share"] == 1.0


def test_one_long_gradient_dominates_the_mean_until_it_is_clipped():
    long, short = torch.tensor([10.0, 0.0]), torch.tensor([0.0, 1.0])
    grads = torch.stack([long, short, short])
    geometry = clip_geometry(grads, clip=0.5)
    # Unclipped mean (10, 2)/3; clipped (0.5, 1.0)/3: the clip turns the step towards the short gradients.
    expected = float(torch.nn.functional.cosine_similarity(torch.tensor([10.0, 2.0]), torch.tensor([0.5, 1.0]), dim=0))
    assert geometry["cos_clip"] == pytest.approx(expected, abs=1e-6)
    assert geometry["cos_clip"] < 0.7
    assert geometry["median"] == 1.0 and geometry["clipped_share"] == 1.0


def test_agreement_is_one_for_identical_gradients_and_zero_for_opposite_ones():
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert clip_geometry(g, clip=1.0)["agree"] == pytest.approx(1.0)
    assert clip_geometry(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), clip=1.0)["agree"] == pytest.approx(0.0)
