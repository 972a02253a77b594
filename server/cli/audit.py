"""``fedrec audit``: empirical privacy audits of what the server observes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.cli import UsageError
from server.cli._args import any_int, load_data, positive_int


def add_audit_commands(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser("audit", help="audit what the server can infer from client updates",
                                description="Empirical privacy audits of what the server observes.")
    audit_cmds = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    leakage = audit_cmds.add_parser(
        "leakage", help="how well the server infers which items a client rated",
        description="Compute real round updates of some clients and let an honest-but-curious server rank "
                    "each client's rated items from what it observes: plaintext updates, clipped updates "
                    "(central DP), local DP, SecAgg+ and SecAgg+ with DP. Prints ROC-AUC and precision@k per "
                    "observation model. With --run-dir, sigma and clip come from the run's config.json and "
                    "the figures go to RUN_DIR/audit.json (the privacy report includes them).")
    leakage.add_argument("--data", metavar="SOURCE",
                         help="'ml-100k' (embedded, default) or a path to your data (default: the run's data)")
    leakage.add_argument("--clients", type=positive_int, default=50, metavar="N", help="clients audited (default 50)")
    leakage.add_argument("--rounds", type=positive_int, default=1, metavar="R",
                         help="audit round R's updates, after R-1 in-process rounds from the initial model (default 1)")
    leakage.add_argument("--seed", type=any_int, default=0, help="seed of the client choice and the noise (default 0)")
    leakage.add_argument("--run-dir", metavar="RUN_DIR",
                         help="a run directory: its config, and audit.json written there")
    leakage.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    leakage.set_defaults(handler=cmd_audit_leakage)


def cmd_audit_leakage(args: argparse.Namespace) -> int:
    import json

    from common.config import RunConfig

    run_dir = Path(args.run_dir) if args.run_dir else None
    flat: dict[str, Any] = {}
    if run_dir is not None:
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"{run_dir}: no config.json, not a run directory")
        try:
            flat = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{run_dir / 'config.json'}: not valid JSON ({exc})") from None
    if args.data is not None:
        flat["data.source"] = args.data
    try:
        cfg = RunConfig.from_flat(flat)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: is a directory")
    from common.audit import format_audit, leakage_audit, write_audit
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.serialization import write_json

    data = load_data(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
        figures = leakage_audit(EvalSets.from_split(split), cfg, clients=args.clients, rounds=args.rounds,
                                seed=args.seed)
    except ValueError as exc:  # too few users for --clients, a split that cannot be made
        raise UsageError(f"{cfg.data.source}: {exc}") from None
    print(format_audit(figures))
    if run_dir is not None:
        print(write_audit(run_dir, figures))
    if args.json is not None:
        write_json(Path(args.json), figures)
        print(args.json)
    return 0

