"""Every top-level variable of every job is described in docs/job_knobs.md, so no knob exists only in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KNOBS_DOC = REPO / "docs" / "job_knobs.md"
JOBS = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())


def top_level_variables(job: Path) -> set[str]:
    names: set[str] = set()
    for config in (job / "app" / "config").glob("config_fed_*.json"):
        data = json.loads(config.read_text())
        names.update(k for k, v in data.items() if not isinstance(v, list | dict) and k != "format_version")
    return names


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_knob_of_the_job_is_documented(job: Path):
    doc = KNOBS_DOC.read_text()
    missing = sorted(name for name in top_level_variables(job) if f"`{name}`" not in doc)
    assert not missing, f"{job.name}: knobs {missing} are not described in {KNOBS_DOC.relative_to(REPO)}"
