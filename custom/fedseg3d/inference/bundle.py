"""A site's model as a MONAI bundle: the form a hospital's tools (MONAI Label, MONAI Deploy, ``monai.bundle``) take.

``export_bundle`` writes::

    <out>/configs/metadata.json    MONAI's metadata schema; class names, versions, provenance, temperature
    <out>/configs/inference.json   NIfTI folder in, label maps out: ``python -m monai.bundle run``
    <out>/models/model.pt          the network's state dict
    <out>/models/model.ts          TorchScript with both configs embedded (``monai.bundle.ckpt_export``)
    <out>/docs/README.md           what the bundle is and how to run it

``load_bundle`` rebuilds the ``DeployableModel`` from ``metadata.json`` and ``model.pt``, and refuses a bundle that
is missing a file, is not JSON, lacks a field or whose weights do not fit the network, naming the file.

Security: a bundle config executes code (``$`` expressions, ``_target_``): run bundles from trusted sources only.
``load_bundle`` itself executes nothing from the bundle (it reads JSON and loads weights with ``weights_only``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ckpt_export

from fedseg3d.data.task import parse_class_names
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.bundle_config import FEDSEG3D_KEY, inference_config, metadata
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.loading import ModelLoadError
from fedseg3d.models.presets import build_model

logger = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
TORCHSCRIPT = Path("models") / "model.ts"
README = Path("docs") / "README.md"


def export_bundle(model: DeployableModel, out_dir: Path) -> Path:
    """Write ``model`` as a MONAI bundle in ``out_dir`` (created; existing bundle files are replaced).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    for sub in ("configs", "models", "docs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    meta = metadata(model)
    _write_json(out_dir / METADATA, meta)
    _write_json(out_dir / INFERENCE, inference_config(model))
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS)
    # MONAI's own export: builds network_def from the config, loads model.pt, scripts it, embeds both configs.
    ckpt_export(
        net_id="network_def",
        filepath=str(out_dir / TORCHSCRIPT),
        ckpt_file=str(out_dir / WEIGHTS),
        meta_file=str(out_dir / METADATA),
        config_file=str(out_dir / INFERENCE),
        bundle_root=str(out_dir),
    )
    (out_dir / README).write_text(_readme(model, meta))
    logger.info("exported %s to %s", model.model_preset, out_dir)
    return out_dir


def load_bundle(path: Path) -> DeployableModel:
    """The ``DeployableModel`` a bundle written by ``export_bundle`` holds.

    Raises:
        ModelLoadError: the folder, ``configs/metadata.json`` or ``models/model.pt`` is missing or unreadable, the
            metadata lacks a field or has a wrong one, or the weights do not fit the network it describes.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(path, "not a bundle folder (expected configs/metadata.json and models/model.pt inside)")
    meta_file = path / METADATA
    meta = _read_json(meta_file)
    facts = meta.get(FEDSEG3D_KEY)
    if not isinstance(facts, dict):
        raise ModelLoadError(meta_file, f"field '{FEDSEG3D_KEY}' is missing: not a bundle exported by fedseg3d export")
    try:
        preset = str(facts["model_preset"])
        class_names = parse_class_names(facts["class_names"])
        preprocessing = PreprocessConfig.from_dict(facts["preprocessing"])
        temperature = float(facts.get("temperature", 1.0))
        provenance = dict(facts.get("provenance") or {})
        network = build_model(preset, out_channels=len(class_names))
    except KeyError as err:
        raise ModelLoadError(meta_file, f"field '{FEDSEG3D_KEY}.{err.args[0]}' is missing") from err
    except (TypeError, ValueError) as err:
        raise ModelLoadError(meta_file, f"field '{FEDSEG3D_KEY}' is not valid: {err}") from err
    if not temperature > 0:
        raise ModelLoadError(meta_file, f"field '{FEDSEG3D_KEY}.temperature' must be > 0, got {temperature}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(weights, "missing: the bundle has no weights")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as err:  # torch raises several kinds for a truncated file or mismatched keys
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        expected = f"{preset} with {len(class_names)} classes"
        raise ModelLoadError(weights, f"not the weights of a {expected} ({first})") from err
    network.eval()
    return DeployableModel(
        network=network,
        model_preset=preset,
        class_names=class_names,
        preprocessing=preprocessing,
        provenance=provenance,
        temperature=temperature,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(path, "missing: not a complete MONAI bundle")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(path, "must be a JSON object")
    return data


def _readme(model: DeployableModel, meta: dict[str, Any]) -> str:
    provenance = json.dumps(model.provenance, indent=2)
    return (
        f"# {meta['task']}\n\n{meta['description']}\n\n"
        "## Run\n\n"
        "```\npython -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\\n"
        "    --bundle_root . --dataset_dir /path/to/nifti --output_dir /path/to/labels\n```\n\n"
        "Each `<name>.nii.gz` gives `<name>_seg.nii.gz`: uint8 labels on the input's own grid and affine. Classes: "
        f"{meta['network_data_format']['outputs']['pred']['channel_def']}.\n"
        "Needs MONAI, nibabel and fire (the `monai.bundle` command line). A bundle config executes code: run bundles "
        "from trusted sources only.\n\n"
        f"## Provenance\n\nTemperature (local calibration): {model.temperature:g}\n\n```json\n{provenance}\n```\n"
    )
