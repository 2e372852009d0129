import json

import pytest

from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SITE_CONFIG_FILENAME, SITES_ROOT_ENV, SiteConfig, find_site_config


def test_relative_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data_root": "data", "datalist": "list.json", "num_threads": 2}))
    cfg = SiteConfig.from_file(tmp_path / "c.json", site_name="site-1")
    assert cfg.data_root == (tmp_path / "data").resolve()
    assert cfg.datalist == (tmp_path / "data" / "list.json").resolve()
    assert cfg.num_threads == 2 and cfg.site_name == "site-1"


def test_unknown_field_and_wrong_site_are_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data_root": ".", "datalist": "d.json", "dataroot": "x"}))
    with pytest.raises(DataError, match=r"unknown field\(s\) \['dataroot'\]"):
        SiteConfig.from_file(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"site_name": "site-2", "data_root": ".", "datalist": "d.json"}))
    with pytest.raises(DataError, match="field 'site_name' is 'site-2' but this site is 'site-1'"):
        SiteConfig.from_file(tmp_path / "d.json", site_name="site-1")


def test_local_folder_wins_over_environment(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    (tmp_path / "env" / "site-1").mkdir(parents=True)
    (tmp_path / "env" / "site-1" / "site.json").write_text("{}")
    monkeypatch.setenv(SITES_ROOT_ENV, str(tmp_path / "env"))
    assert find_site_config("site-1", local) == tmp_path / "env" / "site-1" / "site.json"
    (local / SITE_CONFIG_FILENAME).write_text("{}")
    assert find_site_config("site-1", local) == local / SITE_CONFIG_FILENAME


def test_no_config_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(SITES_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match="no site config found") as err:
        find_site_config("site-9", tmp_path)
    assert str(tmp_path) in str(err.value)
