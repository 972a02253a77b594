"""``fedrec data``: fetch the embedded MovieLens-100K, or check that a data set reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.choices import DataFormat, values
from common.cli import UsageError
from server.cli._args import load_data


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="fetch the embedded data set or check your own files",
                               description="Fetch the embedded MovieLens-100K, or check that a data set reads.")
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_cmds.add_parser(
        "fetch", help="fetch and verify MovieLens-100K (from the recbole 1.2.1 wheel)",
        description="Fetch MovieLens-100K into the cache ($FEDREC_CACHE or ~/.cache/fedrec), check its "
                    "SHA-256 digests and print a summary. Without network access, download the wheel "
                    "elsewhere and pass it with --wheel.")
    fetch.add_argument("--wheel", metavar="PATH", help="an already downloaded recbole-1.2.1 wheel (offline use)")
    fetch.set_defaults(handler=cmd_data_fetch)

    info = data_cmds.add_parser(
        "info", help="load a data set and print what was read",
        description="Load a data set exactly as training would and print its size and the reader's notes "
                    "(dropped duplicates, ignored columns). A file that cannot be read is reported with "
                    "its file and line.")
    info.add_argument("source", metavar="PATH_OR_ml-100k",
                      help="'ml-100k' (embedded), a directory of MovieLens files, or a CSV/TSV/Parquet file")
    info.add_argument("--format", default=DataFormat.AUTO, choices=values(DataFormat),
                      help="file format (default: auto-detect)")
    info.add_argument("--item-file", metavar="FILE", help="item file item,title[,text] for generic data")
    info.set_defaults(handler=cmd_data_info)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from common.data.embedded import fetch_ml100k
    from common.data.errors import DataUnavailableError
    from common.data.readers import read_atomic

    if args.wheel is not None and not Path(args.wheel).is_file():
        raise UsageError(f"--wheel {args.wheel}: no such file")
    try:
        directory = fetch_ml100k(wheel=args.wheel)
    except DataUnavailableError as exc:
        raise UsageError(str(exc)) from None
    print(f"MovieLens-100K (SHA-256 verified) in {directory}")
    print(read_atomic(directory, "ml-100k").summary())
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    data = load_data(args.source, args.format, args.item_file)
    print(data.summary())
    print(f"ratings: {'explicit' if data.explicit else 'implicit (no rating column: every row counts as 1)'}")
    for line in data.report:
        print(f"note: {line}")
    return 0

