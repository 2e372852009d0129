"""The POC runner's fallback readiness check reads site registration from the server's log (FLARE 2.9's format)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from fedseg3d.poc.control import load_layout
from fedseg3d.poc.runner import registered_sites

LOG = """\
2026-11-23 14:35:03,263 - Cell - INFO - Register blob CB for channel='aux_communication', topic='*'
2026-11-23 14:35:04,668 - FederatedServer - INFO - client site-2 registered with site_config keys: ['x']
2026-11-23 14:35:07,524 - FederatedServer - INFO - client site-1 registered with site_config keys: ['x']
2026-11-23 14:36:00,000 - FederatedServer - INFO - client site-1 registered with site_config keys: ['x']
2026-11-23 14:37:29,906 - ClientManager - INFO - Client: New admin admin@consortium.org joined.
"""


def test_registered_sites_are_read_with_their_first_registration_time(tmp_path: Path):
    layout = load_layout(tmp_path / "poc")
    assert registered_sites(layout) == {}, "no server log yet: nobody registered"
    log_file = layout.prod_dir / layout.server_name / "log.txt"
    log_file.parent.mkdir(parents=True)
    log_file.write_text(LOG)
    found = registered_sites(layout)
    assert set(found) == {"site-1", "site-2"}
    assert found["site-1"] == datetime(2026, 11, 23, 14, 35, 7, 524000).timestamp()
    assert found["site-1"] - found["site-2"] == pytest.approx(2.856)
