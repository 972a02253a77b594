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
    leakage.add_argument("--clients", type=positive_int, default=50, metavar="N", help="clients audited (default 50)")
    leakage.add_argument("--rounds", type=positive_int, default=1, metavar="R",
                         help="audit round R's updates, after R-1 in-process rounds from the initial model (default 1)")
    leakage.add_argument("--seed", type=any_int, default=0, help="seed of the client choice and the noise (default 0)")
    _source_arguments(leakage, run_dir_help="a run directory: its config, and audit.json written there")
    leakage.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    leakage.set_defaults(handler=cmd_audit_leakage)
    poisoning = audit_cmds.add_parser(
        "poisoning", help="malicious clients pushing an item into everyone's top-10, against each defence",
        description="The poisoning lab: FedRecAttack/PSMU-style malicious clients (a share of the population) "
                    "push one long-tail and one new item, against the run as configured (DP, SecAgg+) and each "
                    "defence. Prints ER@10 (honest users with the target in their top-10) and NDCG@10 per cell. "
                    "Cohorts and noise are seeded (--seed) so the cells are comparable: a lab, not a private run.")
    _source_arguments(poisoning, run_dir_help="take the configuration from this run's config.json")
    poisoning.add_argument("--rounds", type=positive_int, metavar="R", help="rounds per cell (default: the config's)")
    poisoning.add_argument("--fractions", default="0.001,0.01,0.03", metavar="F,F,...",
                           help="attacker shares of the population (default 0.001,0.01,0.03; 0.01 runs every defence)")
    poisoning.add_argument("--jobs", type=positive_int, default=1, metavar="J", help="cells run at once (default 1)")
    poisoning.add_argument("--seed", type=any_int, default=0, help="seed of the targets, cohorts and noise (default 0)")
    poisoning.add_argument("--json", metavar="PATH", help="also write every cell's figures to this JSON file")
    poisoning.set_defaults(handler=cmd_audit_poisoning)
    canaries = audit_cmds.add_parser(
        "canaries", help="an empirical ε from canary clients, beside the accounted ε",
        description="One-shot empirical privacy estimation (Andrew et al. 2023): K canary clients answer every "
                    "round they are sampled in with a random direction at the clip norm, K more are held out; the "
                    "cosines of their directions with what the auditor observes give an empirical ε with a "
                    "bootstrap lower bound. A build is flagged when that lower bound exceeds the accounted ε. "
                    "--mutant runs a deliberately broken build (noise/10, public-cohorts) to show the audit "
                    "catches it. With --run-dir the configuration comes from the run and the figures go to "
                    "RUN_DIR/canary_audit.json.")
    _source_arguments(canaries, run_dir_help="take the configuration from this run's config.json")
    canaries.add_argument("--canaries", type=positive_int, default=50, metavar="K",
                          help="inserted canaries, and as many held out (default 50; at least 10)")
    canaries.add_argument("--rounds", type=positive_int, metavar="R", help="rounds (default: the config's)")
    canaries.add_argument("--mutant", choices=("noise/10", "public-cohorts"),
                          help="audit a deliberately broken build instead of this one")
    canaries.add_argument("--seed", type=any_int, default=0, help="seed of the canary directions (default 0)")
    canaries.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    canaries.set_defaults(handler=cmd_audit_canaries)


