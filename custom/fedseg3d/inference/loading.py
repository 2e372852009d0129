"""Find and load the model a site deploys, from wherever a finished job left it.

A user points at what they have: a site's ``site_models`` folder, the site's job (app) folder, a whole simulator or
POC workspace with several sites, or an exported MONAI bundle. The site's ``models.json`` carries the recipe
(``fedseg3d.training.site_models.model_recipe``): the network preset, the class names and the preprocessing the
site trained with, so the model is applied exactly as it was trained. Every problem is a ``ModelLoadError`` naming
the file and what is wrong, never a bare ``KeyError`` from deep inside torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedseg3d.data.task import JobConfigError, parse_class_names
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.models.checkpoint import state_mismatches
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_models import BEST, INDEX, RECIPE_FIELDS, RECIPE_KEY

BUNDLE_METADATA = Path("configs") / "metadata.json"


class ModelLoadError(ValueError):
    """The model cannot be found or loaded; the message names the file (or folder) and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def is_bundle(source: Path) -> bool:
    """A MONAI bundle has ``configs/metadata.json``."""
    return (Path(source) / BUNDLE_METADATA).is_file()


def load_deployable(source: Path, site: str | None = None, which: str = BEST) -> DeployableModel:
    """The model to apply to a scan, with its recipe and provenance.

    Args:
        source: a ``site_models`` folder, a site's job/app folder, a simulator or POC workspace holding several
            sites' ``site_models``, or a MONAI bundle (``configs/metadata.json``).
        site: which site's model when ``source`` holds several.
        which: the file in ``site_models`` (``best_model.pt``: the one the site chose to deploy).

    Raises:
        ModelLoadError: nothing found, several sites and none chosen, unreadable or incomplete ``models.json``,
            an unreadable checkpoint, or a state dict that does not fit the recorded preset.
    """
    source = Path(source)
    if not source.exists():
        raise ModelLoadError(source, "model path does not exist")
    if is_bundle(source):
        from fedseg3d.inference.bundle import load_bundle  # only bundle users pay for monai.bundle's imports

        return load_bundle(source)
    folder = find_site_models(source, site)
    recipe, entry = read_recipe(folder / INDEX, which)
    checkpoint = folder / which
    network = _network(recipe, checkpoint)
    provenance = {
        "source": str(checkpoint.resolve()),
        "job_id": recipe["job_id"],
        "site": recipe["site"],
        "file": which,
        **{k: entry[k] for k in ("round", "val_mean_dice", "what") if k in entry},
    }
    return DeployableModel(
        network=network,
        model_preset=recipe["model_preset"],
        class_names=recipe["class_names"],
        preprocessing=recipe["preprocessing"],
        provenance=provenance,
    )


def find_site_models(source: Path, site: str | None) -> Path:
    """The one ``site_models`` folder under ``source`` (itself included) that belongs to ``site``.

    Raises:
        ModelLoadError: none found, several sites and ``site`` is None (the sites are listed), ``site`` not among
            them, or several folders for the same site (e.g. several jobs in one workspace; they are listed).
    """
    if (source / INDEX).is_file():
        candidates = [source]
    else:
        candidates = sorted(index.parent for index in source.rglob(f"site_models/{INDEX}"))
    if not candidates:
        raise ModelLoadError(
            source,
            f"no site model found: expected {INDEX} here or in a site_models folder below it (a job's "
            "app_<site>/site_models), or a MONAI bundle with configs/metadata.json",
        )
    by_site: dict[str, list[Path]] = {}
    for folder in candidates:
        by_site.setdefault(_site_of(folder), []).append(folder)
    if site is None and len(by_site) > 1:
        raise ModelLoadError(source, f"holds models of several sites {sorted(by_site)}: choose one with --site")
    if site is not None and site not in by_site:
        raise ModelLoadError(source, f"no model of site '{site}'; found sites {sorted(by_site)}")
    folders = by_site[site] if site is not None else next(iter(by_site.values()))
    if len(folders) > 1:
        listed = ", ".join(str(f) for f in folders)
        raise ModelLoadError(source, f"several model folders for the same site ({listed}): point at one of them")
    return folders[0]


