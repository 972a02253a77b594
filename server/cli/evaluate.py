"""``fedrec evaluate``: the report of what the language model adds (:mod:`server.lm_report`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common.cli import UsageError

#: Where the benchmarks write their results by default (the commands the report prints).
DEFAULTS = {"language_model": Path("runs/language_model.json"), "interactive": Path("runs/interactive.json"),
            "edge": Path("runs/edge.json")}


def add_evaluate_commands(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser(
        "evaluate", help="one report of what the language model adds (Markdown + HTML)",
        description="Render one report (report.md, report.html with its plots inline) of what the language model "
                    "adds: accuracy on warm, new and all items beside MF and baselines, the privacy frontier, the α "
                    "curve, cold-start lift, interactive success per turn, explanations, cost, and the ε of every "
                    "model shown. The numbers come from the benchmarks' --json files (defaults under runs/); "
                    "--run measures the missing ones first (a source checkout: benchmarks/ is not installed).")
    ev.add_argument("--out", required=True, type=Path, help="folder for report.md, report.html and the plots")
    ev.add_argument("--language-model", type=Path, default=DEFAULTS["language_model"], metavar="JSON",
                    help=f"benchmarks/language_model.py --json output (default {DEFAULTS['language_model']})")
    ev.add_argument("--interactive", type=Path, default=DEFAULTS["interactive"], metavar="JSON",
                    help=f"benchmarks/interactive.py --json output (default {DEFAULTS['interactive']})")
    ev.add_argument("--edge", type=Path, default=DEFAULTS["edge"], metavar="JSON",
                    help=f"benchmarks/edge.py --json output (default {DEFAULTS['edge']})")
    ev.add_argument("--run", action="store_true", help="run the benchmarks whose results are missing first "
                                                       "(language model ~25 min, interactive ~3 min on 2 cores)")
    ev.add_argument("--quick", action="store_true", help="with --run: the benchmarks' --quick configurations")
    ev.set_defaults(handler=cmd_evaluate)


def _run_missing(sources: dict[str, Path], quick: bool) -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("interactive", "language_model"):
        if sources[name].is_file():
            continue
        script = root / "benchmarks" / f"{name}.py"
        if not script.is_file():
            raise UsageError(f"--run needs the source checkout's benchmarks/ ({script} is not there)")
        cmd = [sys.executable, str(script), "--json", str(sources[name])] + (["--quick"] if quick else [])
        print("running:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise UsageError(f"{script.name} failed (its output is above); nothing was written")


def cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        from server import lm_report
    except ModuleNotFoundError as exc:
        raise UsageError(f"the report needs {exc.name!r}: pip install 'fedrec[server]'") from None
    sources = {"language_model": args.language_model, "interactive": args.interactive, "edge": args.edge}
    if args.run:
        _run_missing(sources, args.quick)
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        written = lm_report.write(args.out, sources, generated)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for path in written[:2]:
        print(path)
    return 0
