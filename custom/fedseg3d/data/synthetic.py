"""Synthetic multi-site 3D segmentation data with scanner-like feature shift between sites.

Federated learning matters when sites differ, so each synthetic "hospital" has its own scanner: voxel spacing,
orientation, intensity scale and offset, contrast (gamma), noise, a smooth bias field and, most importantly,
lesion polarity (brighter than the organ at some sites, darker at others, like different MR sequences). A model
trained on one site transfers worse to the others, which is what FedAvg/FedBN experiments need to show.

Anatomy is drawn in world (RAS mm) coordinates and then sampled on each site's voxel grid, so orientation and
spacing change the arrays but never the patient: labels stay exact for any affine. Everything is a function of
the seed, site index and case index, so runs are reproducible and cases can be generated in any order.

Writes ``<out>/<site>/`` per hospital: NIfTI (or DICOM) images and labels, ``datalist.json`` (training and
validation cases) and ``site.json`` (labels, intensity); ``<out>/dataset.json`` describes the whole set.

Example::

    fedseg3d data synthetic --out data/synthetic --sites 4 --seed 0 [--fov-mm 64] [--cases-scale 1.0]
        [--dicom-sites site-2] [--val-cases N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from fedseg3d.data.dicom import write_dicom_series

LABELS = {"0": "background", "1": "organ", "2": "lesion"}
MIN_FOV_MM = 20.0  # below this the coarsest site has too few voxels across an organ for a lesion to fit

# Geometry cycles through these tables by site index, so any run with >= 2 sites has anisotropic and non-RAS
# sites and the same site always has the same grid, whatever the seed.
_SPACINGS = ((1.0, 1.0, 2.0), (1.5, 1.5, 1.5), (2.0, 2.0, 1.0), (1.25, 1.25, 2.5))
_ORIENTATIONS = ("RAS", "LPS", "LAS", "PIR")
_AXIS_OF_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}

# Canonical tissue levels in [0, 1] before the scanner transform. Lesion levels sit on either side of the organ.
_BACKGROUND, _ORGAN, _LESION_BRIGHT, _LESION_DARK = 0.15, 0.55, 0.9, 0.25


@dataclass(frozen=True)
class ScannerProfile:
    """One site's acquisition: what differs between hospitals while the anatomy follows the same distribution."""

    site_name: str
    spacing: tuple[float, float, float]  # mm per voxel along i, j, k
    orientation: str  # axis codes of i, j, k, e.g. "RAS" or "PIR"
    intensity_scale: float  # arbitrary MR-like units per canonical unit
    intensity_offset: float
    gamma: float  # contrast: canonical values in [0, 1] are raised to this power
    noise_std: float  # canonical units, added after the bias field
    bias_strength: float  # amplitude of the smooth multiplicative bias field (log scale)
    lesion_polarity: str  # "bright" or "dark" relative to the organ
    n_train: int
    n_val: int


def make_profile(site_index: int, seed: int, cases_scale: float = 1.0, val_cases: int | None = None) -> ScannerProfile:
    """Derive site ``site_index`` (0-based) from the seed: geometry from fixed tables, the rest drawn at random.

    Polarity alternates by index (site-1 bright, site-2 dark, ...) so that any two sites already disagree on it.
    ``val_cases`` sets the validation cases directly (a benchmark that needs a finer yardstick), else
    ``cases_scale`` scales them with the training cases.
    """
    rng = np.random.default_rng([seed, site_index, 0])
    return ScannerProfile(
        site_name=f"site-{site_index + 1}",
        spacing=_SPACINGS[site_index % len(_SPACINGS)],
        orientation=_ORIENTATIONS[site_index % len(_ORIENTATIONS)],
        intensity_scale=round(float(rng.uniform(200.0, 2000.0)), 1),
        intensity_offset=round(float(rng.uniform(0.0, 100.0)), 1),
        gamma=round(float(rng.uniform(0.7, 1.5)), 3),
        noise_std=round(float(rng.uniform(0.02, 0.05)), 4),
        bias_strength=round(float(rng.uniform(0.05, 0.25)), 3),
        lesion_polarity="bright" if site_index % 2 == 0 else "dark",
        n_train=max(2, round(int(rng.integers(8, 17)) * cases_scale)),
        n_val=val_cases if val_cases is not None else max(2, round(4 * cases_scale)),
    )


