import math

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fedseg3d.models.local_state import (
    batchnorm_state_keys,
    load_shared_state,
    shared_state_numpy,
    split_local_state,
)
from fedseg3d.models.presets import PRESETS, PresetUNet, build_model, preset_args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name):
    # Instance norm needs more than one voxel at the deepest level: 2^3 there for the base network's 4 strides.
    size = 2 * math.prod(PRESETS[name]["strides"])
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size, size))
    assert out.shape == (1, PRESETS[name]["out_channels"], size, size, size)


def test_preset_unet_matches_build_model():
    assert PresetUNet("unet3d_tiny").state_dict().keys() == build_model("unet3d_tiny").state_dict().keys()
    assert PresetUNet("unet3d_tiny", num_classes=5).state_dict()["model.2.1.conv.unit0.conv.bias"].shape == (5,)


def test_unknown_preset_and_argument():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['depth'\]"):
        preset_args("unet3d_tiny", depth=3)


def test_batchnorm_keys_are_chosen_by_module_type_not_name():
    model = build_model("unet3d_tiny")
    keys = batchnorm_state_keys(model)
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert n_bn > 0
    assert len(keys) == 5 * n_bn  # weight, bias, running_mean, running_var, num_batches_tracked
    assert all(".adn.N." in k for k in keys)  # MONAI's naming: a "bn" substring filter would match nothing
    assert not any("bn" in k for k in keys)


def test_fedbn_split_keeps_batchnorm_and_integer_buffers_local():
    model = build_model("unet3d_tiny")
    fedbn = split_local_state(model, keep_batchnorm_local=True)
    fedavg = split_local_state(model, keep_batchnorm_local=False)
    bn = batchnorm_state_keys(model)
    assert set(fedbn.local) == bn
    assert not set(fedbn.shared) & bn
    assert set(fedavg.local) == {k for k in bn if k.endswith("num_batches_tracked")}
    assert set(fedbn.shared) | set(fedbn.local) == set(model.state_dict())


def test_load_shared_state_never_touches_local_batchnorm():
    model = build_model("unet3d_tiny")
    split = split_local_state(model, keep_batchnorm_local=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.fill_(3.0)
    incoming = {k: np.full(v.shape, 0.5, np.float32) for k, v in model.state_dict().items()}
    ignored = load_shared_state(model, split, incoming)
    state = model.state_dict()
    assert set(ignored) == set(split.local)
    assert all(torch.all(state[k] == 0.5) for k in split.shared)
    assert all(torch.all(state[k] == 3.0) for k in split.local if k.endswith("running_mean"))


def test_load_shared_state_rejects_missing_or_misshapen_keys():
    model = build_model("unet3d_tiny")
    split = split_local_state(model, keep_batchnorm_local=True)
    weights = shared_state_numpy(model, split)
    missing = dict(weights)
    missing.pop(split.shared[0])
    with pytest.raises(KeyError, match="lacks 1 shared key"):
        load_shared_state(model, split, missing)
    weights[split.shared[0]] = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match=f"'{split.shared[0]}' has shape"):
        load_shared_state(model, split, weights)


@pytest.mark.parametrize("name", ["unet3d_base_instancenorm", "unet3d_base_groupnorm"])
def test_norms_without_running_statistics_share_their_affine_parameters(name):
    """Instance and group norm keep nothing per site: their weight and bias are shared, even under FedBN."""
    model = build_model(name, out_channels=5)  # 5 classes: group norm must fit the output layer too
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.InstanceNorm3d)]
    assert norms and not any(isinstance(m, _BatchNorm) for m in model.modules())
    affine = {k for k in model.state_dict() if k.rsplit(".", 2)[-2] == "N"}  # MONAI's norm layers: adn.N
    assert affine and affine <= set(split_local_state(model, keep_batchnorm_local=True).shared)
    assert split_local_state(model, keep_batchnorm_local=True).local == ()
    base = build_model("unet3d_base", out_channels=5)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
