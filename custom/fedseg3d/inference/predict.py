"""Segment patients' scans with the model a site deploys: label maps in each scan's own geometry, DICOM SEG for DICOM.

Input: a NIfTI file, a DICOM series folder, or a folder of several studies (each NIfTI file and each folder of
DICOM files below it is one study). The model: a finished job's site_models folder, the site's job folder, a
simulator/POC workspace (with --site), or an exported MONAI bundle. The model is applied with the preprocessing the
site trained with (recorded next to the weights) and MONAI's sliding window over the training ROI.

Writes, for each study, OUT/<study>/:
  labels.nii.gz   uint8 label map on the scan's own voxel grid, with the scan's affine
  seg.dcm         (DICOM input) a DICOM Segmentation referencing the source series, one segment per class
  summary.json    volume in mL per class, model and provenance, time, device
and OUT/summary.json for the run. Outputs appear only when complete: a study that cannot be read is reported,
skipped and leaves nothing; the exit status is then 1.

Examples:
  fedseg3d predict --model workspace/sim/unet3d_fedbn --site site-2 --input scans/ --out predictions/
  fedseg3d predict --model bundle/ --input ct_series/ --out predictions/ --device cuda --classes spleen,liver
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.loading import load_deployable
from fedseg3d.inference.run_study import SUMMARY_FILE, PredictSettings, check_output_free, segment_study
from fedseg3d.inference.seg_writer import SEG_TYPES
from fedseg3d.inference.studies import Study, find_studies
from fedseg3d.inference.summary import format_table
from fedseg3d.training.device import resolve_device


class ClassMismatchError(ValueError):
    """The model's classes are not the ones the user asked for."""


def check_classes(model: DeployableModel, expected: list[str] | None, source: Path) -> None:
    """The user's expected classes (background optional) must be the model's, in order: label values depend on it.

    Raises:
        ClassMismatchError: naming the model and both lists.
    """
    if not expected:
        return
    names = [model.class_names[i] for i in sorted(model.class_names)]
    if expected not in (names, names[1:]):
        raise ClassMismatchError(
            f"{source}: the model's classes are {names[1:]} (background first: {names}), but --classes asks for "
            f"{expected}; label values would mean different organs"
        )


def model_summary(model: DeployableModel, source: Path) -> dict[str, Any]:
    return {
        "path": str(Path(source).resolve()),
        "preset": model.model_preset,
        "class_names": [model.class_names[i] for i in sorted(model.class_names)],
        "temperature": model.temperature,
        "provenance": model.provenance,
    }


def predict_studies(
    studies: list[Study], model: DeployableModel, out_dir: Path, settings: PredictSettings, model_info: dict
) -> tuple[list[dict], list[dict]]:
    """Segment each study, printing a progress line; a failure is reported and the next study runs.

    Returns:
        The summaries of the studies done and ``{"study", "input", "error"}`` for the ones that failed.
    """
    done, failed = [], []
    for number, study in enumerate(studies, start=1):
        prefix = f"[{number}/{len(studies)}] {study.study_id}"
        try:
            summary = segment_study(study, model, out_dir, settings, model_info)
        except (ValueError, OSError, RuntimeError) as err:  # DataError, the writers' refusals, torch's out of memory
            message = str(err) if str(study.path) in str(err) else f"{study.path}: {err}"
            print(f"{prefix}: FAILED, nothing written: {message}", file=sys.stderr, flush=True)
            failed.append({"study": study.study_id, "input": str(study.path), "error": message})
            continue
        volumes = ", ".join(f"{name} {ml:.1f} mL" for name, ml in summary["volumes_ml"].items())
        print(f"{prefix}: {summary['seconds']:.1f} s on {settings.device}: {volumes}", flush=True)
        done.append(summary)
    return done, failed


def _version() -> str:
    try:
        return f"fedseg3d {importlib.metadata.version('fedseg3d')}"
    except importlib.metadata.PackageNotFoundError:
        return "fedseg3d"


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="site_models folder, job folder, workspace or bundle")
    parser.add_argument("--site", default=None, help="which site's model, when --model holds several")
    parser.add_argument("--which", default="best_model.pt", help="file in site_models (default: the site's choice)")
    parser.add_argument(
        "--input", type=Path, required=True, help="NIfTI file, DICOM series folder or folder of studies"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per study)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, or cuda[:N]")
    parser.add_argument("--classes", default=None, help="comma-separated classes you expect, checked against the model")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, 0 to <1 (default 0.25)")
    parser.add_argument("--seg-type", choices=SEG_TYPES, default="binary", help="DICOM SEG kind (binary: most viewers)")
    parser.add_argument("--no-amp", action="store_true", help="full precision on CUDA (mixed precision by default)")
    parser.add_argument("--overwrite", action="store_true", help="replace a study's existing outputs")
    args = parser.parse_args(argv)
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``fedseg3d predict``; returns 0 when every study was segmented, 1 when one failed, 2 on a setup error."""
    args = parse_args(argv, prog)
    name = prog or "fedseg3d predict"
    expected = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:  # everything that makes the whole run impossible fails here, before anything is written
        device = resolve_device(args.device)
        studies, ignored = find_studies(args.input)
        model = load_deployable(args.model, args.site, args.which)
        check_classes(model, expected, args.model)
        for study in studies:
            check_output_free(args.out, study, args.overwrite)
    except (ValueError, OSError) as err:  # DataError, ModelLoadError and ClassMismatchError are ValueErrors
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    for path in ignored:
        print(f"ignored {path}: not a NIfTI file, nor in a DICOM series folder", file=sys.stderr)
    settings = PredictSettings(
        device=device,
        overlap=args.overlap,
        amp=not args.no_amp,
        seg_type=args.seg_type,
        overwrite=args.overwrite,
        software_version=_version(),
    )
    info = model_summary(model, args.model)
    print(f"model: {info['path']} ({model.model_preset}, classes {info['class_names'][1:]}); {len(studies)} study(ies)")
    started = time.perf_counter()
    done, failed = predict_studies(studies, model, args.out, settings, info)
    if done:
        run = {"model": info, "device": str(device), "seconds": round(time.perf_counter() - started, 2)}
        run |= {"studies": done, "failed": failed}
        (args.out / SUMMARY_FILE).write_text(json.dumps(run, indent=2) + "\n")
        print(format_table(done, [info["class_names"][i] for i in range(1, len(info["class_names"]))]))
    print(f"{len(done)} done, {len(failed)} failed; outputs in {args.out}", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
