"""The one exception type for bad site data, so callers can tell bad input from bugs."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A site's data is unusable. The message always names the file (or datalist field) and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
