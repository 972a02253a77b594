"""Saving models and run artefacts without pickle: safetensors for arrays, JSON for the rest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Atomically and durably write ``arrays`` as safetensors: a temporary file, fsync, rename,
    fsync of the directory (a crash leaves the old file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".part")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically and durably write ``obj`` as JSON (see :func:`save_arrays`)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line (after a torn last line, on a line of its own)."""
    line = json.dumps(obj, sort_keys=True, default=_default) + "\n"
    with open(path, "ab+") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode("utf-8"))


class JsonlError(ValueError):
    """A line of a JSON-lines file that is not JSON (other than a torn last line)."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, one per line. A last line cut short by a crash (no
    newline after it, not valid JSON) is dropped; any other bad line raises :class:`JsonlError`
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):  # torn last line: the crash cut it
                break
            raise JsonlError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
    return out


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
