"""Build real multi-site data from the scans in TotalSegmentator's source archive (docs/real_data.md).

``totalsegmentator==2.18.0`` (Apache-2.0) ships real scans with organ label maps in ``tests/reference_files/``.
This module fetches that archive through pip (pinned by version and sha256, ``fedseg3d.data.source_archive``),
extracts only those files, and writes three sites that differ as hospitals do:

- ``site-1``: CT at 3 mm, NIfTI, an abdomen-pelvis scan (its labels come from the archive's ``--fast`` run);
- ``site-2``: a Siemens CT read as the real DICOM series (0.98 x 0.98 x 2 mm, 20 slices);
- ``site-3``: MR at 3 mm, NIfTI, with TotalSegmentator's MR label IDs.

Each site is one subject, split along z into training and validation slabs with a gap, so no validation voxel is
ever seen in training. Label IDs stay the site's own (TotalSegmentator's 117 CT or 50 MR classes); each site's
``site.json`` maps them to the consortium's classes (``label_map``) and says how to scale its intensities. The
labels were made by a model, not by people (silver standard).

It writes ``<out>/site-N/`` (images, labels, ``datalist.json``, ``site.json``) and ``<out>/sites.json`` (the source,
its hash, the classes and each site's split). Nothing is downloaded at training time.

Example:
    fedseg3d data real --out data/real [--cache DIR] [--classes spleen,liver,stomach,pancreas]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg3d.data.errors import DataError
from fedseg3d.data.realdata_sites import SITES, SiteRecipe, build_site, consortium_classes
from fedseg3d.data.source_archive import PinnedArchive, extract_tree, fetch, read_text

TOTALSEGMENTATOR = PinnedArchive(
    name="totalsegmentator",
    version="2.18.0",
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
)
REFERENCE_FILES = "tests/reference_files"
CLASS_MAP_FILE = "totalsegmentator/map_to_binary.py"
LICENSE_FILE = "LICENSE"
DEFAULT_CLASSES = ("spleen", "liver", "stomach", "pancreas")
GENERATOR = "fedseg3d.data.realdata"


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/fedseg3d`` (or ``~/.cache/fedseg3d``): where the archive is kept between builds."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedseg3d"


def read_class_maps(archive: Path, pin: PinnedArchive) -> dict[str, dict[int, str]]:
    """TotalSegmentator's label IDs per task (``total`` for CT, ``total_mr`` for MR), read from the archive itself
    (the ``class_map`` literal of ``map_to_binary.py``) rather than copied into this code.

    Raises:
        DataError: the file has no ``class_map`` literal.
    """
    tree = ast.parse(read_text(archive, pin, CLASS_MAP_FILE))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise DataError(archive, f"{CLASS_MAP_FILE} has no class_map literal")


def parse_classes(classes: Sequence[str]) -> dict[str, str]:
    """Consortium class name -> TotalSegmentator structure, from ``liver`` or ``organ=liver`` entries.

    Raises:
        ValueError: no class, an empty name, a repeated name, or ``background`` (always class 0).
    """
    sources: dict[str, str] = {}
    for entry in classes:
        name, _, source = (part.strip() for part in entry.partition("="))
        source = source or name
        if not name or not source or name in sources or name == "background":
            raise ValueError(f"classes must be distinct names or name=structure, not background; got {list(classes)}")
        sources[name] = source
    if not sources:
        raise ValueError("classes is empty: give at least one foreground class")
    return sources


@dataclass(frozen=True)
class BuildResult:
    """What ``build_sites`` wrote: the site folders, the archive it used and how long it took."""

    site_dirs: list[Path]
    archive: Path
    seconds: float


def _prepare_out(out_dir: Path) -> None:
    """Refuse to overwrite a folder this builder did not write (it replaces its own sites)."""
    marker = out_dir / "sites.json"
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            ours = json.loads(marker.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(out_dir, f"output folder is not empty and was not written by {GENERATOR}")


def build_sites(
    out_dir: Path,
    cache_dir: Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    sites: Sequence[SiteRecipe] = SITES,
    pin: PinnedArchive = TOTALSEGMENTATOR,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Fetch (or reuse) the pinned archive and write one folder per site plus ``sites.json``.

    Args:
        out_dir: parent folder of the sites (``--sites-root`` of the simulator).
        cache_dir: where the archive is downloaded once and reused.
        classes: the consortium's foreground classes in order (background is class 0): TotalSegmentator names
            (``liver``), or ``name=structure`` to give a structure the consortium's own name (``organ=liver``).
        sites: the site recipes to build.
        pin: the archive (tests pass a locally made one).
        progress: called with one line per step.

    Raises:
        DataError: hash mismatch, a class no site task knows, a slab outside a volume, a validation slab without
            any consortium class, or an output folder this builder did not write.
    """
    started = time.perf_counter()
    say = progress or (lambda _line: None)
    sources = parse_classes(classes)
    out_dir = Path(out_dir)
    _prepare_out(out_dir)
    archive = fetch(pin, Path(cache_dir))
    say(f"archive {archive} (sha256 {pin.sha256})")
    class_maps = read_class_maps(archive, pin)
    consortium = consortium_classes(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    site_dirs, summaries = [], []
    with tempfile.TemporaryDirectory(prefix="fedseg3d-realdata-") as tmp:
        reference = Path(tmp) / "reference_files"
        extract_tree(archive, pin, REFERENCE_FILES, reference)
        for recipe in sites:
            site_dir, summary = build_site(recipe, reference, out_dir, sources, class_maps)
            site_dirs.append(site_dir)
            summaries.append(summary)
            say(f"{recipe.name}: {recipe.scanner} -> {site_dir}")
    (out_dir / "SOURCE_LICENSE").write_text(read_text(archive, pin, LICENSE_FILE))
    sites_json = {
        "generator": GENERATOR,
        "source": {"package": pin.name, "version": pin.version, "sha256": pin.sha256, "files": REFERENCE_FILES},
        "labels_by": "TotalSegmentator model predictions (silver standard), not manual annotation",
        "classes": consortium,
        "class_sources": sources,
        "sites": summaries,
    }
    (out_dir / "sites.json").write_text(json.dumps(sites_json, indent=2) + "\n")
    return BuildResult(site_dirs=site_dirs, archive=archive, seconds=time.perf_counter() - started)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="archive cache (default: %(default)s)")
    parser.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        help="consortium foreground classes in order, comma-separated: TotalSegmentator names, or name=structure "
        "to use the consortium's own name (e.g. organ=liver); default: %(default)s",
    )
    parser.add_argument(
        "--sites", default=",".join(r.name for r in SITES), help="sites to build (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    by_name = {r.name: r for r in SITES}
    unknown = [s for s in args.sites.split(",") if s not in by_name]
    if unknown:
        parser.error(f"unknown site(s) {unknown}; known: {sorted(by_name)}")
    result = build_sites(
        args.out,
        args.cache,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        sites=[by_name[s] for s in args.sites.split(",")],
        progress=print,
    )
    print(f"built {len(result.site_dirs)} site(s) in {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