def _site_of(folder: Path) -> str:
    """The site a ``site_models`` folder belongs to, from its ``models.json`` (the folder name if unreadable)."""
    try:
        return str(json.loads((folder / INDEX).read_text()).get("site", folder.parent.name))
    except (OSError, ValueError, AttributeError):
        return folder.parent.name  # read_recipe reports the broken file once this folder is chosen


def read_recipe(index: Path, which: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed ``"model"`` section of a ``models.json`` and the entry of the file ``which``.

    Returns:
        The recipe with ``class_names`` as index -> name and ``preprocessing`` as a ``PreprocessConfig``, and the
        ``models`` entry of ``which`` (round, Dice, what it is).

    Raises:
        ModelLoadError: naming ``index``: unreadable, not JSON, no ``"model"`` section (a job run before models.json
            recorded it), missing or malformed fields, or no entry for ``which``.
    """
    try:
        content = json.loads(index.read_text())
    except OSError as err:
        raise ModelLoadError(index, f"cannot read the site's model index ({err.strerror or err})") from err
    except ValueError as err:
        raise ModelLoadError(index, f"not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise ModelLoadError(index, "expected a JSON object with 'models' and 'model'")
    raw = content.get(RECIPE_KEY)
    if not isinstance(raw, dict):
        raise ModelLoadError(
            index,
            f"no '{RECIPE_KEY}' section (preset, class names, preprocessing): the job ran with an older fedseg3d. "
            "Re-run the job with this version, or export a MONAI bundle that records them",
        )
    missing = [name for name in RECIPE_FIELDS if name not in raw]
    if missing:
        raise ModelLoadError(index, f"'{RECIPE_KEY}' section lacks field(s) {missing}; expected {list(RECIPE_FIELDS)}")
    entries = content.get("models") if isinstance(content.get("models"), dict) else {}
    if which not in entries:
        raise ModelLoadError(index, f"lists no model file '{which}'; it lists {sorted(entries)}")
    try:
        class_names = parse_class_names(raw["class_names"], f"{RECIPE_KEY}.class_names")
        if not isinstance(raw["preprocessing"], dict):
            raise ValueError(f"{RECIPE_KEY}.preprocessing must be an object, got {raw['preprocessing']!r}")
        preprocessing = PreprocessConfig.from_dict(raw["preprocessing"])
    except (JobConfigError, ValueError, TypeError) as err:
        raise ModelLoadError(index, f"malformed '{RECIPE_KEY}' section: {err}") from err
    if not isinstance(raw["model_preset"], str):
        raise ModelLoadError(index, f"'{RECIPE_KEY}.model_preset' must be a preset name, got {raw['model_preset']!r}")
    recipe = {**raw, "class_names": class_names, "preprocessing": preprocessing}
    return recipe, entries[which]


def _network(recipe: dict[str, Any], checkpoint: Path) -> torch.nn.Module:
    """The recipe's network with the checkpoint's weights, in eval mode.

    Raises:
        ModelLoadError: naming ``checkpoint``: missing, not a state dict of tensors, or keys/shapes that do not
            fit the preset with this many classes.
    """
    preset, num_classes = recipe["model_preset"], len(recipe["class_names"])
    try:
        network = build_model(preset, out_channels=num_classes)
    except ValueError as err:
        raise ModelLoadError(checkpoint.parent / INDEX, str(err)) from err
    if not checkpoint.is_file():
        raise ModelLoadError(checkpoint, "model file not found")
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds (pickle, zip, EOF) for a file that is not a checkpoint
        raise ModelLoadError(checkpoint, f"not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(checkpoint, "expected a state dict of tensors")
    problems = state_mismatches(network.state_dict(), state)
    if problems:
        raise ModelLoadError(
            checkpoint, f"does not fit preset '{preset}' with {num_classes} classes: {'; '.join(problems)}"
        )
    network.load_state_dict(state)
    return network.eval()