def cmd_audit_leakage(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    cfg = _run_config(args.run_dir, args.data)
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



def _source_arguments(parser: argparse.ArgumentParser, *, run_dir_help: str) -> None:
    """--data and --run-dir, the same for every audit (read by :func:`_run_config`)."""
    parser.add_argument("--data", metavar="SOURCE",
                        help="'ml-100k' (embedded, default) or a path to your data (default: the run's data)")
    parser.add_argument("--run-dir", metavar="RUN_DIR", help=run_dir_help)


def _run_config(run_dir: str | None, data: str | None, extra: dict[str, Any] | None = None):
    """The configuration of ``run_dir`` (its config.json) or the defaults, with ``data`` and
    ``extra`` keys on top; a UsageError names what is wrong."""
    import json

    from common.config import RunConfig

    flat: dict[str, Any] = {}
    if run_dir is not None:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise UsageError(f"{run_dir}: no config.json, not a run directory")
        try:
            flat = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if data is not None:
        flat["data.source"] = data
    flat.update(extra or {})
    try:
        return RunConfig.from_flat(flat)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--fractions {text!r}: expected numbers separated by commas, e.g. 0.001,0.01,0.03") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise UsageError(f"--fractions {text!r}: every share must be in (0, 1)")
    return values


def cmd_audit_poisoning(args: argparse.Namespace) -> int:
    fractions = _fractions(args.fractions)
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: is a directory")
    extra: dict[str, Any] = {"fed.sampling-seed": args.seed, "dp.noise-seed": args.seed, "seed": args.seed}
    if args.rounds is not None:
        extra["fed.rounds"] = args.rounds
    cfg = _run_config(args.run_dir, args.data, extra)
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.poisoning import format_lab, plan_cells, run_lab, summarise, with_targets
    from common.serialization import write_json

    data = load_data(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
        sets, targets = with_targets(EvalSets.from_split(split), seed=args.seed)
        main = 0.01 if 0.01 in fractions else fractions[0]
        rows = run_lab(cfg, sets, targets, plan_cells(cfg, fractions=fractions, main_fraction=main), jobs=args.jobs)
    except ValueError as exc:  # a data set without a long-tail item, a model the lab cannot attack
        raise UsageError(f"{cfg.data.source}: {exc}") from None
    print(f"targets: long-tail item {targets.long_tail} ({int(sets.popularity[targets.long_tail])} training ratings), "
          f"new item {targets.new} (its training ratings removed); {cfg.fed.rounds} rounds per cell")
    print(format_lab(rows))
    if args.json is not None:
        write_json(Path(args.json), {"targets": targets.items(), "rounds": cfg.fed.rounds, "cells": rows,
                                     "summary": summarise(rows, main_fraction=main)})
        print(args.json)
    return 0


def cmd_audit_canaries(args: argparse.Namespace) -> int:
    if args.canaries < 10:
        raise UsageError(f"--canaries {args.canaries}: at least 10 are needed for an estimate")
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: is a directory")
    cfg = _run_config(args.run_dir, args.data, {"fed.rounds": args.rounds} if args.rounds else None)
    from common.canary_run import run_canary_audit
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.serialization import write_json

    data = load_data(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
        audit = run_canary_audit(cfg, EvalSets.from_split(split), canaries=args.canaries, mutant=args.mutant,
                                 seed=args.seed, progress=True)
    except ValueError as exc:  # DP off, a split that cannot be made
        raise UsageError(f"{cfg.data.source}: {exc}") from None
    figures = audit.to_dict()
    e = audit.estimate
    build = f"mutant {audit.mutant}" if audit.mutant else "this build"
    print(f"{build}, {audit.mode} DP, {audit.rounds} rounds, {audit.canaries} canaries inserted and {audit.canaries} "
          f"held out; observed: {audit.observation}")
    print(f"accounted ε = {audit.accounted_epsilon:.3f}; empirical ε = {e.epsilon:.3f} ({e.confidence:.0%} interval "
          f"{e.low:.3f}-{e.high:.3f}, lower bound {e.lower_bound:.3f}) at δ = {e.delta:g}")
    print("FLAGGED: the empirical lower bound exceeds the accounted ε" if audit.flagged
          else "not flagged: the empirical lower bound is within the accounted ε (an audit can show a build broken, "
               "never prove it right)")
    if args.run_dir is not None and args.mutant is None:
        from server.report import write_report

        write_json(Path(args.run_dir) / "canary_audit.json", figures)
        print(Path(args.run_dir) / "canary_audit.json")
        for path in write_report(Path(args.run_dir)):  # the report shows it beside the accounted ε
            print(path)
    if args.json is not None:
        write_json(Path(args.json), figures)
        print(args.json)
    return 0
