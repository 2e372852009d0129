"""Facts of a site that a job must not carry: where its data lives, its cache, workers and device.

A hospital writes ``fedseg3d_site.json`` into its FLARE ``local/`` folder (next to ``resources.json`` and
``privacy.json``). In the simulator, where sites have no persistent ``local/`` folder, the learner falls back to
``$FEDSEG3D_SITES_ROOT/<site_name>/site.json`` (what ``make data`` writes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from fedseg3d.data.errors import DataError

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
    """

    site_name: str
    data_root: Path
    datalist: Path
    device: str = "auto"
    num_threads: int = 0
    skip_bad_cases: bool = False
    output_dir: Path | None = None

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
        known = {f.name for f in fields(cls)} | {"scanner"}
        unknown = set(raw) - known
        if unknown:
            raise DataError(path, f"unknown field(s) {sorted(unknown)}; known: {sorted(known - {'scanner'})}")
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
        )


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
