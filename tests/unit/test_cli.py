"""The `fedseg3d` entry point: every subcommand explains itself, unknown ones fail clearly, pyproject declares it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedseg3d import cli

REPO = Path(__file__).resolve().parents[2]

# Each subcommand's key options: what a user must find in its --help.
KEY_OPTIONS = {
    ("data", "synthetic"): ["--out", "--sites", "--seed"],
    ("data", "real"): ["--out", "--cache", "--classes", "--sites"],
    ("build-jobs",): ["--job", "--set", "--out", "--no-code"],
    ("simulate",): ["--sites-root", "--sites", "--workspace", "--privacy-dir"],
    ("poc", "run"): ["--job", "--sites", "--set", "--workspace", "--keep-running"],
    ("poc", "stop"): ["--workspace"],
    ("report",): ["result_dir"],
    ("resume",): ["--run", "--dry-run", "--startup-kit", "--server-workspace", "--poc-workspace"],
    ("privacy-report",): ["budget_files"],
    ("audit",): ["--run-dir", "--sites-root", "--json"],
    ("audit-trail", "verify"): ["run_dir", "--head"],
    ("pretrain",): ["--data", "--job", "--out"],
    ("provision",): ["--project", "--workspace"],
    ("add-site",): ["--name", "--org", "--workspace"],
    ("renew",): ["--name"],
    ("cert-info",): ["kit"],
    ("deploy-local",): ["--sites", "--data", "--job", "--port", "--keep-running"],
    ("export",): ["--model", "--site", "--server-result", "--out"],
    ("calibrate",): ["--model", "--site-config", "--fine-tune-steps", "--learning-rate", "--out"],
    ("predict",): ["--model", "--site", "--input", "--out", "--device", "--classes", "--overlap", "--seg-type"],
}


def all_commands() -> set[tuple[str, ...]]:
    found = set()
    for name, entry in cli.COMMANDS.items():
        found.update([(name, sub) for sub in entry] if isinstance(entry, dict) else [(name,)])
    return found


def test_every_subcommand_is_covered_here():
    assert all_commands() == set(KEY_OPTIONS)


@pytest.mark.parametrize("command", sorted(KEY_OPTIONS), ids=" ".join)
def test_help_exits_0_and_explains_the_command(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fedseg3d {' '.join(command)} ")
    assert "Example" in text and f"fedseg3d {' '.join(command)}" in text.split("Example", 1)[1]
    assert "writes" in text.lower() or "write a" in text.lower(), "the help must say what the command writes"
    missing = [option for option in KEY_OPTIONS[command] if option not in text]
    assert not missing, f"`fedseg3d {' '.join(command)} --help` does not name {missing}"


def test_overview_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {' '.join(command)} " in text for command in KEY_OPTIONS)


@pytest.mark.parametrize(
    ("argv", "unknown"), [(["simlate"], "'simlate' (did you mean 'simulate'?)"), (["poc", "halt"], "'halt'")]
)
def test_unknown_subcommand_fails_clearly(argv, unknown, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"unknown command {unknown}" in err and "commands:" in err


def test_missing_subcommand_prints_the_overview_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_usage_error_of_a_subcommand_is_its_parsers_error(capsys):
    assert cli.main(["report"]) == 2
    assert "the following arguments are required: result_dir" in capsys.readouterr().err


def test_pyproject_declares_the_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fedseg3d"] == "fedseg3d.cli:main"


def test_python_dash_m_fedseg3d_is_the_same_command():
    # The package under test, whatever the environment has installed.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(cli.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "fedseg3d", "poc", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fedseg3d poc COMMAND") and "\n  stop " in result.stdout
