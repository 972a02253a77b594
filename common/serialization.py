"""Saving models and run artefacts without pickle: safetensors for arrays, JSON for the rest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``arrays`` as safetensors (a crash never leaves a half-written file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".part")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str | Path, obj: Any) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, sort_keys=True, default=_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
