"""What every ``fedrec`` command shares: the program name, argument
types that refuse inf/NaN and out-of-range numbers by name, and loading a data set."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from common.cli import UsageError

PROG = "fedrec"


def _number(kind: Callable[[str], Any], name: str, check: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, "an integer", lambda v: v >= 1, "an integer >= 1")
positive_float = _number(float, "a number", lambda v: v > 0, "a number > 0")
probability = _number(float, "a number", lambda v: 0 < v < 1, "a number strictly between 0 and 1")
sample_rate = _number(float, "a number", lambda v: 0 < v <= 1, "a sampling rate 0 < q <= 1")
any_int = _number(int, "an integer", lambda v: True, "an integer")


def load_data(source: str, fmt: str, item_file: str | None):  # -> Interactions
    """The data set as training reads it; a file that cannot be read is a UsageError naming it."""
    from common.data import DataError, DataUnavailableError, load_interactions

    try:
        return load_interactions(source, fmt, item_file or None)
    except (DataError, DataUnavailableError) as exc:
        raise UsageError(str(exc)) from None
