"""``fedrec train-central``: the centralised MF baseline every federated run is compared to."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.choices import DataFormat, Loss, Split, values
from common.cli import UsageError, config_from_flags
from server.cli._args import any_int, load_data, positive_float, positive_int

# train-central flag -> flat config key (the keys --set takes, here and in simulate.py)
CENTRAL_FLAGS = {
    "data": "data.source", "format": "data.format", "item_file": "data.item-file", "split": "data.split",
    "epochs": "central.epochs", "lr": "central.lr", "dim": "model.dim", "loss": "model.loss", "seed": "seed",
}
# metric key -> label in the train-central table
TABLE_METRICS = (("ndcg@10", "NDCG@10"), ("recall@10", "Recall@10"), ("hr@10", "HR@10"), ("mrr@10", "MRR@10"),
                 ("coverage@10", "coverage@10"), ("novelty@10", "novelty@10"))


def add_central_commands(commands: argparse._SubParsersAction) -> None:
    central = commands.add_parser(
        "train-central", help="train the centralised MF baseline",
        description="Train the centralised matrix-factorisation baseline (the number every federated run "
                    "is compared to), early-stopped on validation NDCG@10, and write a run directory "
                    "(config.json, central_metrics.json, model.safetensors).")
    central.add_argument("--data", metavar="SOURCE", help="'ml-100k' (embedded, default) or a path to your data")
    central.add_argument("--format", choices=values(DataFormat), help="file format of --data (default: auto-detect)")
    central.add_argument("--item-file", metavar="FILE", help="item file item,title[,text] for generic data")
    central.add_argument("--split", choices=values(Split),
                         help=f"{Split.RANDOM} (RecBole 80/10/10 per user, default), {Split.LEAVE_LAST_OUT}, "
                              f"{Split.COLD_ITEM}")
    central.add_argument("--epochs", type=positive_int, help="maximum epochs (default 60)")
    central.add_argument("--dim", type=positive_int, help="embedding dimension (default 64)")
    central.add_argument("--loss", choices=values(Loss), help=f"training loss (default {Loss.SOFTMAX})")
    central.add_argument("--lr", type=positive_float, help="Adam learning rate (default 0.01)")
    central.add_argument("--seed", type=any_int, help="seed of initialisation and batching (default 0)")
    central.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="any config key, e.g. central.patience=10 or data.seed=1 (repeatable)")
    central.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run directories go (default runs)")
    central.add_argument("--no-progress", action="store_true", help="no progress bar")
    central.set_defaults(handler=cmd_train_central)


def central_config(args: argparse.Namespace):  # -> RunConfig
    """The run config of ``train-central``: defaults, then flags, then ``--set`` (the last wins);
    a mistake is a UsageError naming the key."""
    return config_from_flags(args, CENTRAL_FLAGS)


def cmd_train_central(args: argparse.Namespace) -> int:
    cfg = central_config(args)
    if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir():
        raise UsageError(f"--runs-dir {args.runs_dir}: exists and is not a directory")
    from common.central import train_central
    from common.data.splits import split_interactions
    from common.serialization import write_json
    from server.run_dir import RunDir

    data = load_data(cfg.data.source, cfg.data.format, cfg.data.item_file)
    try:
        split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
    except ValueError as exc:
        raise UsageError(f"cannot split {cfg.data.source}: {exc}") from None
    if len(split.train) == 0 or len(split.valid) == 0:
        raise UsageError(f"{cfg.data.source}: too few interactions per user for a {cfg.data.split} split "
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

