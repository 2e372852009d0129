"""Run a built job in the FLARE simulator, the way FLARE's own ``SimEnv`` does (a ``simulator`` subprocess).

Usage:
    python -m fedseg3d.tools.simulate build/jobs/unet3d_fedbn --sites-root data/synthetic --sites site-1,site-2 \
        --workspace workspace/sim

The sites find their data through ``FEDSEG3D_SITES_ROOT`` (``<root>/<site>/site.json``), since simulated sites have
no ``local/`` folder of their own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fedseg3d.data.site_config import SITES_ROOT_ENV


def simulator_command(job_dir: Path, workspace: Path, sites: list[str], threads: int) -> list[str]:
    return [
        sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(job_dir),
        "-w", str(workspace), "-c", ",".join(sites), "-t", str(threads),
    ]  # fmt: skip


def run_simulation(
    job_dir: Path,
    workspace: Path,
    sites_root: Path,
    sites: list[str],
    threads: int | None = None,
    timeout: float | None = None,
) -> int:
    """Run the simulator to completion and return its exit code (0 when the job finished)."""
    env = dict(os.environ, **{SITES_ROOT_ENV: str(Path(sites_root).resolve())})
    command = simulator_command(job_dir.resolve(), workspace.resolve(), sites, threads or len(sites))
    completed = subprocess.run(command, env=env, timeout=timeout, check=False)
    return completed.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--sites-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--sites", default="site-1,site-2", help="comma-separated site names")
    parser.add_argument("--workspace", type=Path, default=Path("workspace/sim"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    code = run_simulation(args.job_dir, args.workspace, args.sites_root, args.sites.split(","), args.threads)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
