"""Client replies are data, not trust: parse what a client says about itself and its evaluation,
and say why a reply cannot be used (the strategy then counts one failure of that client and the
round goes on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common import keys


def identity(properties: Mapping[str, Any]) -> tuple[int, int]:
    """(client id, users held) from an identity reply; ValueError when they are not integers."""
    cid, users = properties[keys.PROP_CLIENT_ID], properties.get(keys.PROP_USERS, 1)
    for name, value in ((keys.PROP_CLIENT_ID, cid), (keys.PROP_USERS, users)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if users < 0:
        raise ValueError(f"{keys.PROP_USERS} must be ≥ 0, got {users}")
    return int(cid), int(users)


def finite(value: Any) -> float | None:
    """A client's metric as a finite float, or None (missing, not a number, NaN/Inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def evaluation_problem(users: Any, metrics: Mapping[str, Any], names: list[str], held: int) -> str | None:
    """Why a client's evaluation sums cannot be true: a user count outside 0..``held`` (the users it
    said it holds), or a metric sum that is not a number in [0, users] (each metric is in [0, 1]
    per user)."""
    if isinstance(users, bool) or not isinstance(users, int) or not 0 <= users <= held:
        return f"{users!r} users evaluated, the client holds {held}"
    for name in names:
        value = finite(metrics.get(name, 0.0))
        if value is None or not 0.0 <= value <= users * (1 + 1e-9):
            return f"{name} sum {metrics.get(name)!r} is not within [0, {users}]"
    return None


def silo_history_entry(metrics: Mapping[str, Any]) -> tuple[float, float, int] | None:
    """A silo's DP-SGD history entry (σ, q, steps) of this round, or None when it sent none;
    ValueError/KeyError/TypeError when it sent a malformed one."""
    if keys.M_SILO_SIGMA not in metrics:
        return None
    return (metrics[keys.M_SILO_SIGMA], metrics[keys.M_SILO_RATE], int(metrics[keys.M_SILO_STEPS]))
