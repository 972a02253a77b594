"""The ``fedrec`` command line: data, centralised baseline, privacy planning and reports.

    fedrec data fetch [--wheel PATH]           fetch and verify the embedded MovieLens-100K
    fedrec data info PATH|ml-100k              load a data set and print what was read
    fedrec train-central [--data ...]          train the centralised MF baseline into runs/<timestamp>/
    fedrec privacy plan --target-epsilon ...   the noise multiplier a privacy budget allows
    fedrec report RUN_DIR                      (re)write the privacy report of a run
    fedrec audit leakage [--run-dir RUN_DIR]   how well the server infers which items a client rated
    fedrec deploy certs|keys|app-key|sign|items|server|local
                                               TLS files, SuperNode and publisher keys, a signed app
                                               bundle, the item list, the server host, a local federation

Mistakes in what the user typed (a bad path, an unknown config key, a number out of range)
end with one line on stderr and exit status 2, never a traceback. Heavy modules (torch, the
privacy accountants) are imported inside the commands, so ``fedrec --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROG = "fedrec"
EXIT_USAGE = 2  # argparse's own status for bad arguments; used for every user mistake

# train-central flag -> flat config key (the keys simulate.py's --set takes)
CENTRAL_FLAGS = {
    "data": "data.source", "format": "data.format", "item_file": "data.item-file", "split": "data.split",
    "epochs": "central.epochs", "lr": "central.lr", "dim": "model.dim", "loss": "model.loss", "seed": "seed",
}
# metric key -> label in the train-central table
TABLE_METRICS = (("ndcg@10", "NDCG@10"), ("recall@10", "Recall@10"), ("hr@10", "HR@10"), ("mrr@10", "MRR@10"),
                 ("coverage@10", "coverage@10"), ("novelty@10", "novelty@10"))

log = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


# ---------------------------------------------------------------- argument types
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


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from common.data.readers import FORMATS  # light: numpy only

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (downloads, ...)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- data
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
    info.add_argument("--format", default="auto", choices=FORMATS, help="file format (default: auto-detect)")
    info.add_argument("--item-file", metavar="FILE", help="item file item,title[,text] for generic data")
    info.set_defaults(handler=cmd_data_info)

    # ---- train-central
    central = commands.add_parser(
        "train-central", help="train the centralised MF baseline",
        description="Train the centralised matrix-factorisation baseline (the number every federated run "
                    "is compared to), early-stopped on validation NDCG@10, and write a run directory "
                    "(config.json, central_metrics.json, model.safetensors).")
    central.add_argument("--data", metavar="SOURCE", help="'ml-100k' (embedded, default) or a path to your data")
    central.add_argument("--format", choices=FORMATS, help="file format of --data (default: auto-detect)")
    central.add_argument("--item-file", metavar="FILE", help="item file item,title[,text] for generic data")
    central.add_argument("--split", choices=("random", "leave-last-out", "cold-item"),
                         help="random (RecBole 80/10/10 per user, default), leave-last-out, cold-item")
    central.add_argument("--epochs", type=positive_int, help="maximum epochs (default 60)")
    central.add_argument("--dim", type=positive_int, help="embedding dimension (default 64)")
    central.add_argument("--loss", choices=("softmax", "bpr", "mse"), help="training loss (default softmax)")
    central.add_argument("--lr", type=positive_float, help="Adam learning rate (default 0.01)")
    central.add_argument("--seed", type=any_int, help="seed of initialisation and batching (default 0)")
    central.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="any config key, e.g. central.patience=10 or data.seed=1 (repeatable)")
    central.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run directories go (default runs)")
    central.add_argument("--no-progress", action="store_true", help="no progress bar")
    central.set_defaults(handler=cmd_train_central)

    # ---- privacy
    privacy = commands.add_parser("privacy", help="plan a differentially private run",
                                  description="Privacy planning before a run starts.")
    privacy_cmds = privacy.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    plan = privacy_cmds.add_parser(
        "plan", help="the noise multiplier that meets a target epsilon",
        description="Find the smallest noise multiplier sigma (on a 0.001 grid) whose epsilon, under the chosen "
                    "accountant, is at most the target, then show what that sigma costs under both RDP and PLD. "
                    "Give the sampling rate directly or as expected clients per round out of a population.")
    plan.add_argument("--target-epsilon", type=positive_float, required=True, metavar="E",
                      help="privacy budget epsilon of the whole run")
    plan.add_argument("--delta", type=probability, required=True, metavar="D", help="delta of the guarantee")
    plan.add_argument("--rounds", type=positive_int, required=True, metavar="R", help="rounds of the run")
    rate = plan.add_mutually_exclusive_group()
    rate.add_argument("--sample-rate", type=sample_rate, metavar="q", help="Poisson sampling rate per round")
    rate.add_argument("--clients-per-round", type=positive_int, metavar="K",
                      help="expected clients per round (needs --population)")
    plan.add_argument("--population", type=positive_int, metavar="N", help="number of clients (with --clients-per-round)")
    plan.add_argument("--steps-per-round", type=positive_int, default=1, metavar="S",
                      help="noisy steps per round (local DP-SGD steps; 1 for DP-FedAvg, default)")
    plan.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                      help="accountant the plan must satisfy (default rdp, the conservative one)")
    plan.add_argument("--local", action="store_true",
                      help="local DP (dp.mode=local): the sigma each device adds to its own update; sampling "
                           "gives no amplification, so no rate is needed")
    plan.add_argument("--silo", action="store_true",
                      help="silos (fed.partition=silo): one user inside a sampled silo moves the silo's update by "
                           "up to 2C, so the relation is replace-one (user-level ε for silos)")
    ddp = plan.add_argument_group(
        "distributed DP (--distributed)",
        "dp.mode=distributed: each device adds discrete Gaussian noise inside the SecAgg+ field (Kairouz, Liu, "
        "Steinke 2021); the plan gives each device's noise, the grid step and both epsilons. See "
        "docs/DISTRIBUTED_DP.md.")
    ddp.add_argument("--distributed", action="store_true", help="plan distributed DP instead of central DP")
    ddp.add_argument("--bits", type=positive_int, nargs="+", default=[16], metavar="B",
                     help="SecAgg+ field bits per value, one plan each (default 16)")
    ddp.add_argument("--min-survivors", type=positive_int, metavar="N",
                     help="fewest devices a released round may sum (the noise is sized for them; rounds below "
                          "are abandoned)")
    ddp.add_argument("--max-cohort", type=positive_int, metavar="N",
                     help="most devices a round may sum (default: the 1-1e-9 quantile of the Poisson cohort, "
                          "from --population)")
    ddp.add_argument("--clip", type=positive_float, default=1.0, metavar="C", help="L2 clip of an update (default 1)")
    ddp.add_argument("--dim", type=positive_int, default=109_330, metavar="D",
                     help="values per update (default 109,330: ML-100K's item embeddings and biases at "
                          "model.dim=64)")
    ddp.add_argument("--wrap-probability", type=probability, default=1e-9, metavar="P",
                     help="bound on the probability that one round's noisy sum wraps the field (default 1e-9)")
    ddp.add_argument("--against", choices=("released", "server"), default="released",
                     help="which epsilon the target binds: the released models' (amplified by secret sampling, "
                          "default) or the server's (no amplification)")
    plan.set_defaults(handler=cmd_privacy_plan)

    # ---- report
    report = commands.add_parser("report", help="(re)write the privacy report of a run",
                                 description="(Re)write the privacy report of a run directory.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<timestamp>)")
    report.set_defaults(handler=cmd_report)

    # ---- audit
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
    leakage.add_argument("--run-dir", metavar="RUN_DIR", help="a run directory: its config, and audit.json written there")
    leakage.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    leakage.set_defaults(handler=cmd_audit_leakage)

    # ---- deploy
    from server.deploy.commands import HUB_PORT, PUBLIC_PORT, SUPERLINK_PORT
    from server.deploy.pki import CA_DAYS, MAX_CA_DAYS, MAX_SERVER_DAYS, SERVER_DAYS

    deploy = commands.add_parser(
        "deploy", help="deploy on Flower's SuperLink/SuperNodes (TLS, node auth)",
        description="Material and processes for a real deployment on Flower 1.42 (see docs/DEPLOY.md).")
    deploy_cmds = deploy.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    certs = deploy_cmds.add_parser(
        "certs", help="a CA and a SuperLink server certificate",
        description="Create a CA (ca.crt, ca.key) and a server certificate signed by it (server.pem, server.key) "
                    "valid for every --host (DNS names and IP addresses). ca.crt goes to every device and to "
                    "flwr; server.* stay on the server host; keep ca.key offline. --renew makes only a new "
                    "server certificate from an existing CA (devices keep their ca.crt).")
    certs.add_argument("--out", required=True, metavar="DIR", help="directory to write the files to")
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="a name devices use to reach the SuperLink, without scheme or port (repeatable; "
                            "localhost and 127.0.0.1 are always added)")
    certs.add_argument("--days", type=positive_int, default=SERVER_DAYS,
                       help=f"server certificate validity in days (default and maximum {MAX_SERVER_DAYS})")
    certs.add_argument("--ca-days", type=positive_int, default=CA_DAYS,
                       help=f"CA validity in days (default {CA_DAYS}, maximum {MAX_CA_DAYS})")
    certs.add_argument("--renew", action="store_true",
                       help="only a new server.pem/server.key, signed by DIR/ca.crt and --ca-key")
    certs.add_argument("--ca-key", metavar="FILE", help="the CA's private key for --renew (default DIR/ca.key)")
    certs.add_argument("--force", action="store_true",
                       help="overwrite existing files (a new CA: every device then needs the new ca.crt)")
    certs.set_defaults(handler=cmd_deploy_certs)
    keys = deploy_cmds.add_parser(
        "keys", help="SuperNode authentication key pairs (ECDSA P-384, OpenSSH format)",
        description="Create N key pairs PREFIX1.key/PREFIX1.pub ... The .pub files are registered on the server "
                    "(flwr supernode register KEY.pub CONNECTION); each .key goes to its device only.")
    keys.add_argument("--out", required=True, metavar="DIR", help="directory to write the keys to")
    keys.add_argument("-n", type=positive_int, default=1, metavar="N", help="how many key pairs (default 1)")
    keys.add_argument("--prefix", default="node", help="file name prefix (default node)")
    keys.add_argument("--force", action="store_true", help="overwrite existing key files")
    keys.set_defaults(handler=cmd_deploy_keys)
    items = deploy_cmds.add_parser(
        "items", help="the items file devices import before joining",
        description="Write items.csv (item_id,title, one row per model row) for a data source: the file every run "
                    "directory publishes, needed by devices before the first run (fedrec-client import --items).")
    items.add_argument("--data", default="ml-100k", metavar="SOURCE", help="the run's data.source (default ml-100k)")
    items.add_argument("--format", default="auto", choices=FORMATS, help="the run's data.format")
    items.add_argument("--item-file", default="", metavar="FILE", help="the run's data.item-file")
    items.add_argument("--out", default="items.csv", metavar="FILE", help="where to write it (default items.csv)")
    items.set_defaults(handler=cmd_deploy_items)
    app_key = deploy_cmds.add_parser(
        "app-key", help="the publisher key that signs app bundles (Ed25519)",
        description="Create publisher.key (0600: signs app bundles; keep it off the server if you can), "
                    "publisher.pub and trusted-entities.yaml (to every device: fedrec-client join "
                    "--trusted-entities).")
    app_key.add_argument("--out", required=True, metavar="DIR", help="directory to write the files to")
    app_key.add_argument("--force", action="store_true", help="overwrite existing files")
    app_key.set_defaults(handler=cmd_deploy_app_key)
    sign = deploy_cmds.add_parser(
        "sign", help="build this checkout's app bundle and sign it",
        description="flwr build of this checkout's Flower app (pyproject.toml, common/, client/, server/), signed "
                    "with the publisher key: NAME.fab and NAME.fab.sig.json in --out, what fedrec deploy server "
                    "serves to the SuperLink.")
    sign.add_argument("--key", required=True, metavar="FILE", help="publisher.key (fedrec deploy app-key)")
    sign.add_argument("--out", required=True, metavar="DIR", help="directory for the signed bundle (emptied of *.fab)")
    sign.set_defaults(handler=cmd_deploy_sign)
    server = deploy_cmds.add_parser(
        "server", help="the server host: nginx (public, Fleet API only), SuperLink (127.0.0.1), SuperExec, app hub",
        description="Start nginx on --host:--port (HTTPS; forwards only the Fleet API calls of SuperNodes), the "
                    "SuperLink on 127.0.0.1:--superlink-port (TLS, node auth, SQLite state, process isolation "
                    "with a SuperExec secret), its SuperExec and the app hub serving the signed bundle on "
                    "127.0.0.1:--hub-port; print how to use flwr on this host; stop everything on Ctrl-C.")
    server.add_argument("--tls", required=True, metavar="DIR", help="ca.crt, server.pem, server.key (deploy certs)")
    server.add_argument("--app-dir", required=True, metavar="DIR", help="the signed bundle (fedrec deploy sign)")
    server.add_argument("--workdir", default="server-state", metavar="DIR",
                        help="SuperLink state, logs, flwr config, secret (default server-state; kept private)")
    server.add_argument("--host", required=True, metavar="NAME_OR_IP",
                        help="the public address nginx listens on (one of the certificate's names)")
    server.add_argument("--port", type=positive_int, default=PUBLIC_PORT, help=f"public port (default {PUBLIC_PORT})")
    server.add_argument("--superlink-port", type=positive_int, default=SUPERLINK_PORT,
                        help=f"the SuperLink's port on 127.0.0.1 (default {SUPERLINK_PORT})")
    server.add_argument("--hub-port", type=positive_int, default=HUB_PORT,
                        help=f"the app hub's port on 127.0.0.1 (default {HUB_PORT})")
    server.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs are written (default runs)")
    server.set_defaults(handler=cmd_deploy_server)
    local = deploy_cmds.add_parser(
        "local", help="a whole deployment on this machine: the server host and one SuperNode per device store",
        description="Make TLS files, one key per device and a publisher key, sign this checkout's app bundle, "
                    "start the server host (as fedrec deploy server) and one SuperNode per device store given "
                    "(each with its own key and port, trusting only the publisher key), register the keys, wait "
                    "until every node is online, print how to start a run with flwr, stop everything on Ctrl-C.")
    local.add_argument("dbs", nargs="+", metavar="DB", help="device stores (fedrec-client --db DB import ...)")
    local.add_argument("--workdir", default="deploy-local", metavar="DIR",
                       help="TLS files, keys, logs, flwr config and SuperLink state (default deploy-local)")
    local.add_argument("--host", default="127.0.0.1", help="the proxy's address devices dial (default 127.0.0.1)")
    local.add_argument("--port", type=positive_int, help="the proxy's port (default: a free one)")
    local.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs are written (default runs)")
    local.set_defaults(handler=cmd_deploy_local)
    return parser


# ---------------------------------------------------------------- data
def cmd_data_fetch(args: argparse.Namespace) -> int:
    from common.data.embedded import fetch_ml100k
    from common.data.errors import DataUnavailableError
    from common.data.readers import read_atomic

    if args.wheel is not None and not Path(args.wheel).is_file():
        raise UserError(f"--wheel {args.wheel}: no such file")
    try:
        directory = fetch_ml100k(wheel=args.wheel)
    except DataUnavailableError as exc:
        raise UserError(str(exc)) from None
    print(f"MovieLens-100K (SHA-256 verified) in {directory}")
    print(read_atomic(directory, "ml-100k").summary())
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    data = _load(args.source, args.format, args.item_file)
    print(data.summary())
    print(f"ratings: {'explicit' if data.explicit else 'implicit (no rating column: every row counts as 1)'}")
    for line in data.report:
        print(f"note: {line}")
    return 0


def _load(source: str, fmt: str, item_file: str | None):  # -> Interactions
    from common.data import DataError, DataUnavailableError, load_interactions

    try:
        return load_interactions(source, fmt, item_file or None)
    except (DataError, DataUnavailableError) as exc:
        raise UserError(str(exc)) from None


# ---------------------------------------------------------------- train-central
def central_config(args: argparse.Namespace):  # -> RunConfig
    """The run config of ``train-central``: defaults, then flags, then ``--set`` (the last wins)."""
    from common.config import RunConfig

    flat: dict[str, Any] = {}
    for flag, key in CENTRAL_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            flat[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        flat[key.strip()] = value.strip()
    try:
        return RunConfig.from_flat(flat)
    except ValueError as exc:  # unknown key, wrong type, value out of range: the key is named
        raise UserError(str(exc)) from None


def cmd_train_central(args: argparse.Namespace) -> int:
    cfg = central_config(args)
    if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir():
        raise UserError(f"--runs-dir {args.runs_dir}: exists and is not a directory")
    from common.central import train_central
    from common.data.splits import split_interactions
    from common.serialization import write_json
    from server.run_dir import RunDir

    data = _load(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
    except ValueError as exc:
        raise UserError(f"cannot split {cfg.data.source}: {exc}") from None
    if len(split.train) == 0 or len(split.valid) == 0:
        raise UserError(f"{cfg.data.source}: too few interactions per user for a {cfg.data.split} split "
                        f"({len(split.train)} train, {len(split.valid)} validation rows)")
    print(f"{data.summary()}; split {cfg.data.split}: {len(split.train)} train, {len(split.valid)} valid, "
          f"{len(split.test)} test", flush=True)
    result = train_central(split, cfg.model, cfg.central, seed=cfg.seed, progress=not args.no_progress)

    run = RunDir.create(Path(args.runs_dir), cfg)
    # The item side only: user vectors of a central model are the server's, not part of the artefact.
    from common.models.mf.model import model_file

    run.save_model(*model_file(result.params))
    write_json(run.path / "central_metrics.json", {
        "valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
        "seconds_to_best": result.seconds_to_best, "seconds": result.seconds, "history": result.history,
        "split": cfg.data.split, "n_users": split.n_users, "n_items": split.n_items,
    })
    print(metrics_table(result.valid, result.test))
    print(f"best epoch {result.best_epoch} ({result.seconds_to_best:.1f} s of {result.seconds:.1f} s)")
    print(f"run directory {run.path}")
    return 0


def metrics_table(valid: dict[str, float], test: dict[str, float]) -> str:
    """A small table: one row per metric, validation and test columns (full ranking)."""
    def cell(values: dict[str, float], key: str) -> str:
        return f"{values[key]:.4f}" if key in values else "n/a"

    lines = [f"{'metric':<12} {'valid':>8} {'test':>8}"]
    lines += [f"{label:<12} {cell(valid, key):>8} {cell(test, key):>8}" for key, label in TABLE_METRICS]
    lines.append(f"{'users':<12} {int(valid.get('users', 0)):>8} {int(test.get('users', 0)):>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- privacy
def cmd_privacy_plan(args: argparse.Namespace) -> int:
    from common.privacy.ledger import Accountant
    from common.privacy.plan import format_plan, plan_noise_multiplier, sample_rate_from

    accountant = Accountant(args.accountant)
    if args.distributed:
        return _plan_distributed(args, accountant)
    if args.local:
        return _plan_local(args, accountant)
    if args.clients_per_round is not None:
        if args.population is None:
            raise UserError("--clients-per-round needs --population (the number of clients)")
        try:
            q = sample_rate_from(args.clients_per_round, args.population)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    elif args.sample_rate is None:
        raise UserError("give --sample-rate q or --clients-per-round K with --population N (or --local)")
    else:
        if args.population is not None:
            raise UserError("--population goes with --clients-per-round, not with --sample-rate")
        q = args.sample_rate
    from common.privacy.ledger import Relation

    relation = Relation.REPLACE_ONE if args.silo else Relation.ADD_OR_REMOVE_ONE
    common = {"delta": args.delta, "rounds": args.rounds, "sample_rate": q, "steps_per_round": args.steps_per_round,
              "relation": relation}
    try:
        sigma = plan_noise_multiplier(target_epsilon=args.target_epsilon, accountant=accountant, **common)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    unit = ("one user inside a silo, replace-one" if args.silo else
            "one user, add/remove (zero-out, population size public)")
    print(f"noise multiplier sigma = {sigma:.3f}  (smallest on a 0.001 grid with "
          f"{accountant.value.upper()} epsilon <= {args.target_epsilon:g} at delta = {args.delta:g}, q = {q:.4g}; "
          f"{unit}; amplification assumes secret cohorts)")
    print(format_plan(noise_multipliers=[sigma], target_epsilon=args.target_epsilon, **common))
    return 0


def _plan_local(args: argparse.Namespace, accountant) -> int:
    from common.privacy.ledger import Relation
    from common.privacy.plan import format_plan, plan_local_noise_multiplier

    if args.steps_per_round != 1:
        raise UserError("--steps-per-round does not apply to local DP (one noisy update per round)")
    try:
        sigma = plan_local_noise_multiplier(target_epsilon=args.target_epsilon, delta=args.delta,
                                            rounds=args.rounds, accountant=accountant)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"local DP: each device adds N(0, (sigma*C)^2) with sigma = {sigma:.3f} to its clipped update "
          f"({accountant.value.upper()} epsilon <= {args.target_epsilon:g} at delta = {args.delta:g} over "
          f"{args.rounds} rounds, every round charged, no amplification by sampling)")
    print("accounting per round: one Gaussian release under replace-one (two updates of a device differ by up to "
          "2C), q = 1:")
    print(format_plan(noise_multipliers=[sigma], target_epsilon=args.target_epsilon, delta=args.delta,
                      rounds=args.rounds, sample_rate=1.0, relation=Relation.REPLACE_ONE))
    return 0


def _plan_distributed(args: argparse.Namespace, accountant) -> int:
    from common.privacy.distributed_plan import cohort_bound, format_distributed_plans, plan_distributed
    from common.privacy.ledger import Accountant
    from common.privacy.plan import plan_noise_multiplier, sample_rate_from

    if args.local or args.silo:
        raise UserError("--distributed plans one user per device (add/remove); it does not combine with "
                        "--local or --silo")
    if accountant is not Accountant.RDP:
        raise UserError("--distributed is accounted by RDP only (no privacy-loss distribution exists for a sum "
                        "of discrete Gaussians): use --accountant rdp")
    if args.steps_per_round != 1:
        raise UserError("--steps-per-round does not apply to --distributed (one noisy sum per round)")
    if args.min_survivors is None:
        raise UserError("--distributed needs --min-survivors N (the SecAgg+ threshold or a minimum cohort)")
    try:
        if args.clients_per_round is not None:
            if args.population is None:
                raise UserError("--clients-per-round needs --population (the number of clients)")
            q = sample_rate_from(args.clients_per_round, args.population)
        elif args.sample_rate is not None:
            q = args.sample_rate
        else:
            raise UserError("give --sample-rate q or --clients-per-round K with --population N")
        if args.max_cohort is not None:
            max_cohort = args.max_cohort
        elif args.population is not None:
            max_cohort = cohort_bound(args.population, q, args.wrap_probability)
        else:
            raise UserError("--distributed needs --max-cohort N or --population N (the field is sized for the "
                            "largest cohort)")
        max_cohort = max(max_cohort, args.min_survivors)
        common = {"target_epsilon": args.target_epsilon, "delta": args.delta, "rounds": args.rounds,
                  "sample_rate": q, "min_survivors": args.min_survivors, "max_cohort": max_cohort,
                  "clip": args.clip, "dim": args.dim, "wrap_probability": args.wrap_probability,
                  "amplification": args.against == "released"}
        central = plan_noise_multiplier(target_epsilon=args.target_epsilon, delta=args.delta, rounds=args.rounds,
                                        sample_rate=q if args.against == "released" else 1.0)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    plans, refused = [], []
    for bits in args.bits:
        try:
            plans.append(plan_distributed(modulus_bits=bits, **common))
        except ValueError as exc:
            refused.append(f"{bits} bits: {exc}")
    expected = round(q * args.population) if args.population is not None else None
    target = "released models (amplified, secret cohorts)" if args.against == "released" else "the server"
    print(f"distributed DP: each device adds discrete Gaussian noise N_Z(0, sigma2_grid) in grid units of gamma "
          f"(device_std = gamma*sqrt(sigma2_grid) per value) to its update clipped to C = {args.clip:g} "
          f"({args.dim} values), sized so that {args.min_survivors} surviving devices carry the noise; "
          f"RDP epsilon <= {args.target_epsilon:g} for {target} at delta = {args.delta:g}, q = {q:.4g}, "
          f"{args.rounds} rounds; the field holds {max_cohort} devices with P(wrap) <= {args.wrap_probability:g} "
          f"per round")
    if plans:
        print(format_distributed_plans(plans, expected_cohort=expected))
    for line in refused:
        print(f"refused: {line}")
    print(f"central DP at the same target: sigma = {central:.3f}. z@n_min is what {args.min_survivors} devices' "
          f"noise amounts to; a round with K survivors carries sqrt(K/{args.min_survivors}) times more noise "
          f"than that" + (f" (x{math.sqrt(expected / args.min_survivors):.2f} at the expected {expected})"
                          if expected and expected >= args.min_survivors else "") + ".")
    print("eps_server: what the server (which knows the cohort) can learn, no amplification, n_min noise shares"
          + (f"; eps_server@{expected}: the same if all {expected} expected devices survive." if expected else "."))
    if not plans:
        raise UserError("no bit width could hold the noisy sum (see the lines above)")
    return 0


# ---------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    try:
        report = importlib.import_module("server.report")
    except ModuleNotFoundError as exc:
        if exc.name == "server.report":
            raise UserError("privacy report not available in this version") from None
        raise UserError(f"the privacy report needs {exc.name!r}: install it with pip install 'fedrec[server]'") from None
    try:
        written = report.write_report(run_dir)
    except (ValueError, FileNotFoundError) as exc:  # not a run dir, a run without a ledger, ...
        raise UserError(f"{run_dir}: {exc}") from None
    for path in [written] if isinstance(written, (str, Path)) else written:
        print(path)
    return 0


# ---------------------------------------------------------------- audit
def cmd_audit_leakage(args: argparse.Namespace) -> int:
    import json

    from common.config import RunConfig

    run_dir = Path(args.run_dir) if args.run_dir else None
    flat: dict[str, Any] = {}
    if run_dir is not None:
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir}: no config.json, not a run directory")
        try:
            flat = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir / 'config.json'}: not valid JSON ({exc})") from None
    if args.data is not None:
        flat["data.source"] = args.data
    try:
        cfg = RunConfig.from_flat(flat)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json is not None and Path(args.json).is_dir():
        raise UserError(f"--json {args.json}: is a directory")
    from common.audit import format_audit, leakage_audit, write_audit
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.serialization import write_json

    data = _load(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
        figures = leakage_audit(EvalSets.from_split(split), cfg, clients=args.clients, rounds=args.rounds,
                                seed=args.seed)
    except ValueError as exc:  # too few users for --clients, a split that cannot be made
        raise UserError(f"{cfg.data.source}: {exc}") from None
    print(format_audit(figures))
    if run_dir is not None:
        print(write_audit(run_dir, figures))
    if args.json is not None:
        write_json(Path(args.json), figures)
        print(args.json)
    return 0


# ---------------------------------------------------------------- deploy
def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist(s); --force overwrites")


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from server.deploy.pki import DEFAULT_HOSTS, make_ca_and_certs, make_server_cert, validate_hosts

    out = Path(args.out)
    try:
        hosts = validate_hosts([*args.host, *DEFAULT_HOSTS])
        if args.renew:
            ca_key = Path(args.ca_key) if args.ca_key else out / "ca.key"
            for needed in (out / "ca.crt", ca_key):
                if not needed.is_file():
                    raise UserError(f"{needed}: no such file (--renew signs with an existing CA)")
            cert, key = make_server_cert(out, hosts, ca_cert=out / "ca.crt", ca_key=ca_key, days=args.days)
            print(f"new server certificate for {', '.join(hosts)}: {cert}, {key} (0600); restart the SuperLink "
                  f"and the proxy. Devices keep their ca.crt.")
            return 0
        _refuse_overwrite([out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")], args.force)
        files = make_ca_and_certs(out, hosts, days=args.days, ca_days=args.ca_days)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"server certificate for {', '.join(hosts)} (valid {args.days} days; CA {args.ca_days} days)")
    print(f"  {files.ca_cert}     CA certificate: to every device (--root-certificates) and to flwr")
    print(f"  {files.server_cert}  SuperLink and proxy certificate")
    print(f"  {files.server_key}  its private key (0600)")
    print(f"  {files.ca_key}      CA private key (0600): keep it offline; only needed for --renew")
    return 0


def cmd_deploy_keys(args: argparse.Namespace) -> int:
    from server.deploy import make_node_keys

    out = Path(args.out)
    _refuse_overwrite([out / f"{args.prefix}{i}.{ext}" for i in range(1, args.n + 1) for ext in ("key", "pub")],
                      args.force)
    for pair in make_node_keys(out, args.n, prefix=args.prefix):
        print(f"{pair.private} (to its device only)   register: flwr supernode register {pair.public} CONNECTION")
    return 0


def cmd_deploy_items(args: argparse.Namespace) -> int:
    from server.deploy import write_catalog

    _load(args.data, args.format, args.item_file)  # a bad source ends here with its file and line
    out = write_catalog(args.out, source=args.data, fmt=args.format, item_file=args.item_file)
    print(f"{out}: the item list of {args.data} (devices: fedrec-client import --items {out.name})")
    return 0


def cmd_deploy_app_key(args: argparse.Namespace) -> int:
    from server.deploy.signing import make_publisher_key

    out = Path(args.out)
    _refuse_overwrite([out / n for n in ("publisher.key", "publisher.pub", "trusted-entities.yaml")], args.force)
    key = make_publisher_key(out)
    print(f"  {key.private}  signs app bundles (0600): fedrec deploy sign --key {key.private}")
    print(f"  {key.trusted_entities}  to every device: fedrec-client join --trusted-entities (key id {key.key_id})")
    return 0


def cmd_deploy_sign(args: argparse.Namespace) -> int:
    from server.deploy.errors import DeployError
    from server.deploy.signing import build_fab, sign_fab

    out = Path(args.out)
    if not Path(args.key).is_file():
        raise UserError(f"--key {args.key}: no such file (fedrec deploy app-key makes one)")
    for old in out.glob("*.fab*"):  # the hub serves exactly one bundle
        old.unlink()
    try:
        app = sign_fab(build_fab(out), args.key)
    except (ValueError, DeployError) as exc:
        raise UserError(str(exc)) from None
    print(f"{app.fab} signed ({app.signature.name}); runs name it {app.app_spec}")
    return 0


def _watch(procs: Callable[[], list]) -> int:
    """Sleep until Ctrl-C/SIGTERM (130) or until one of ``procs()`` exits (a UserError)."""
    import time

    from server import deploy

    while True:
        time.sleep(2)
        dead = [p for p in procs() if p is not None and not p.alive()]
        if dead:
            raise UserError(f"{dead[0].name} exited with status {dead[0].popen.returncode}; its log "
                            f"{dead[0].log} ends:\n{deploy.tail(dead[0].log)}")


def _foreground(start: Callable[[], Any], body: Callable[[Any], int], what: str) -> int:
    """Run ``body(start())`` with SIGTERM and SIGINT turned into a clean stop of everything."""
    import signal

    from server.deploy.errors import DeployError

    def on_signal(signum, frame):  # noqa: ARG001 - SIGTERM (and SIGINT, even if inherited as ignored) stop everything
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with start() as running:
            return body(running)
    except (DeployError, ValueError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"stopped: {what}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_deploy_server(args: argparse.Namespace) -> int:
    from server.deploy.pki import TLSFiles
    from server.deploy.serverhost import ServerHost
    from server.deploy.signing import load_signed_app

    tls_dir = Path(args.tls)
    tls = TLSFiles(tls_dir / "ca.crt", tls_dir / "server.pem", tls_dir / "server.key")
    missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)}: no such file (fedrec deploy certs --out {args.tls} ...)")
    try:
        app = load_signed_app(args.app_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    def start() -> ServerHost:
        return ServerHost(args.workdir, tls=tls, app=app, public_host=args.host, public_port=args.port,
                          superlink_port=args.superlink_port, hub_port=args.hub_port, runs_dir=args.runs_dir)

    def body(host: ServerHost) -> int:
        print(f"devices: fedrec-client join --superlink {host.address} --root-certificates ca.crt "
              f"--trusted-entities trusted-entities.yaml --auth-key KEY")
        print(f"SuperLink on {host.control_address} (loopback only; state {host.database}); runs go to "
              f"{host.runs_dir}. On this host:\n")
        print(host.connection_help())
        print("\nCtrl-C stops everything.", flush=True)
        return _watch(host.processes)

    return _foreground(start, body, "nginx, SuperLink, SuperExec, hub")


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from client.store import DeviceStore, StoreError
    from server import deploy

    catalogs = set()
    for db in args.dbs:
        try:
            with DeviceStore(db, create=False) as store:
                catalog = store.catalog()[0]
        except StoreError as exc:
            raise UserError(str(exc)) from None
        if not catalog:
            raise UserError(f"{db}: no item catalogue; import the server's items file first "
                            "(fedrec-client --db DB import --items items.csv)")
        catalogs.add(catalog)
    if len(catalogs) > 1:
        raise UserError("the device stores hold different item catalogues: import the same items file into each")
    if not (deploy.PROJECT_ROOT / "pyproject.toml").is_file():
        raise UserError(f"no pyproject.toml in {deploy.PROJECT_ROOT}: run from a fedrec source checkout")

    def start() -> deploy.Deployment:
        return deploy.Deployment(args.workdir, args.dbs, host=args.host, port=args.port, runs_dir=args.runs_dir)

    def body(fed: deploy.Deployment) -> int:
        print(f"proxy on {fed.address} (Fleet API only), SuperLink on {fed.control_address} (TLS: "
              f"{fed.tls.ca_cert.parent}, state: {fed.database})")
        for i, node in enumerate(fed.nodes, 1):
            print(f"  SuperNode {i}: {node.db} (node id {node.node_id}, runtime port {node.port}, "
                  f"log {node.proc.log})")
        print(f"{len(fed.nodes)} SuperNodes online, running only bundles signed by {fed.publisher.public}; runs are "
              f"written to {fed.runs_dir}. Start a run with\n")
        print(fed.connection_help())
        print("\n(the run's data.source must give the items file the devices imported). Ctrl-C stops everything.",
              flush=True)
        return _watch(lambda: [*fed.server.processes(), *(n.proc for n in fed.nodes)])

    return _foreground(start, body, "SuperLink, SuperExec, proxy, hub and SuperNodes")


# ---------------------------------------------------------------- entry point
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
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
