"""Errors raised for bad input data: they always name the file, the line and what was expected."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be read as promised.

    Parameters
    ----------
    path:
        The file at fault.
    message:
        What was expected and what was found.
    line:
        1-based line number in ``path`` (``None`` when the problem is the whole file).
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class DataUnavailableError(RuntimeError):
    """The embedded data set could not be fetched (no registry, no cache)."""
