"""The product never imports research code: `research/` holds answered questions whose scripts may use knobs the
product has dropped, so a product module that reached into it would break when a study is pruned, and a user would
run an experiment without knowing it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ["custom", "jobs", "deploy", "poc", "benchmarks", "provisioning"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def product_files() -> list[Path]:
    return sorted(path for folder in PRODUCT if (REPO / folder).is_dir() for path in (REPO / folder).rglob("*.py"))


def test_no_product_module_imports_research():
    files = product_files()
    assert any(path.is_relative_to(REPO / "benchmarks") for path in files), "the maintained benchmarks were scanned"
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name.split(".")[0] == "research"
    ]
    assert not offenders, f"product code imports research code: {offenders}"


def test_the_scan_sees_an_import_of_research(tmp_path):
    """The check above would pass vacuously if it could not see such an import: it must."""
    probe = tmp_path / "probe.py"
    probe.write_text("import research.dp_sgd_utility_gap\nfrom research import x\nfrom . import research\n")
    assert imported_modules(probe) == {"research.dp_sgd_utility_gap", "research"}
