"""The table ``fedseg3d predict`` prints at the end of a run: one row per study, volumes in mL per class."""

from __future__ import annotations


def format_table(summaries: list[dict], classes: list[str]) -> str:
    """Study, kind, shape, one mL column per foreground class, seconds and device."""
    header = ["study", "kind", "shape", *(f"{name} mL" for name in classes), "seconds", "device"]
    rows = [
        [
            s["study"],
            s["kind"],
            "x".join(str(v) for v in s["shape"]),
            *(f"{s['volumes_ml'].get(name, 0.0):.1f}" for name in classes),
            f"{s['seconds']:.1f}",
            s["device"],
        ]
        for s in summaries
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)
