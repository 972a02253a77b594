"""Flower ServerApp: builds the strategy and runs Flower's ``DefaultWorkflow`` (legacy path,
the one SecAgg+ supports in Flower 1.42)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from common.config import RunConfig
from common.data.catalog import load_catalog
from common.data.texts import item_texts
from common.models import build_model
from common.rounds import RoundEngine
from common.serialization import write_json
from server.run_dir import RunDir
from server.secagg import SecAggPlusWorkflowWithEarlyDropouts
from server.strategy import FedRecStrategy

log = logging.getLogger(__name__)


class _Progress:
    """One tqdm bar over rounds: participants, loss and the latest NDCG@10."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=start, desc="federated rounds", unit="round", disable=not enabled)
        self.post: dict[str, str] = {}

    def __call__(self, row: dict[str, Any]) -> None:
        if row.get("kind") == "fit":
            self.post["clients"] = str(row["participants"])
            loss = row.get("train_loss", float("nan"))
            if math.isfinite(loss):
                self.post["loss"] = f"{loss:.3f}"
            else:  # under SecAgg+ (and local or distributed DP) the devices keep their loss
                self.post.pop("loss", None)
            self.bar.update(1)
        elif "ndcg@10" in row:
            self.post[f"{row['phase']} ndcg@10"] = f"{row['ndcg@10']:.4f}"
        self.bar.set_postfix(self.post, refresh=True)

    def close(self) -> None:
        self.bar.close()


def run_server(grid: Grid, context: Context, cfg: RunConfig, run_dir: RunDir, *, expected_clients: int | None,
               progress: bool, stop_after: int | None = None) -> FedRecStrategy:
    item_ids, titles = load_catalog(cfg.data)
    run_dir.save_items(item_ids, titles, item_texts(cfg.data))  # devices map their item ids to model rows with it
    model = build_model(cfg.model, n_items=len(item_ids), seed=cfg.seed, texts=lambda: item_texts(cfg.data))
    engine, start = RoundEngine(cfg, model), 0
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        start, named, opt_state, extra = checkpoint
        engine = RoundEngine.restore(cfg, model, named, opt_state, extra)  # ε spent before stays spent
        run_dir.truncate_metrics(start)
        log.info("resuming %s after round %d", run_dir.path, start)
    if engine.distributed and not cfg.secagg.enabled:
        raise ValueError("dp.mode = distributed needs secagg.enabled = true: a device's encoding carries a 1/m share "
                         "of the noise, and only SecAgg+ keeps it from the server (devices refuse otherwise)")
    if engine.distributed and expected_clients and engine.ddp.plan is None:
        engine.ddp.ensure_plan(expected_clients)  # an infeasible budget or field fails here, before round 1
    fit_workflow = None
    if cfg.secagg.enabled:
        fit_workflow = SecAggPlusWorkflowWithEarlyDropouts(
            num_shares=cfg.secagg.num_shares, reconstruction_threshold=cfg.secagg.reconstruction_threshold,
            max_weight=1.0,  # every client weighs 1 (num_examples = 1)
            clipping_range=engine.value_bound(secure_aggregation=True),  # ±ρ·C: clips only when secagg.value-range < 1
            quantization_range=2 ** cfg.secagg.quantization_bits, timeout=cfg.fed.timeout)
        engine.device_clip(secure_aggregation=True)  # refuses a bit width too coarse for this model, before round 1
    bar = _Progress(cfg.fed.rounds, start, progress)
    strategy = FedRecStrategy(cfg, run_dir, engine, grid, start_round=start, secagg_workflow=fit_workflow,
                              expected_clients=expected_clients, stop_after=stop_after, on_round=bar)
    remaining = cfg.fed.rounds - start
    t0 = time.perf_counter()
    if remaining > 0:
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        DefaultWorkflow(fit_workflow=fit_workflow)(strategy.grid, legacy)
    bar.close()
    strategy.elapsed = time.perf_counter() - t0
    if stop_after is None or stop_after >= cfg.fed.rounds:
        run_dir.save_model(model.named(engine.params), model.metadata(engine.params))
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


def flwr_run_dir(cfg: RunConfig, root: Path) -> RunDir:
    """The run directory of a ``flwr run``: ``run-dir`` when set (absolute, or relative to
    ``root``), created with its config.json when new and resumed when it exists -- after
    checking that the config is the run's own (``run-dir`` itself is not compared); without
    ``run-dir`` a new ``root/<timestamp>/``."""
    if not cfg.run_dir:
        return RunDir.create(root, cfg)
    path = Path(cfg.run_dir).expanduser()
    path = path if path.is_absolute() else root / path
    run_dir = RunDir(path)
    if (path / "config.json").is_file():
        run_dir.check_resume(cfg)  # ConfigMismatchError names what changed; the run then fails
        if run_dir.load_checkpoint() is None and (path / "metrics.jsonl").is_file():
            run_dir.truncate_metrics(0)  # an attempt that never completed a round: start clean
        log.info("run-dir %s exists: resuming it", path)
        return run_dir
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"run-dir {path}: exists and is not a fedrec run directory (no config.json); "
                         "give a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", cfg.to_flat())
    return run_dir


def _is_simulation(grid: Grid) -> bool:
    """Whether this ServerApp runs in Flower's simulation engine (``flwr run`` against a
    simulation federation: the in-memory grid), not on a SuperLink with real SuperNodes."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: treat it as a deployment (no population check)
        return False
    return isinstance(grid, InMemoryGrid)


def wait_for_simulated_nodes(grid: Grid, clients: int, timeout: float) -> None:
    """A simulation federation must have one SuperNode per client (its partition-id 0..n-1 is
    the client): wait until Flower has registered them (it does so while the ServerApp starts)
    and refuse a federation of another size -- fewer nodes would leave clients out of every
    cohort unnoticed, more would fail on partitions the data does not have."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        nodes = len(grid.get_node_ids())
        if nodes == clients:
            return
        if nodes != seen:
            seen, since = nodes, time.monotonic()
        elif nodes > 0 and time.monotonic() - since > 2.0:  # Flower registers all nodes at once
            break
        time.sleep(0.1)
    raise ValueError(f"this simulation federation has {seen} SuperNodes and the data {clients} clients: "
                     f"start the run with --federation-config 'num-supernodes={clients}' (docs/SCALE.md)")


# `flwr run .`: the config comes from [tool.flwr.app.config] (+ --run-config); runs go to
# run-dir when set, else to a new $FEDREC_RUNS/<timestamp>/ (default ./runs).
app = ServerApp()


@app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(dict(context.run_config))
    expected = None
    if _is_simulation(grid):  # `flwr run` against a local simulation federation: as simulate.py runs it
        from client.data import num_clients
        from server import vce_polling

        # Before Flower's engine starts its polling thread (it first starts Ray): see vce_polling.
        vce_polling.install()
        expected = num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed)
        wait_for_simulated_nodes(grid, expected, cfg.fed.timeout)
    run_dir = flwr_run_dir(cfg, Path(os.environ.get("FEDREC_RUNS", "runs")))
    t0 = time.perf_counter()
    strategy = run_server(grid, context, cfg, run_dir, expected_clients=expected, progress=False)
    from server.simulation import summarize  # the summary.md simulate.py writes

    print(summarize(run_dir, {"num_clients": expected or strategy.population,
                              "wall_seconds": time.perf_counter() - t0}), flush=True)  # `flwr log RUN_ID` shows it