def grid_affine(orientation: str, spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-RAS affine for the given axis codes and spacing, with the grid centred on the world origin."""
    if sorted(_AXIS_OF_CODE[c][0] for c in orientation) != [0, 1, 2]:
        raise ValueError(f"orientation must name each of the three world axes once, got {orientation!r}")
    affine = np.eye(4)
    for axis, code in enumerate(orientation):
        world, sign = _AXIS_OF_CODE[code]
        affine[:3, axis] = 0.0
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _ellipsoid(world: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid; ``world`` is (3, ...) RAS mm."""
    column = (3,) + (1,) * (world.ndim - 1)
    local = np.tensordot(rotation.T, world - centre.reshape(column), axes=1)
    return ((local / radii.reshape(column)) ** 2).sum(axis=0) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth random field; sigma is in mm so texture looks the same on every grid."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma_mm / spacing, mode="reflect")
    return field / max(float(field.std()), 1e-8)


def _anatomy(rng: np.random.Generator, world: np.ndarray, fov_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Label map: an organ ellipsoid well inside the FOV and one lesion ellipsoid entirely inside the organ."""
    organ_radii = rng.uniform(0.2, 0.3, size=3) * fov_mm
    organ_centre = rng.uniform(-0.1, 0.1, size=3) * fov_mm  # centre + radius stays >= 0.1 fov from the edge
    organ_rot = Rotation.random(random_state=rng).as_matrix()

    # Every lesion radius is at least half a voxel diagonal, so the voxel nearest the lesion centre is always
    # inside it: the lesion never vanishes on coarse grids. A ball of radius `outer` around the centre contains
    # the lesion, and |u0| + outer / r_min <= 1 keeps that ball inside the organ.
    half_diag = 0.5 * float(np.linalg.norm(spacing))
    r_min = float(organ_radii.min())
    outer = max(rng.uniform(0.35, 0.55) * r_min, half_diag / 0.7)
    if outer > 0.8 * r_min:
        raise ValueError(f"fov_mm={fov_mm} is too small for spacing {tuple(spacing)}: the lesion cannot fit")
    lesion_radii = outer * rng.uniform(0.7, 1.0, size=3)
    direction = rng.standard_normal(3)
    u0 = direction / np.linalg.norm(direction) * rng.uniform(0.0, 1.0 - outer / r_min)
    lesion_centre = organ_centre + organ_rot @ (u0 * organ_radii)
    lesion_rot = Rotation.random(random_state=rng).as_matrix()

    label = np.zeros(world.shape[1:], dtype=np.uint8)
    organ = _ellipsoid(world, organ_centre, organ_radii, organ_rot)
    label[organ] = 1
    label[_ellipsoid(world, lesion_centre, lesion_radii, lesion_rot) & organ] = 2
    return label


def generate_case(
    profile: ScannerProfile, rng: np.random.Generator, fov_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case on the site's grid.

    Returns:
        ``(image float32, label uint8, affine)``; the image is in the site's scanner units.
    """
    spacing = np.asarray(profile.spacing, dtype=np.float64)
    shape = tuple(int(round(fov_mm / s)) for s in spacing)
    affine = grid_affine(profile.orientation, spacing, shape)
    index = np.indices(shape, dtype=np.float64)
    world = np.tensordot(affine[:3, :3], index, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)

    label = _anatomy(rng, world, fov_mm, spacing)
    lesion_level = _LESION_BRIGHT if profile.lesion_polarity == "bright" else _LESION_DARK
    levels = np.array([_BACKGROUND, _ORGAN, lesion_level]) + rng.uniform(-0.03, 0.03, size=3)  # biology varies
    texture = _smooth_noise(rng, shape, spacing, sigma_mm=4.0)
    canonical = levels[label] + np.where(label == 0, 0.05, 0.02) * texture
    canonical = gaussian_filter(canonical, sigma=0.6 / spacing)  # partial volume at tissue borders
    canonical = np.clip(canonical, 0.0, 1.0) ** profile.gamma

    # Bias field: smooth in world space (a gradient plus a radial term), so it is the same coil on every grid.
    half = fov_mm / 2.0
    gradient = rng.standard_normal(3)
    gradient /= np.linalg.norm(gradient)
    radial = (world**2).sum(axis=0) / (3 * half**2) - 1.0 / 3.0
    log_bias = np.tensordot(gradient, world / half, axes=1) + rng.uniform(-1.0, 1.0) * radial
    signal = canonical * np.exp(profile.bias_strength * log_bias)
    signal = signal + rng.normal(0.0, profile.noise_std, size=shape)
    image = np.maximum(profile.intensity_offset + profile.intensity_scale * signal, 0.0)  # magnitude images
    return image.astype(np.float32), label, affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _prepare_site_dir(site_dir: Path) -> None:
    """Replace a folder this generator wrote earlier; never delete anything else."""
    if site_dir.exists():
        if (site_dir / "site.json").is_file():
            shutil.rmtree(site_dir)
        elif any(site_dir.iterdir()):
            raise FileExistsError(f"{site_dir}: folder exists, is not empty and has no site.json; not overwriting")
    (site_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (site_dir / "labelsTr").mkdir(parents=True, exist_ok=True)


def generate_site(
    out_dir: Path,
    site_index: int,
    *,
    seed: int,
    fov_mm: float,
    cases_scale: float,
    dicom: bool,
    val_cases: int | None = None,
) -> tuple[Path, ScannerProfile]:
    """Write one site's images, labels, ``datalist.json`` and ``site.json`` under ``out_dir/<site>``."""
    profile = make_profile(site_index, seed, cases_scale, val_cases)
    site_dir = Path(out_dir) / profile.site_name
    _prepare_site_dir(site_dir)
    entries = []
    for case_index in range(profile.n_train + profile.n_val):
        case = f"case_{case_index:03d}"
        image, label, affine = generate_case(profile, np.random.default_rng([seed, site_index, 1, case_index]), fov_mm)
        if dicom:
            image_rel = f"imagesTr/{case}"
            uid = pydicom.uid.generate_uid(entropy_srcs=["fedseg3d.synthetic", str(seed), profile.site_name, case])
            write_dicom_series(
                image, affine, site_dir / image_rel, series_uid=uid, patient_id=f"{profile.site_name}-{case}"
            )
        else:
            image_rel = f"imagesTr/{case}.nii.gz"
            _save_nifti(image, affine, site_dir / image_rel)
        label_rel = f"labelsTr/{case}.nii.gz"
        _save_nifti(label, affine, site_dir / label_rel)
        entries.append({"image": image_rel, "label": label_rel})

    datalist = {
        "name": f"fedseg3d synthetic {profile.site_name}",
        "labels": LABELS,
        "modality": {"0": "MR"},
        "training": entries[: profile.n_train],
        "validation": entries[profile.n_train :],
    }
    # One torch thread per site: in the simulator all sites share one process, in POC they share the cores.
    site = {
        "site_name": profile.site_name,
        "data_root": ".",
        "datalist": "datalist.json",
        "num_threads": 1,
        "scanner": asdict(profile),
    }
    (site_dir / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
    (site_dir / "site.json").write_text(json.dumps(site, indent=2) + "\n")
    return site_dir, profile


def generate_sites(
    out_dir: Path,
    n_sites: int = 4,
    seed: int = 0,
    fov_mm: float = 64.0,
    cases_scale: float = 1.0,
    dicom_sites: Sequence[str] = ("site-2",),
    progress: Callable[[str], None] | None = None,
    val_cases: int | None = None,
) -> list[Path]:
    """Generate ``n_sites`` synthetic sites (``site-1`` ... ``site-N``) and ``out_dir/sites.json``.

    Args:
        out_dir: parent folder; each site gets its own sub-folder, replaced if this generator wrote it before.
        n_sites: number of sites.
        seed: the only source of randomness; the same arguments write the same data.
        fov_mm: side of the imaged cube in mm; volume shape is ``round(fov_mm / spacing)`` per axis.
        cases_scale: multiplies each site's case count (at least 2 training and 2 validation cases remain).
        dicom_sites: sites whose images are written as DICOM series folders instead of NIfTI.
        progress: called with one line per finished site (the CLI prints it).
        val_cases: validation cases per site, instead of ``cases_scale``'s (training cases are unchanged).

    Returns:
        The site folders, in site order.

    Raises:
        ValueError: an argument is out of range or ``dicom_sites`` names a site that is not generated.
        FileExistsError: a site folder exists, is not empty and was not written by this generator.
    """
    names = [f"site-{i + 1}" for i in range(n_sites)]
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if fov_mm < MIN_FOV_MM:
        raise ValueError(f"fov_mm must be >= {MIN_FOV_MM}, got {fov_mm}")
    if cases_scale <= 0:
        raise ValueError(f"cases_scale must be > 0, got {cases_scale}")
    if val_cases is not None and val_cases < 1:
        raise ValueError(f"val_cases must be >= 1, got {val_cases}")
    unknown = sorted(set(dicom_sites) - set(names))
    if unknown:
        raise ValueError(f"dicom_sites names sites that are not generated: {unknown}; sites are {names}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    site_dirs, summary = [], []
    for index, name in enumerate(names):
        dicom = name in dicom_sites
        site_dir, p = generate_site(
            out_dir, index, seed=seed, fov_mm=fov_mm, cases_scale=cases_scale, dicom=dicom, val_cases=val_cases
        )
        site_dirs.append(site_dir)
        fmt = "dicom" if dicom else "nifti"
        summary.append({"site_name": name, "site_config": f"{name}/site.json", "image_format": fmt})
        if progress is not None:
            progress(
                f"{name}: {p.n_train} train + {p.n_val} val, spacing {p.spacing} mm, {p.orientation}, "
                f"lesion {p.lesion_polarity}, {fmt} -> {site_dir}"
            )
    params = {"n_sites": n_sites, "seed": seed, "fov_mm": fov_mm, "cases_scale": cases_scale, "val_cases": val_cases}
    sites_json = {
        "generator": "fedseg3d.data.synthetic",
        **params,
        "dicom_sites": sorted(dicom_sites),
        "sites": summary,
    }
    (out_dir / "sites.json").write_text(json.dumps(sites_json, indent=2) + "\n")
    return site_dirs


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    parser.add_argument("--sites", type=int, default=4, help="number of sites")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fov-mm", type=float, default=64.0, help="side of the imaged cube in mm")
    parser.add_argument("--cases-scale", type=float, default=1.0, help="multiplies the number of cases per site")
    parser.add_argument("--val-cases", type=int, default=None, help="validation cases per site (default: scaled)")
    parser.add_argument(
        "--dicom-sites", nargs="*", default=["site-2"], help="sites written as DICOM series (none: pass no names)"
    )
    args = parser.parse_args(argv)
    generate_sites(
        args.out,
        n_sites=args.sites,
        seed=args.seed,
        fov_mm=args.fov_mm,
        cases_scale=args.cases_scale,
        dicom_sites=tuple(args.dicom_sites),
        progress=print,
        val_cases=args.val_cases,
    )


if __name__ == "__main__":
    main()
