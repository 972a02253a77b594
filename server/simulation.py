"""The main job: a federated simulation on one machine with Flower's simulation engine (Ray).

``simulate.py`` at the repository root is its entry point (``python simulate.py --help``);
benchmarks and tests import :func:`parse_args`, :func:`build_config`, :func:`run` and
:func:`summarize` from here. Flags become config keys through :func:`common.cli.config_from_flags`,
as ``fedrec train-central``'s do, and a mistake in them ends as one line
``simulate.py: error: ...``, exit status 2 (:class:`common.cli.UsageError`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from common.choices import DataFormat, DPMode, Loss, ModelKind, Partition, ServerOptimizer, Split, values  # noqa: E402
from common.cli import UsageError, config_from_flags, report_error  # noqa: E402
from common.config import RunConfig  # noqa: E402

PROG = "simulate.py"
DESCRIPTION = """\
Federated simulation on one machine with Flower's simulation engine (Ray).

    python simulate.py                      # ML-100K, one client per user, defaults from RunConfig
    python simulate.py --rounds 50 --sample-rate 0.2
    python simulate.py --resume runs/20261127-220000
    python simulate.py --model hybrid       # + MiniLM text part (frozen + head; --lora adds LoRA)

Writes runs/<timestamp>/ (see server/run_dir.py) and prints a summary table.
"""

# flag -> flat config key
FLAGS = {
    "data": "data.source", "format": "data.format", "item_file": "data.item-file", "split": "data.split",
    "rounds": "fed.rounds", "sample_rate": "fed.sample-rate", "local_epochs": "fed.local-epochs",
    "client_lr": "fed.client-lr", "server_lr": "fed.server-lr", "server_opt": "fed.server-opt",
    "eval_every": "fed.eval-every", "eval_clients": "fed.eval-clients", "partition": "fed.partition",
    "test_clients": "fed.test-clients", "num_silos": "fed.num-silos",
    "timeout": "fed.timeout", "dim": "model.dim", "loss": "model.loss", "seed": "seed",
    "noise_multiplier": "dp.noise-multiplier", "clip": "dp.clip", "target_epsilon": "dp.target-epsilon",
    "delta": "dp.delta", "model": "model.kind",
}
# store_true flag -> (flat config key, the value it sets)
SWITCHES = {"lora": ("model.lora", True), "no_dp": ("dp.enabled", False), "no_secagg": ("secagg.enabled", False)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """simulate.py's options: the flags of :data:`FLAGS` and :data:`SWITCHES`, ``--set``, and what
    is not a config key (resume, CPUs per client, logging)."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RunConfig().to_flat()
    p.add_argument("--data",
                   help=f"'ml-100k' (embedded) or a path to MovieLens/CSV/Parquet data (default {d['data.source']})")
    p.add_argument("--format", choices=values(DataFormat), help="file format of --data (default: auto-detect)")
    p.add_argument("--item-file", help="item file (item,title[,text]) for generic data")
    p.add_argument("--split", choices=values(Split),
                   help=f"{Split.RANDOM} (RecBole 80/10/10), {Split.LEAVE_LAST_OUT}, {Split.COLD_ITEM}")
    p.add_argument("--rounds", type=int, help=f"federated rounds (default {d['fed.rounds']})")
    p.add_argument("--sample-rate", type=float, help=f"Poisson sampling rate q (default {d['fed.sample-rate']})")
    p.add_argument("--clients-per-round", type=int, help="expected clients per round (sets q = this / clients)")
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--client-lr", type=float)
    p.add_argument("--server-lr", type=float)
    p.add_argument("--server-opt", choices=values(ServerOptimizer))
    p.add_argument("--eval-every", type=int, help="validate every N rounds")
    p.add_argument("--eval-clients", type=int, help="clients used for validation during training (0 = all)")
    p.add_argument("--test-clients", type=int,
                   help="clients the final test evaluates: a secret random sample of N, its metrics with a 95%% "
                        f"confidence interval (default {d['fed.test-clients']}: all clients, exact)")
    p.add_argument("--partition", choices=values(Partition), help="one user per client, or K silos")
    p.add_argument("--num-silos", type=int)
    p.add_argument("--timeout", type=float, help="seconds a round waits for clients")
    p.add_argument("--dim", type=int)
    p.add_argument("--loss", choices=values(Loss))
    p.add_argument("--model", choices=values(ModelKind),
                   help="mf, or hybrid: item vector = free embedding + head(MiniLM(item text)), trained federated")
    p.add_argument("--lora", action="store_true", help="hybrid: train LoRA adapters of MiniLM too (costly on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy (the report then says so)")
    p.add_argument("--no-secagg", action="store_true", help="send updates WITHOUT secure aggregation (to compare)")
    p.add_argument("--local-dp", action="store_true",
                   help="local DP: each device noises its own update (σ planned for --target-epsilon unless given)")
    p.add_argument("--distributed-dp", action="store_true",
                   help="distributed DP: each device adds its share of discrete Gaussian noise inside SecAgg+, the "
                        "server only sums (planned for --target-epsilon; field bits: --set dp.bits=N, default 20)")
    p.add_argument("--noise-multiplier", type=float, help="DP noise multiplier σ")
    p.add_argument("--clip", type=float, help="DP clipping norm C of one client's update")
    p.add_argument("--target-epsilon", type=float, help="stop before a round whose release would exceed this ε")
    p.add_argument("--delta", type=float, help="DP δ")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. fed.rounds=10")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round")
    p.add_argument("--stop-after", type=int, metavar="ROUND",
                   help="stop cleanly after this round; continue later with --resume")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per simulated client (Ray)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="run on an existing Ray cluster, e.g. 10.0.0.5:6379 (docs/SCALE.md); default: start Ray here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    return p


