"""Argument checks shared by the privacy modules: each names the argument and the value."""

from __future__ import annotations

import math
import numbers


def require_real(name: str, value: object) -> None:
    """A finite real number (``bool`` is refused: ``True`` is not a noise multiplier)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")


def require_positive(name: str, value: object) -> None:
    """A finite real number > 0."""
    require_real(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def require_sample_rate(name: str, value: object) -> None:
    """A Poisson sampling rate, 0 < q <= 1 (1.0 = no sampling, no amplification)."""
    require_real(name, value)
    if not 0.0 < value <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must satisfy 0 < q <= 1 (1.0 = no sampling), got {value!r}.")


def require_delta(name: str, value: object) -> None:
    """A δ, 0 < δ < 1."""
    require_real(name, value)
    if not 0.0 < value < 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must satisfy 0 < delta < 1, got {value!r}.")


def require_int(name: str, value: object, *, minimum: int) -> None:
    """An integer (not ``bool``) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
