"""Facts of a site that a job must not carry: where its data lives, its cache, workers and device, and how its
images and labels differ from the consortium's conventions (label IDs, intensity handling).

A hospital writes ``fedseg3d_site.json`` into its FLARE ``local/`` folder (next to ``resources.json`` and
``privacy.json``). In the simulator, where sites have no persistent ``local/`` folder, the learner falls back to
``$FEDSEG3D_SITES_ROOT/<site_name>/site.json`` (what ``make data`` writes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from fedseg3d.data.errors import DataError
from fedseg3d.data.label_map import LabelMap
from fedseg3d.data.transforms import INTENSITY_MODES, PreprocessConfig

SITE_CONFIG_FILENAME = "fedseg3d_site.json"
SITES_ROOT_ENV = "FEDSEG3D_SITES_ROOT"


@dataclass(frozen=True)
class SiteConfig:
    """Where a site's data is and how the site wants to run.

    Attributes:
        site_name: the FLARE client name this config belongs to.
        data_root: folder that the datalist's relative paths start from.
        datalist: the Decathlon-style datalist JSON.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        num_threads: torch CPU threads for this site (0 keeps torch's default); set it when several sites
            share one machine, as in POC, to avoid oversubscribing the cores.
        skip_bad_cases: skip (with a warning) cases that fail the data checks instead of failing the task.
        output_dir: where the site keeps its own models and reports; defaults to the job's app folder.
        label_map: the site's label IDs as consortium class names (``label_map`` and ``unmapped_labels`` fields,
            see ``fedseg3d.data.label_map``); ``None`` when the label files already hold the job's class indices.
        intensity: the site's intensity handling, replacing the job's (``intensity`` field, see
            ``SiteIntensity``); ``None`` keeps the job's. One federation may mix CT and MR sites.
    """

    site_name: str
    data_root: Path
    datalist: Path
    device: str = "auto"
    num_threads: int = 0
    skip_bad_cases: bool = False
    output_dir: Path | None = None
    label_map: LabelMap | None = None
    intensity: SiteIntensity | None = None

    def preprocessing_for(self, job: PreprocessConfig) -> PreprocessConfig:
        """The job's preprocessing with this site's intensity handling in place of the job's."""
        if self.intensity is None:
            return job
        if self.intensity.mode == "ct_window":
            return dataclasses.replace(job, intensity_mode="ct_window", ct_window=self.intensity.values)
        return dataclasses.replace(job, intensity_mode="mr_percentile", mr_percentiles=self.intensity.values)

    @classmethod
    def from_file(cls, path: str | Path, site_name: str | None = None) -> SiteConfig:
        """Read a site config; relative paths are taken relative to the config file's folder.

        Raises:
            DataError: the file is missing, not JSON, lacks a field or has an unknown one.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "site config file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(path, f"site config is not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise DataError(path, "site config must be a JSON object")
        known = {f.name for f in fields(cls)} | {"scanner", "unmapped_labels"}
        unknown = set(raw) - known
        if unknown:
            raise DataError(path, f"unknown field(s) {sorted(unknown)}; known: {sorted(known - {'scanner'})}")
        if "unmapped_labels" in raw and "label_map" not in raw:
            raise DataError(path, "field 'unmapped_labels' is set but there is no 'label_map' field")
        for key in ("data_root", "datalist"):
            if not isinstance(raw.get(key), str):
                raise DataError(path, f"field '{key}' must be a path string, got {raw.get(key)!r}")
        name = raw.get("site_name", site_name)
        if site_name is not None and name != site_name:
            raise DataError(path, f"field 'site_name' is '{name}' but this site is '{site_name}'")
        base = path.parent
        data_root = (base / raw["data_root"]).resolve()
        output_dir = raw.get("output_dir")
        return cls(
            site_name=str(name),
            data_root=data_root,
            datalist=(data_root / raw["datalist"]).resolve(),
            device=str(raw.get("device", "auto")),
            num_threads=int(raw.get("num_threads", 0)),
            skip_bad_cases=bool(raw.get("skip_bad_cases", False)),
            output_dir=(base / output_dir).resolve() if output_dir else None,
            label_map=(
                LabelMap.from_raw(path, raw["label_map"], raw.get("unmapped_labels", "error"))
                if "label_map" in raw
                else None
            ),
            intensity=SiteIntensity.from_raw(path, raw["intensity"]) if "intensity" in raw else None,
        )


@dataclass(frozen=True)
class SiteIntensity:
    """How a site's images are brought to [0, 1]: ``{"mode": "ct_window", "window": [low_hu, high_hu]}`` (CT numbers
    are calibrated, so a fixed window) or ``{"mode": "mr_percentile", "percentiles": [low, high]}`` (MR units are
    arbitrary, so per-image percentiles)."""

    mode: str
    values: tuple[float, float]

    @classmethod
    def from_raw(cls, path: Path, raw: object) -> SiteIntensity:
        """Parse the ``intensity`` field.

        Raises:
            DataError: naming ``path`` and the field, for an unknown mode, a missing or misshapen range, or a
                range that is not low < high (percentiles also within 0..100).
        """
        if not isinstance(raw, dict) or raw.get("mode") not in INTENSITY_MODES:
            raise DataError(path, f"field 'intensity.mode' must be one of {INTENSITY_MODES}, got {raw!r}")
        mode = raw["mode"]
        key = "window" if mode == "ct_window" else "percentiles"
        extra = set(raw) - {"mode", key}
        if extra:
            raise DataError(path, f"field 'intensity' has unknown key(s) {sorted(extra)} for mode '{mode}'")
        values = raw.get(key)
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, int | float) for v in values)):
            raise DataError(path, f"field 'intensity.{key}' must be [low, high], got {values!r}")
        low, high = float(values[0]), float(values[1])
        if low >= high or (mode == "mr_percentile" and not 0 <= low < high <= 100):
            bounds = "0 <= low < high <= 100" if mode == "mr_percentile" else "low < high"
            raise DataError(path, f"field 'intensity.{key}' must satisfy {bounds}, got {values}")
        return cls(mode=mode, values=(low, high))


def find_site_config(site_name: str, site_local_dir: str | Path | None) -> Path:
    """Locate the site config: the site's FLARE ``local/`` folder first, then ``$FEDSEG3D_SITES_ROOT``.

    Raises:
        DataError: neither place has a config for this site; the message lists where it looked.
    """
    candidates = []
    if site_local_dir is not None:
        candidates.append(Path(site_local_dir) / SITE_CONFIG_FILENAME)
    sites_root = os.environ.get(SITES_ROOT_ENV)
    if sites_root:
        candidates.append(Path(sites_root) / site_name / "site.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise DataError(
        site_name,
        f"no site config found (looked in: {looked}); write {SITE_CONFIG_FILENAME} into the site's local/ folder "
        f"or set {SITES_ROOT_ENV}",
    )