def _local_dp(cfg: RunConfig, *, planned: bool) -> RunConfig:
    """``dp.mode = local``; σ planned so the run's rounds fit the target ε (local DP needs ~14×
    the central σ: no amplification by sampling, sensitivity 2C)."""
    if not cfg.dp.enabled:
        raise UsageError("--local-dp and --no-dp contradict each other")
    sigma = cfg.dp.noise_multiplier
    if planned:
        if cfg.dp.target_epsilon <= 0:
            raise UsageError("--local-dp without --target-epsilon needs --noise-multiplier")
        from common.privacy import Accountant, plan_local_noise_multiplier

        sigma = plan_local_noise_multiplier(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta,
                                            rounds=cfg.fed.rounds, accountant=Accountant(cfg.dp.accountant))
    return cfg.replace(**{"dp.mode": DPMode.LOCAL, "dp.noise-multiplier": sigma})


def build_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The run's config: ``base`` (a resumed run's own, else the defaults), the flags, ``--set``;
    then local DP or silos planned, ``--clients-per-round`` turned into q. Mistakes raise
    :class:`UsageError` (a bad data file: its DataError)."""
    cfg = config_from_flags(args, FLAGS, switches=SWITCHES, base=base)
    if getattr(args, "local_dp", False):
        cfg = _local_dp(cfg, planned=args.noise_multiplier is None)
    if getattr(args, "distributed_dp", False):
        if getattr(args, "local_dp", False) or not cfg.dp.enabled or not cfg.secagg.enabled:
            raise UsageError("--distributed-dp needs DP and SecAgg+ on (not with --local-dp, --no-dp or --no-secagg)")
        cfg = cfg.replace(**{"dp.mode": DPMode.DISTRIBUTED})
    if args.clients_per_round is not None:
        from client.data import num_clients

        n = num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed)
        cfg = cfg.replace(**{"fed.sample-rate": min(1.0, args.clients_per_round / n)})
    if (base is None and getattr(args, "partition", None) == Partition.SILO and args.noise_multiplier is None
            and cfg.dp.enabled and cfg.dp.mode == DPMode.CENTRAL and cfg.dp.target_epsilon > 0):
        cfg = _silo_dp(cfg)
    return cfg


def _silo_dp(cfg: RunConfig) -> RunConfig:
    """σ planned for silos: one user inside a sampled silo moves its silo's update by up to 2C
    (replace-one), which needs more noise than the user-level default for the same ε."""
    from common.privacy import Accountant, Relation, plan_noise_multiplier

    sigma = plan_noise_multiplier(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta, rounds=cfg.fed.rounds,
                                  sample_rate=cfg.fed.sample_rate, accountant=Accountant(cfg.dp.accountant),
                                  relation=Relation.REPLACE_ONE)
    print(f"silos: noise multiplier planned for a user inside a silo (replace-one): sigma = {sigma:.3f}", flush=True)
    return cfg.replace(**{"dp.noise-multiplier": sigma})


def _plan_distributed(cfg: RunConfig, population: int) -> None:
    """Distributed DP's plan before Ray starts: a budget or field it cannot meet is a usage error
    (the server makes the same plan at round 1)."""
    from common.data.catalog import load_catalog
    from common.data.texts import item_texts
    from common.ddp_round import DistributedRounds
    from common.models import build_model

    model = build_model(cfg.model, n_items=len(load_catalog(cfg.data)[0]), seed=cfg.seed,
                        texts=lambda: item_texts(cfg.data))
    dim = sum(int(a.size) for a in model.arrays(model.init(cfg.seed)))  # what the devices encode
    try:
        DistributedRounds(cfg, dim).ensure_plan(population)
    except ValueError as exc:
        raise UsageError(f"dp.mode=distributed: {exc}") from None


class _WarningsOnly(logging.Filter):
    """Flower resets its logger's level when a simulation starts; a filter survives that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not verbose:
        flwr_logger.addFilter(_WarningsOnly())
        logging.getLogger("ray").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")


