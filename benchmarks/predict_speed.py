"""Wall time and peak memory of ``fedseg3d predict`` per volume: the real-data scans and a CT-sized volume.

Each (preset, volume) runs ``fedseg3d predict`` in a fresh worker process, so the peak resident memory (RSS, polled
with psutil every 20 ms, the process's own and its children's) belongs to that one volume and includes torch, the
read scan, the resampled copy, the logits and the writers; on a GPU the worker also reports torch's CUDA peak. The
time is the one ``predict`` records in the study's summary (read, preprocess, sliding window, back to the source
grid, NIfTI and DICOM SEG written); the process time adds Python's start, the imports and the model load, and the
process CPU time (user + system, all threads) is the least sensitive to other load on the machine. The network is
freshly initialised (weights do not change the cost) with the stock jobs' preprocessing (2 mm voxels, 32^3 windows,
overlap 0.25) and each real site's own intensity handling.

Volumes: every image of ``--real`` (``fedseg3d data real --out data/real``), and a synthetic CT of
512 x 512 x 300 voxels of 0.8 x 0.8 x 1.5 mm (a body of soft tissue with organs), written once as NIfTI.

Usage:
    nice -n 10 python benchmarks/predict_speed.py [--real data/real] [--presets unet3d_tiny,unet3d_base]
        [--device cpu] [--work workspace/bench_predict] [--json out.json]

Prints a Markdown table (and writes ``--json`` when given). Needs ``psutil``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import describe, machine_info  # noqa: E402

CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.8, 0.8, 1.5)
POLL_S = 0.02


def write_ct_volume(path: Path, shape=CT_SHAPE, spacing=CT_SPACING, seed: int = 0) -> Path:
    """A CT-like int16 volume: air, an elliptic body of soft tissue with noise, and a few brighter organs."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[body] = 40
    for cx, cy, r, hu in ((0.3, 0.1, 0.2, 60), (-0.35, 0.05, 0.12, 50), (0.0, -0.3, 0.1, 200)):
        volume[((x - cx) ** 2 + (y - cy) ** 2 < r**2)] = hu
    volume += rng.normal(0, 20, size=shape).astype(np.int16) * body[..., None]
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def volumes(real: Path, work: Path) -> list[tuple[str, Path, str]]:
    """(name, path, site) of each real image and of the CT-sized volume (site '' for the synthetic one)."""
    found = []
    for site_dir in sorted(p for p in real.glob("site-*") if p.is_dir()):
        for image in sorted((site_dir / "imagesTr").iterdir()):
            found.append((f"{site_dir.name}/{image.name}", image, site_dir.name))
    found.append(("CT 512x512x300", write_ct_volume(work / "ct_512x512x300.nii"), ""))
    return found


def write_model(folder: Path, preset: str, real: Path, site: str) -> Path:
    """A site_models folder with a fresh ``preset`` network and the stock preprocessing (the site's intensity)."""
    import torch

    from fedseg3d.data.site_config import SiteConfig
    from fedseg3d.data.transforms import PreprocessConfig
    from fedseg3d.models.presets import build_model
    from fedseg3d.training.site_models import SiteModelStore, model_recipe

    classes = {int(k): v for k, v in json.loads((real / "sites.json").read_text())["classes"].items()}
    prep = PreprocessConfig(intensity_mode="ct_window")
    if site:
        prep = SiteConfig.from_file(real / site / "site.json").preprocessing_for(prep)
    torch.manual_seed(0)
    model = build_model(preset, out_channels=len(classes))
    recipe = model_recipe(preset, classes, prep.for_classes(classes), "benchmark", site or "ct")
    SiteModelStore(site or "ct", folder, recipe).offer_local(model, 0.0, 0)
    return folder


def worker(args: argparse.Namespace) -> None:
    """Run ``fedseg3d predict`` on one volume in this process and print its time and CUDA peak as JSON."""
    import torch

    from fedseg3d.inference.predict import main as predict

    argv = ["--model", args.model, "--input", args.input, "--out", args.out, "--device", args.device, "--overwrite"]
    code = predict(argv)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    summary = json.loads((Path(args.out) / "summary.json").read_text())["studies"][0] if code == 0 else {}
    result = {"code": code, "cuda_peak_mib": cuda_peak}
    print("RESULT " + json.dumps({**result, "predict_s": summary.get("seconds"), "shape": summary.get("shape")}))


def measure(model: Path, image: Path, out: Path, device: str) -> dict:
    """One worker process: its result and the peak RSS seen while it ran."""
    command = [sys.executable, __file__, "--worker", "--model", str(model), "--input", str(image)]
    command += ["--out", str(out), "--device", device]
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):  # the process ended between poll and read
            peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        time.sleep(POLL_S)
    output = child.stdout.read()
    cpu_s = _children_cpu_s() - cpu_before
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else {"code": child.returncode}
    return {**result, "process_s": time.perf_counter() - started, "cpu_s": cpu_s, "peak_rss_mib": peak / 2**20}


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes: less sensitive than wall time to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | volume | voxels | predict s | process s | process CPU s | peak RSS MiB | CUDA peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = "x".join(str(v) for v in r.get("shape") or []) or "failed"
        cuda = f"{r['cuda_peak_mib']:.0f}" if r.get("cuda_peak_mib") is not None else "-"
        predict_s = f"{r['predict_s']:.1f}" if r.get("predict_s") is not None else "-"
        lines.append(
            f"| {r['preset']} | {r['volume']} | {shape} | {predict_s} | {r['process_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {cuda} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=REPO / "data" / "real")
    parser.add_argument("--presets", default="unet3d_tiny,unet3d_base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=REPO / "workspace" / "bench_predict")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-ct", action="store_true", help="only the real-data scans")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (args.real / "sites.json").is_file():
        parser.error(f"{args.real}: no real data; run `fedseg3d data real --out {args.real}` first")
    rows = []
    for preset in args.presets.split(","):
        for name, image, site in volumes(args.real, args.work):
            if args.skip_ct and not site:
                continue
            model = write_model(args.work / "models" / preset / (site or "ct") / "site_models", preset, args.real, site)
            result = measure(model, image, args.work / "out" / preset, args.device)
            rows.append({"preset": preset, "volume": name, **result})
            print(f"{preset} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    print(f"Machine: {describe(machine_info())}; device {args.device}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
