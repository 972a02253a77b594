"""Shared by the benchmark scripts: targets checked one way, tables printed one way, and the
``--json`` file ``{"figures": {name: value}, "targets": [{name, value, op, target, met}]}``."""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def target(name: str, value: float | None, op: str, goal: float | None) -> dict[str, Any]:
    """A target row; a value that was not measured (None/NaN) is not met."""
    ok = value is not None and goal is not None and not math.isnan(value) and OPS[op](value, goal)
    return {"name": name, "value": value, "op": op, "target": goal, "met": bool(ok)}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_json(path: Path, figures: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"figures": {k: _finite(v) for k, v in figures.items()},
           "targets": [{k: _finite(v) for k, v in t.items()} for t in targets]}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table; floats with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(row.rstrip() for row in out)


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [[t["name"], t["value"] if t["value"] is not None else "not measured", t["op"], t["target"],
             "met" if t["met"] else "MISSED"] for t in targets]
    return table(["target", "value", "op", "goal", ""], rows)
