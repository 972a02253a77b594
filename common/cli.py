"""What fedrec's command lines share: the user-mistake error, its one-line report, and how
flags and ``--set KEY=VALUE`` become a :class:`~common.config.RunConfig`.

``fedrec``, ``simulate.py`` and ``fedrec-client`` all end a mistake in what the user typed or
gave (a bad flag value, an unknown config key, an unreadable file) with one line
``PROG: error: ...`` on stderr and exit status 2, never a traceback. Light on purpose: no
numpy, no torch, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from common.config import RunConfig

EXIT_USAGE = 2  # argparse's own status for bad arguments; used for every user mistake


class UsageError(Exception):
    """A mistake in the command line, the config or the inputs: reported as one line
    ``PROG: error: MESSAGE``, exit status 2.

    ``details`` (the tail of a process's log, say) is printed as it is on the lines below.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details

    @classmethod
    def from_text(cls, text: str) -> UsageError:
        """The first line of ``text`` as the message, the lines after it as the details
        (``"nginx refused nginx.conf:\\n<its stderr>"``)."""
        message, _, details = text.partition("\n")
        return cls(message, details)


def report_error(prog: str, exc: BaseException, stream: TextIO | None = None) -> int:
    """Print ``PROG: error: MESSAGE`` (white space collapsed: one line) and any details of a
    :class:`UsageError` below it; returns :data:`EXIT_USAGE`."""
    out = sys.stderr if stream is None else stream
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=out)
    details = getattr(exc, "details", "")
    if details:
        print(details.rstrip("\n"), file=out)
    return EXIT_USAGE


def parse_set(items: Iterable[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` options as flat config keys (values as typed: the config converts and
    checks them); a malformed one is a :class:`UsageError`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def config_from_flags(args: argparse.Namespace, flags: Mapping[str, str], *,
                      switches: Mapping[str, tuple[str, Any]] | None = None,
                      base: RunConfig | None = None) -> RunConfig:
    """The run config a command line asks for: ``base`` (default: :class:`RunConfig`'s defaults),
    then every flag given, then each ``--set KEY=VALUE`` of ``args.set`` (the last one wins).

    Parameters
    ----------
    args:
        The parsed command line; a flag left at ``None`` was not given.
    flags:
        argparse destination -> flat config key (``{"rounds": "fed.rounds"}``).
    switches:
        ``store_true`` destination -> (flat config key, the value it sets when given)
        (``{"no_dp": ("dp.enabled", False)}``).
    base:
        The config the flags change (a resumed run's own); None for the defaults.

    Raises
    ------
    UsageError
        A malformed ``--set``, an unknown key, a value of the wrong type or out of range; the
        message names the key.
    """
    from common.config import RunConfig

    flat = (base or RunConfig()).to_flat()
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            flat[key] = value
    for dest, (key, value) in (switches or {}).items():
        if getattr(args, dest, False):
            flat[key] = value
    flat.update(parse_set(getattr(args, "set", None) or ()))
    try:
        return RunConfig.from_flat(flat)
    except ValueError as exc:  # unknown key, wrong type, value out of range: the key is named
        raise UsageError(str(exc)) from None
