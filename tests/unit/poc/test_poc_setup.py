"""POC as a user expects it: the kits' resources (a job folder without code runs), the record `fedseg3d poc stop`
reads, and what `--keep-running` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg3d.deploy import kits
from fedseg3d.poc.control import STATE_FILE, layout_of, load_layout, nvflare, save_layout
from fedseg3d.poc.runner import POLICIES_DIR, PROJECT_FILE, install_production_resources


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """A real `nvflare poc prepare` of the project (no process started, no port bound)."""
    layout = load_layout(tmp_path_factory.mktemp("poc") / "poc")
    nvflare(["poc", "prepare", "-i", str(PROJECT_FILE.resolve()), "--force"], layout.workspace)
    return layout


def test_every_participant_gets_the_kits_resources_and_allow_list(prepared):
    install_production_resources(prepared)
    for name, kind in [("server", "server"), *((site, "site") for site in prepared.site_names)]:
        kit = prepared.prod_dir / name
        resources = json.loads((kit / "local" / "resources.json").read_text())
        template = json.loads((POLICIES_DIR / kind / "resources.json").read_text().replace("@WORKSPACE@", str(kit)))
        assert resources == template
        assert "fedseg3d." in resources["class_allow_list"]
        assert kits.WORKSPACE_PLACEHOLDER not in json.dumps(resources)


def test_a_template_without_an_allow_list_is_refused_naming_the_file(prepared, tmp_path):
    for kind in ("server", "site"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "resources.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ValueError, match=r"server/resources\.json: field 'class_allow_list'"):
        install_production_resources(prepared, tmp_path)


def test_the_recorded_layout_is_what_poc_stop_reads(prepared):
    path = save_layout(prepared)
    assert path.name == STATE_FILE
    recorded = layout_of(prepared.workspace)
    assert (recorded.workspace, recorded.port, recorded.site_names) == (
        prepared.workspace,
        prepared.port,
        prepared.site_names,
    )


def test_stop_without_a_recorded_poc_names_the_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        layout_of(tmp_path)


def test_keep_running_names_the_console_a_plain_job_and_the_stop_command(prepared):
    from fedseg3d.poc.runner import console_instructions

    text = console_instructions(prepared, Path("jobs") / "unet3d_fedbn")
    console = prepared.admin_kit() / "startup" / "fl_admin.sh"
    assert console.is_file() and str(console) in text
    assert f"submit_job {(Path('jobs') / 'unet3d_fedbn').resolve()}" in text
    assert f"fedseg3d poc stop --workspace {prepared.workspace}" in text
