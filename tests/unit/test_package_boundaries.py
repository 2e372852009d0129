"""Package boundaries, checked by parsing imports.

Only the FLARE adapters may import nvflare: the rest stays plain PyTorch/MONAI, testable and reusable. The
compression codecs are plain numpy: no nvflare, no torch, so that any transport (or a test) can use them.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "custom" / "fedseg3d"
# The FLARE components, and the commands that drive FLARE's POC and provisioning tools.
FLARE_ADAPTERS = {"learners", "filters", "server", "poc", "deploy"}
PLAIN_NUMPY = "compression"


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
        adapter = relative.parts[0] in FLARE_ADAPTERS
        if not adapter and any(name.split(".")[0] == "nvflare" for name in imported_modules(path)):
            offenders.append(str(relative))
    assert not offenders, f"modules outside {sorted(FLARE_ADAPTERS)} import nvflare: {offenders}"


def test_compression_imports_only_numpy_and_the_standard_library():
    files = sorted((PACKAGE / PLAIN_NUMPY).rglob("*.py"))
    assert files, f"no modules under {PACKAGE / PLAIN_NUMPY}"
    offenders = {}
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = top in sys.stdlib_module_names or top == "numpy" or name.startswith(f"fedseg3d.{PLAIN_NUMPY}")
            if not allowed:
                offenders.setdefault(str(path.relative_to(PACKAGE)), []).append(name)
    assert not offenders, f"{PLAIN_NUMPY}/ must be plain numpy: {offenders}"
