"""Every job config must load: each component path imports, its args bind to the constructor, and the server and
sites agree on the model. Catches typos in JSON before a federation is started."""

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

from fedseg3d.data.task import parse_class_names

REPO = Path(__file__).resolve().parents[2]
JOB_DIRS = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())
VARIABLE = re.compile(r"^\{(\w+)\}$")


def substitute(node, variables):
    """FLARE's ``{var}`` substitution of top-level config variables (whole-string references keep their type)."""
    if isinstance(node, dict):
        return {k: substitute(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, variables) for v in node]
    if isinstance(node, str) and (match := VARIABLE.match(node)):
        assert match.group(1) in variables, f"undefined config variable {node}"
        return variables[match.group(1)]
    return node


def components(config):
    """Yield every ``{path, args}`` node anywhere in a config."""
    if isinstance(config, dict):
        if "path" in config and isinstance(config["path"], str):
            yield config
        for value in config.values():
            yield from components(value)
    elif isinstance(config, list):
        for value in config:
            yield from components(value)


def load_config(path):
    raw = json.loads(path.read_text())
    variables = {k: v for k, v in raw.items() if not isinstance(v, list | dict) and k != "format_version"}
    return substitute(raw, variables)


CONFIGS = [p for job in JOB_DIRS for p in sorted((job / "app" / "config").glob("config_fed_*.json"))]


def test_there_are_jobs():
    assert {p.name for p in JOB_DIRS} >= {"unet3d_fedavg", "unet3d_fedbn"}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: f"{p.parents[2].name}/{p.name}")
def test_component_paths_import_and_args_bind(config_path):
    config = load_config(config_path)
    assert config["format_version"] == 2
    for node in components(config):
        module_name, _, class_name = node["path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        args = {k: v for k, v in node.get("args", {}).items()}
        inspect.signature(cls).bind(**args)


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_server_and_sites_build_the_same_model(job):
    server = load_config(job / "app/config/config_fed_server.json")
    client = load_config(job / "app/config/config_fed_client.json")
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    learner = next(c for c in client["components"] if c["id"] == "learner")
    assert persistor["args"]["model"]["args"]["preset"] == learner["args"]["training"]["model_preset"]
    assert persistor["args"]["model"]["args"]["num_classes"] == len(parse_class_names(learner["args"]["class_names"]))


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_meta_is_submittable(job):
    meta = json.loads((job / "meta.json").read_text())
    assert meta["name"] == job.name
    assert meta["deploy_map"] == {"app": ["@ALL"]}
    assert (job / "README.md").is_file(), "each job folder documents what it is for"
