"""Flower ServerApp: builds the strategy and runs Flower's ``DefaultWorkflow`` (legacy path,
the one SecAgg+ supports in Flower 1.42)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from common.config import RunConfig
from common.data import load_interactions
from common.federated import make_server_optimizer
from common.mf import init_items
from server.grid import BoundedGrid
from server.run_dir import RunDir
from server.strategy import FedRecStrategy

log = logging.getLogger(__name__)


def load_catalog(cfg: RunConfig) -> tuple[tuple[str, ...], list[str]]:
    """The item catalogue (public: ids and titles, in model-row order), not who rated what."""
    data = load_interactions(cfg.data.source, cfg.data.format, cfg.data.item_file or None)
    titles = [info.title + (f" ({info.year})" if info.year else "") for info in data.items]
    return data.item_ids, titles


class _Progress:
    """One tqdm bar over rounds: participants, loss and the latest NDCG@10."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=start, desc="federated rounds", unit="round", disable=not enabled)
        self.post: dict[str, str] = {}

    def __call__(self, row: dict[str, Any]) -> None:
        if row.get("kind") == "fit":
            self.post.update(clients=str(row["participants"]), loss=f"{row.get('train_loss', float('nan')):.3f}")
            self.bar.update(1)
        elif "ndcg@10" in row:
            self.post[f"{row['phase']} ndcg@10"] = f"{row['ndcg@10']:.4f}"
        self.bar.set_postfix(self.post, refresh=True)

    def close(self) -> None:
        self.bar.close()


def run_server(grid: Grid, context: Context, cfg: RunConfig, run_dir: RunDir, *, expected_clients: int | None,
               progress: bool, stop_after: int | None = None) -> FedRecStrategy:
    item_ids, titles = load_catalog(cfg)
    run_dir.save_items(item_ids, titles)  # devices map their item ids to model rows with it
    params = init_items(len(item_ids), cfg.model.dim, seed=cfg.seed, scale=cfg.model.init_scale)
    optimizer = make_server_optimizer(cfg.fed, cfg.model)
    start, extra = 0, {}
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        start, params, opt_state, extra = checkpoint
        optimizer.load_state_dict(opt_state)
        run_dir.truncate_metrics(start)
        log.info("resuming %s after round %d", run_dir.path, start)
    bar = _Progress(cfg.fed.rounds, start, progress)
    strategy = FedRecStrategy(cfg, run_dir, params, optimizer, start_round=start, on_round=bar)
    if strategy.ledger is not None and "ledger" in extra:
        strategy.ledger.load_state_dict(extra["ledger"])  # ε spent before the interruption stays spent
    strategy.expected_clients = expected_clients
    strategy.stop_after = stop_after
    remaining = cfg.fed.rounds - start
    t0 = time.perf_counter()
    fit_workflow = None
    if cfg.secagg.enabled:
        strategy.secure_aggregation = True
        fit_workflow = SecAggPlusWorkflow(
            num_shares=cfg.secagg.num_shares, reconstruction_threshold=cfg.secagg.reconstruction_threshold,
            max_weight=1.0,  # every client weighs 1 (num_examples = 1)
            clipping_range=cfg.dp.clip,  # = the client's clip bound: the protocol never clips
            quantization_range=2 ** cfg.secagg.quantization_bits, timeout=cfg.fed.timeout)
        strategy.secagg_workflow = fit_workflow
    if remaining > 0:
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        strategy.grid = BoundedGrid(grid, cfg.fed.timeout, strategy.note_failure)
        DefaultWorkflow(fit_workflow=fit_workflow)(strategy.grid, legacy)
    bar.close()
    strategy.elapsed = time.perf_counter() - t0
    if stop_after is None or stop_after >= cfg.fed.rounds:
        run_dir.save_model(strategy.params)
    try:
        from server.report import write_report

        write_report(run_dir.path)
    except Exception:  # the model is saved; `fedrec report RUN_DIR` can retry the report
        log.exception("could not write the privacy report for %s", run_dir.path)
    return strategy


def build_server_app(cfg: RunConfig, run_dir: RunDir, *, expected_clients: int | None = None,
                     progress: bool = True, result: dict[str, Any] | None = None,
                     stop_after: int | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = run_server(grid, context, cfg, run_dir, expected_clients=expected_clients, progress=progress,
                              stop_after=stop_after)
        if result is not None:
            result["strategy"] = strategy

    return app


# `flwr run .`: the config comes from [tool.flwr.app.config]; runs go to $FEDREC_RUNS or ./runs.
app = ServerApp()


@app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(dict(context.run_config))
    run_dir = RunDir.create(Path(os.environ.get("FEDREC_RUNS", "runs")), cfg)
    run_server(grid, context, cfg, run_dir, expected_clients=None, progress=False)
