"""Which machine a benchmark figure comes from: figures compare only with figures from the same kind of machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil


def machine_info() -> dict[str, Any]:
    """CPU model and cores, RAM, GPU (or ``none``), Python and torch versions."""
    import torch  # noqa: PLC0415  (heavy import, only needed here)

    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def describe(info: dict[str, Any]) -> str:
    """One line for a report header."""
    gpu = "no GPU" if info["gpu"] == "none" else info["gpu"]
    return (
        f"{info['cpu_cores']} CPU cores ({info['cpu']}), {info['ram_gib']} GiB RAM, {gpu}; "
        f"Python {info['python']}, torch {info['torch']}"
    )
