"""Assemble runnable FLARE jobs from ``jobs/`` (config) and ``custom/fedseg3d`` (code) into ``build/jobs``.

What runs is what is committed: the simulator, POC and the tests all submit the folders this writes, never a
hand-edited copy. ``--set name=value`` overrides a top-level variable of the job's config files (FLARE substitutes
``{name}`` wherever it is used), so a test can shorten a run, or a consortium set its task, without a second copy of
the job. A value is read as JSON when it is JSON; a list (``--set 'class_names=["background","liver"]'``) is stored
as its JSON text, because FLARE's variables are strings, numbers and booleans only (the learner decodes it). The
server's ``num_classes`` follows the sites' ``class_names``: it is written here, never set by hand.

Writes one folder per job under ``--out``: ``meta.json``, ``app/config`` with the overrides applied and, unless
``--no-code``, the package in ``app/custom`` (for sites that do not have it installed).

Example:
    fedseg3d build-jobs [--jobs-dir jobs] [--out build/jobs] [--job NAME ...] [--set num_rounds=2]
        [--min-clients 2] [--no-code]
    fedseg3d build-jobs --job unet3d_fedbn --set 'class_names=["background","brain"]' --set roi_size=[48,48,48]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import fedseg3d
from fedseg3d.data.task import parse_class_names

PACKAGE_DIR = Path(fedseg3d.__file__).resolve().parent
CONFIG_FILES = ("config_fed_server.json", "config_fed_client.json")
DERIVED = {"num_classes": "it is the length of class_names: set class_names"}


def parse_override(text: str) -> tuple[str, object]:
    """``name=value`` with ``value`` parsed as JSON when it is JSON (numbers, booleans, lists), else a string."""
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like name=value")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def apply_overrides(app_config_dir: Path, overrides: dict[str, object]) -> None:
    """Set top-level variables in the app's config files; a name defined in neither file is an error."""
    unused = set(overrides)
    for filename in CONFIG_FILES:
        path = app_config_dir / filename
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        changed = False
        for name, value in overrides.items():
            if name in config and not isinstance(config[name], list | dict):
                config[name] = json.dumps(value) if isinstance(value, list | dict) else value
                unused.discard(name)
                changed = True
        if changed:
            path.write_text(json.dumps(config, indent=2) + "\n")
    if unused:
        raise ValueError(f"{app_config_dir}: no top-level variable(s) {sorted(unused)} in {list(CONFIG_FILES)}")


def derive_num_classes(app_config_dir: Path) -> None:
    """Write the server's ``num_classes`` from the client's ``class_names``: one source for the class count.

    Raises:
        JobConfigError: the client's ``class_names`` is malformed.
    """
    client, server = (app_config_dir / name for name in ("config_fed_client.json", "config_fed_server.json"))
    if not (client.is_file() and server.is_file()):
        return
    class_names = json.loads(client.read_text()).get("class_names")
    config = json.loads(server.read_text())
    if class_names is None or "num_classes" not in config:
        return
    count = len(parse_class_names(class_names, field=f"{client}: class_names"))
    if config["num_classes"] != count:
        config["num_classes"] = count
        server.write_text(json.dumps(config, indent=2) + "\n")


def build_job(
    source: Path, out_dir: Path, overrides: dict[str, object], min_clients: int | None, with_code: bool
) -> Path:
    """Copy one job folder, apply overrides and (unless ``with_code`` is False) bundle the package as app code."""
    if not (source / "meta.json").is_file():
        raise ValueError(f"{source}: not a job folder (no meta.json)")
    target = out_dir / source.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("README.md"))
    for app_dir in sorted(p for p in target.iterdir() if (p / "config").is_dir()):
        apply_overrides(app_dir / "config", overrides)
        derive_num_classes(app_dir / "config")
        if with_code:
            shutil.copytree(PACKAGE_DIR, app_dir / "custom" / "fedseg3d", ignore=shutil.ignore_patterns("__pycache__"))
    if min_clients is not None:
        meta_path = target / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["min_clients"] = min_clients
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return target


def build_jobs(
    jobs_dir: Path,
    out_dir: Path,
    names: list[str] | None = None,
    overrides: dict[str, object] | None = None,
    min_clients: int | None = None,
    with_code: bool = True,
) -> list[Path]:
    """Build the named jobs (all jobs when ``names`` is empty) and return their folders."""
    derived = sorted(set(overrides or {}) & set(DERIVED))
    if derived:
        raise ValueError(f"cannot --set {derived}: {'; '.join(DERIVED[name] for name in derived)}")
    sources = sorted(p for p in jobs_dir.iterdir() if (p / "meta.json").is_file())
    if names:
        known = {p.name for p in sources}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown job(s) {missing} in {jobs_dir}; known: {sorted(known)}")
        sources = [p for p in sources if p.name in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    return [build_job(p, out_dir, overrides or {}, min_clients, with_code) for p in sources]


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs-dir", type=Path, default=Path("jobs"))
    parser.add_argument("--out", type=Path, default=Path("build/jobs"))
    parser.add_argument("--job", action="append", dest="names", help="job to build (repeatable); default: all")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="NAME=VALUE")
    parser.add_argument("--min-clients", type=int, default=None, help="override meta.json min_clients")
    parser.add_argument("--no-code", action="store_true", help="do not bundle the package (sites have it installed)")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    for path in build_jobs(args.jobs_dir, args.out, args.names, overrides, args.min_clients, not args.no_code):
        print(f"built {path}")


if __name__ == "__main__":
    main()
