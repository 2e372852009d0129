"""The two JSON files of an exported MONAI bundle: ``configs/metadata.json`` and ``configs/inference.json``.

Pure functions from a ``DeployableModel`` to plain dicts, so what a bundle says can be tested without writing one.
The inference config uses MONAI only (no ``fedseg3d`` import, except the group-norm layer a group-norm preset
needs): a hospital can run the bundle with ``python -m monai.bundle run`` on a machine that has MONAI and nothing
of this project. It needs no pytorch-ignite either: the ``run`` step is a plain loop over the images, written as
bundle expressions, where MONAI's template uses an ignite evaluator.

The preprocessing mirrors ``fedseg3d.data.transforms`` step by step (channel first, RAS, the site's voxel spacing,
its intensity window or percentiles), then sliding-window inference with the training loop's window, batch and
overlap, the softmax with the model's temperature, the argmax, and the labels resampled by nearest neighbour onto
the scan's own grid and affine (MONAI's ``ResampleToMatch``, as ``fedseg3d predict`` does), saved as uint8 NIfTI.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.models.norms import NAME as GROUP_NORM
from fedseg3d.models.presets import preset_args
from fedseg3d.training.loops import SW_BATCH_SIZE, SW_OVERLAP

# The MONAI bundle metadata schema the metadata follows (the current one: it has ``required_packages_version``).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
FEDSEG3D_KEY = "fedseg3d"  # the metadata entry with what ``load_bundle`` needs to rebuild the model
OUTPUT_POSTFIX = "seg"
SOURCE_KEY = "source"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any) -> Any:
    """Tuples (preset arguments, preprocessing) as lists, recursively: JSON has no tuples."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def network_args(model: DeployableModel) -> dict[str, Any]:
    """The MONAI ``UNet`` constructor arguments of the model's preset, with its number of classes."""
    return _jsonable(preset_args(model.model_preset, out_channels=model.num_classes))


def uses_fedseg3d_norm(model: DeployableModel) -> bool:
    """Whether the network needs ``fedseg3d.models.norms`` registered (the group-norm presets)."""
    norm = preset_args(model.model_preset)["norm"]
    return (norm if isinstance(norm, str) else norm[0]) == GROUP_NORM


def metadata(model: DeployableModel) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's mandatory fields, the tensors in and out with the class names, and the
    model's provenance, temperature and preprocessing (under ``fedseg3d``)."""
    cfg = model.preprocessing
    modality = "CT" if cfg.intensity_mode == "ct_window" else "MR"
    channel_def = {str(i): name for i, name in sorted(model.class_names.items())}
    provenance = model.provenance
    required = {"monai": _version("monai"), "nibabel": _version("nibabel")}
    if uses_fedseg3d_norm(model):
        required["fedseg3d"] = _version("fedseg3d")
    site = provenance.get("site", "?")
    job = provenance.get("job_id", "?")
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from federated job {job} for site {site}"},
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch").split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": required,
        "task": f"3D segmentation of {', '.join(list(channel_def.values())[1:])} ({modality})",
        "description": (
            f"A {model.model_preset} network trained by federated learning (job {job}), the model site {site} "
            f"deploys. Input: a {modality} volume in NIfTI; it is reoriented to RAS, resampled to "
            f"{list(cfg.target_spacing)} mm and intensity-normalised as in training; output: a label map on the "
            f"input's own grid. Provenance (job, round, training sites, validation Dice, privacy spent) is under "
            f"'{FEDSEG3D_KEY}'."
        ),
        "authors": "fedseg3d federation",
        "copyright": "Copyright (c) the federation's member sites",
        "data_type": "nibabel",
        "image_classes": f"single channel {modality} volume, normalised to [0, 1] by the bundle's preprocessing",
        "pred_classes": f"{model.num_classes} channels, one per class: {channel_def}",
        "eval_metrics": {"val_mean_dice": provenance["val_mean_dice"]} if "val_mean_dice" in provenance else {},
        "intended_use": "Research use; not validated for diagnostic purposes",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality == "CT" else "magnitude",
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": [int(s) for s in cfg.roi_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": model.num_classes,
                    "spatial_shape": [int(s) for s in cfg.roi_size],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
        FEDSEG3D_KEY: {
            "model_preset": model.model_preset,
            "class_names": [model.class_names[i] for i in sorted(model.class_names)],
            "preprocessing": _jsonable(dataclasses.asdict(cfg)),
            "temperature": float(model.temperature),
            "provenance": provenance,
        },
    }


def intensity_transform(cfg: PreprocessConfig) -> dict[str, Any]:
    """The bundle's copy of ``fedseg3d.data.transforms.intensity_transform``, as a config entry."""
    scaled = {"keys": "image", "b_min": 0.0, "b_max": 1.0, "clip": True}
    if cfg.intensity_mode == "ct_window":
        low, high = cfg.ct_window
        return {"_target_": "ScaleIntensityRanged", "a_min": low, "a_max": high, **scaled}
    low, high = cfg.mr_percentiles
    return {"_target_": "ScaleIntensityRangePercentilesd", "lower": low, "upper": high, **scaled}


def inference_config(model: DeployableModel) -> dict[str, Any]:
    """``configs/inference.json``: NIfTI files of ``dataset_dir`` in, ``<name>_seg.nii.gz`` label maps out.

    Override ``dataset_dir`` and ``output_dir`` on the command line (``--dataset_dir DIR --output_dir DIR``).
    """
    cfg = model.preprocessing
    imports = ["$import glob", "$import torch"]
    if uses_fedseg3d_norm(model):
        imports.append("$import fedseg3d.models.norms")
    return {
        "imports": imports,
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "temperature": float(model.temperature),
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "network_def": {"_target_": "monai.networks.nets.UNet", **network_args(model)},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                # The scan as read: the grid the labels go back to.
                {"_target_": "CopyItemsd", "keys": "image", "names": SOURCE_KEY},
                {
                    "_target_": "Orientationd",
                    "keys": "image",
                    "axcodes": "RAS",
                    "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
                },
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(cfg.target_spacing), "mode": "bilinear"},
                intensity_transform(cfg),
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(s) for s in cfg.roi_size],
            "sw_batch_size": SW_BATCH_SIZE,
            "overlap": SW_OVERLAP,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                # Temperature from local calibration: it changes the probabilities, never the argmax below.
                {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.softmax(x / @temperature, dim=0)"},
                # Argmax on the model's grid, then the labels onto the scan's grid by nearest neighbour: the label map
                # training's evaluation scores, resampled as ``fedseg3d.inference.segment`` does for predict.
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "ResampleToMatchd",
                    "keys": "pred",
                    "key_dst": SOURCE_KEY,
                    "mode": "nearest",
                    "padding_mode": "zeros",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": OUTPUT_POSTFIX,
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": True,
                },
            ],
        },
        "predict": (
            "$lambda item: @postprocessing({**item, 'pred': @inferer(item['image'].unsqueeze(0).to(@device), "
            "@network)[0]})"
        ),
        "initialize": [
            "$monai.utils.set_determinism(seed=0)",
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
            "$torch.set_grad_enabled(False)",
        ],
        "run": ["$[@predict(item) for item in @dataset]"],
        "finalize": [],
    }