def connect_ray(address: str, *, verbose: bool = False) -> dict[str, float]:
    """Join an existing Ray cluster (``ray start --head`` on one machine, ``ray start --address``
    on the others) before Flower starts its backend, which then uses it as it is (Flower only
    initialises Ray when it is not yet). Returns the cluster's resources. Every node must have
    fedrec installed in the same Python (docs/SCALE.md). ConnectionError when no cluster answers."""
    import socket

    import ray

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"--ray-address {address!r}: expected HOST:PORT of a Ray head, e.g. 10.0.0.5:6379")
    try:  # Ray itself would retry for minutes before it says no
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConnectionError(f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
                              "`ray start --head` (docs/SCALE.md)") from None
    if ray.is_initialized():
        ray.shutdown()
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    try:
        # a cluster on loopback addresses (tests, one machine): this driver is on a node of that address
        local = {"_node_ip_address": host} if host.startswith("127.") else {}
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 logging_level="INFO" if verbose else "ERROR", log_to_driver=verbose, **local)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConnectionError(f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
                              "`ray start --head` (docs/SCALE.md)") from None
    return dict(ray.cluster_resources())


def run(cfg: RunConfig, run_dir, *, num_cpus: float = 0.5, progress: bool = True, verbose: bool = False,
        stop_after: int | None = None, ray_address: str | None = None) -> dict:
    """Run a simulation into ``run_dir``; returns the strategy's summary. ``ray_address``: run on
    that existing Ray cluster (its nodes' CPUs host the clients) instead of a Ray started here."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from client.data import num_clients
    from server.app import build_server_app

    n = num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed)
    result: dict = {}
    backend = {"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
               "init_args": {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose,
                             "include_dashboard": False}}
    if ray_address is not None:
        import ray

        result["ray_cluster"] = dict(ray.cluster_resources()) if ray.is_initialized() else connect_ray(
            ray_address, verbose=verbose)
    from server import vce_polling

    vce_polling.install()
    t0 = time.perf_counter()
    run_simulation(server_app=build_server_app(cfg, run_dir, expected_clients=n, progress=progress, result=result,
                                                     stop_after=stop_after),
                   client_app=build_client_app(cfg), num_supernodes=n, backend_config=backend,
                   verbose_logging=verbose)
    result["wall_seconds"] = time.perf_counter() - t0
    result["num_clients"] = n
    return result


def summarize(run_dir, result: dict) -> str:
    rows = run_dir.rounds()
    fits = [r for r in rows if r.get("kind") == "fit"]
    evals = [r for r in rows if r.get("kind") == "eval" and "ndcg@10" in r]
    final = evals[-1] if evals else {}
    secs = sum(r.get("seconds", 0.0) for r in fits)
    updates = sum(r.get("participants", 0) for r in fits)
    lines = [
        f"run directory      {run_dir.path}",
        f"clients            {result.get('num_clients')}",
        f"rounds             {len(fits)} ({len(fits) / secs if secs else 0:.2f} rounds/s, "
        f"{updates / secs if secs else 0:.1f} client-updates/s)",
        f"client updates     {updates} ok, {sum(r.get('failures', 0) for r in fits)} failed",
        f"wall time          {result.get('wall_seconds', 0):.1f} s",
    ]
    if final:
        lines += final_lines(final)
    ledger = run_dir.load_ledger()
    if ledger is not None:
        from common.privacy import Accountant, PrivacyLedger

        led = PrivacyLedger.from_state_dict(ledger["ledger"])
        dp_mode = run_dir.config().dp.mode
        mode = {DPMode.LOCAL: "local DP", DPMode.DISTRIBUTED: "distributed DP, user-level"}.get(dp_mode, "user-level")
        distributed = dp_mode == DPMode.DISTRIBUTED  # RDP only: no PLD for a sum of discrete Gaussians
        pld = "" if distributed else f", {led.epsilon(Accountant.PLD):.3f} (PLD)"
        lines.append(f"privacy            {mode} ε = {led.epsilon(Accountant.RDP):.3f} (RDP){pld} at δ = {led.delta:g}, "
                     f"{len(led.events)} rounds released ({led.unit.value}, {led.relation.value})")
        if distributed:
            lines.append(f"                   against the server (it knows the cohorts): "
                         f"ε = {led.epsilon(Accountant.RDP, amplification=False):.3f} (RDP)")
        if not ledger.get("secret_cohorts", True):
            lines.append(f"                   cohorts were SEEDED (fed.sampling-seed): without amplification "
                         f"ε = {led.epsilon(Accountant.RDP, amplification=False):.3f} (RDP)")
    elif run_dir.config().dp.enabled:
        lines.append("privacy            no round was released (the privacy budget allowed none)")
    else:
        lines.append("privacy            NO DP GUARANTEE for users (run with user-level DP disabled)")
    if (run_dir.path / "client_epsilons.json").exists():
        eps = list(json.loads((run_dir.path / "client_epsilons.json").read_text()).values())
        lines.append(f"silo DP-SGD        user-level ε inside each silo (δ = {run_dir.config().dp.silo_delta:g}): "
                     f"min {min(eps):.3f}, max {max(eps):.3f} over {len(eps)} silos")
    if (run_dir.path / "privacy_report.html").exists():
        lines.append(f"privacy report     {run_dir.path / 'privacy_report.html'}")
    text = "\n".join(lines)
    (run_dir.path / "summary.md").write_text("```\n" + text + "\n```\n")
    return text


SUMMARY_METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr@10", "ndcg@20", "recall@20")


def _ci(half_width: float | None) -> str:
    return "n/a (fewer than 2 clients)" if half_width is None else f"{half_width:.4f}"


def sample_caption(row: dict) -> str:
    """'2,000 of 100,000 clients sampled, secret' for an eval row of a sampled test."""
    how = "secret" if row.get("secret", True) else "SEEDED (fed.sampling-seed): not secret"
    return f"{row['sampled_clients']:,} of {row['population']:,} clients sampled, {how}"


def final_lines(final: dict) -> list[str]:
    """The summary's lines of the last evaluation: its metrics, and when the test evaluated a
    sample of the clients, that it did, and each mean ± its 95% CI half-width."""
    if not final.get("sampled"):
        return [f"final {final['phase']:<5} ({final['users']} users, full ranking)",
                *(f"  {k:<16} {final[k]:.4f}" for k in SUMMARY_METRICS)]
    return [f"final {final['phase']} ({sample_caption(final)}): ndcg@10 {final['ndcg@10']:.4f} ± "
            f"{_ci(final.get('ndcg@10_ci95'))} (95% CI)",
            f"  ({final['users']:,} users, full ranking; ± is the 95% CI half-width over the sampled clients)",
            *(f"  {k:<16} {final[k]:.4f} ± {_ci(final.get(f'{k}_ci95'))}" for k in SUMMARY_METRICS)]


def check_args(args: argparse.Namespace) -> None:
    """Flags that are not config keys: a UsageError naming the flag (inf, NaN, negatives...)."""
    cpus = os.cpu_count() or 1
    if not (math.isfinite(args.num_cpus) and 0 < args.num_cpus <= cpus):
        raise UsageError(f"--num-cpus {args.num_cpus}: expected CPUs per simulated client in (0, {cpus}]")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after {args.stop_after}: expected a round ≥ 1")
    if args.clients_per_round is not None and args.clients_per_round < 1:
        raise UsageError(f"--clients-per-round {args.clients_per_round}: expected a number ≥ 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs(args.verbose)
    from common.data import DataUnavailableError
    from server.run_dir import RunDir

    try:
        check_args(args)
        if args.resume:
            run_dir = RunDir(args.resume)
            cfg = build_config(args, run_dir.config())
            run_dir.check_resume(cfg)
            run_dir.load_checkpoint()  # a damaged checkpoint stops here, named, before any simulation starts
            run_dir.rounds()
        else:
            cfg = build_config(args)
        from client.data import num_clients  # reads the data once (cached for the run): a bad file is one line

        n = num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed)
        if cfg.dp.enabled and cfg.dp.mode == DPMode.DISTRIBUTED:
            _plan_distributed(cfg, n)  # an infeasible budget or field: one line, before Ray starts
        if args.ray_address:
            cluster = connect_ray(args.ray_address, verbose=args.verbose)  # no cluster: one line, no run directory
            print(f"Ray cluster at {args.ray_address}: {cluster.get('CPU', 0):g} CPUs "
                  f"({cluster.get('CPU', 0) / args.num_cpus:g} clients at a time)", flush=True)
    except (UsageError, ValueError, OSError, DataUnavailableError) as exc:
        # A mistake in the flags, the config or the data (DataError, RunDirError and
        # ConfigMismatchError are ValueErrors): one line on stderr, exit status 2.
        return report_error(PROG, exc)
    if not args.resume:
        run_dir = RunDir.create(Path(args.runs_dir), cfg)
    print(f"fedrec simulation -> {run_dir.path}", flush=True)
    result = run(cfg, run_dir, num_cpus=args.num_cpus, progress=not args.no_progress, verbose=args.verbose,
                 stop_after=args.stop_after, ray_address=args.ray_address)
    print(summarize(run_dir, result))
    fits = [r for r in run_dir.rounds() if r.get("kind") == "fit"]
    if fits and not any(r.get("participants", 0) for r in fits):
        print("error: no client succeeded in any round", file=sys.stderr)
        return 1
    return 0
