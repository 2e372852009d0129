"""Only the FLARE adapters may import nvflare: the rest stays plain PyTorch/MONAI, testable and reusable."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "custom" / "fedseg3d"
FLARE_ADAPTERS = {"learners", "filters", "server"}
PLAIN_FILES_IN_ADAPTER_PACKAGES = {"filters/codecs.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_adapters_import_nvflare():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        adapter = relative.parts[0] in FLARE_ADAPTERS and str(relative) not in PLAIN_FILES_IN_ADAPTER_PACKAGES
        if not adapter and any(name.split(".")[0] == "nvflare" for name in imported_modules(path)):
            offenders.append(str(relative))
    assert not offenders, f"modules outside {sorted(FLARE_ADAPTERS)} import nvflare: {offenders}"
