"""What the server may do to a round's updates besides adding them, against clients that send
whatever they like (docs/SECURITY.md, "Poisoning"). Pure numpy.

* :func:`sum_out_of_range`: under SecAgg+ the server sees only the sum of n updates whose values
  an honest client keeps within ±r, so every coordinate of an honest sum lies within ±n·r. A sum
  outside that was made by a client that ignored the protocol: the round is refused (released as
  noise only). Honest data never trips it, so refusing reveals nothing about honest users.
* :func:`clamp_total`: clamp every coordinate of the sum to ±ρ. Clamping is 1-Lipschitz in each
  coordinate, so one user changes the clamped sum by no more (in L2) than the sum itself: the
  noise sized for C still covers it, under SecAgg+ too (it needs only the sum). It bounds what
  any coalition adds to one coordinate in one round to ρ, whatever the protocol let through.
* :func:`robust_total`: the coordinate-wise median or trimmed mean, times n (so the release divides
  as it does a sum). Plaintext only (it needs each update) and without DP: the ledger accounts
  for the sum, and a median's sensitivity is not C.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.choices import Aggregate


def sum_updates(updates: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray] | None:
    """Sum of client updates in float64, in the given order (callers sort by client id, so the
    result does not depend on which reply arrived first). None when there are none."""
    if not updates:
        return None
    return [np.sum([np.asarray(u[i]).astype(np.float64) for u in updates], axis=0) for i in range(len(updates[0]))]


def sum_out_of_range(total: Sequence[np.ndarray], n: int, value_bound: float) -> str | None:
    """Why ``total`` cannot be the sum of ``n`` updates with every value within ±``value_bound``
    (None when it can)."""
    if not np.isfinite(value_bound):
        return None
    limit = n * value_bound * (1 + 1e-6) + 1e-9
    for i, a in enumerate(total):
        a = np.asarray(a)
        if not np.all(np.isfinite(a)):
            return f"array {i} of the sum contains NaN or Inf"
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        if peak > limit:
            return (f"array {i} of the sum has a value of magnitude {peak:.4g} > {n} updates × {value_bound:.4g} "
                    "(a client ignored the protocol's value range)")
    return None


def clamp_total(total: Sequence[np.ndarray], bound: float) -> list[np.ndarray]:
    """Every coordinate of the sum clamped to ±``bound`` (``bound`` ≤ 0: unchanged)."""
    if bound <= 0:
        return [np.asarray(a, dtype=np.float64) for a in total]
    return [np.clip(np.asarray(a, dtype=np.float64), -bound, bound) for a in total]


def robust_total(updates: Sequence[Sequence[np.ndarray]], kind: Aggregate, *, trim_fraction: float = 0.1
                 ) -> list[np.ndarray] | None:
    """n × the coordinate-wise median or trimmed mean of ``updates`` (``sum``: their sum), in
    float64; None when there are none."""
    kind = Aggregate(kind)
    if kind == Aggregate.SUM or not updates:
        return sum_updates(updates)
    n = len(updates)
    out = []
    for i in range(len(updates[0])):
        stack = np.stack([np.asarray(u[i], dtype=np.float64) for u in updates])
        if kind == Aggregate.MEDIAN:
            out.append(n * np.median(stack, axis=0))
        else:
            cut = int(np.floor(trim_fraction * n))
            kept = np.sort(stack, axis=0)[cut:n - cut] if n - 2 * cut > 0 else stack
            out.append(n * kept.mean(axis=0))
    return out
