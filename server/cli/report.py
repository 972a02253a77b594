"""``fedrec report``: (re)write the privacy report of a run directory."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from common.cli import UsageError


def add_report_commands(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="(re)write the privacy report of a run",
                                 description="(Re)write the privacy report of a run directory.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<timestamp>)")
    report.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    try:
        report = importlib.import_module("server.report")
    except ModuleNotFoundError as exc:
        if exc.name == "server.report":
            raise UsageError("privacy report not available in this version") from None
        raise UsageError(f"the privacy report needs {exc.name!r}: install it with "
                         "pip install 'fedrec[server]'") from None
    try:
        written = report.write_report(run_dir)
    except (ValueError, FileNotFoundError) as exc:  # not a run dir, a run without a ledger, ...
        raise UsageError(f"{run_dir}: {exc}") from None
    for path in [written] if isinstance(written, (str, Path)) else written:
        print(path)
    return 0

