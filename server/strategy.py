"""The server's strategy: Flower's legacy ``Strategy`` hooks around one
:class:`~common.rounds.RoundEngine` (sampling, the instruction, validation, the release and the
ledger are the engine's), plus what only a Flower server has: identities of nodes, SecAgg+
sizing and its checks, federated evaluation and per-round bookkeeping (metrics, checkpoint,
progress). The round loop is Flower's own ``DefaultWorkflow`` (the path SecAgg+ supports in 1.42).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common import keys
from common.config import RunConfig
from common.ddp_round import expected_field_weight, modular_sum_from_secagg, secagg_ranges
from common.device import EVAL_KS
from common.metrics import RANKING_METRICS, ratio_mean_ci95
from common.rounds import RoundEngine
from common.sampling import uniform_subset
from common.secure_sum import expected_weight_factor, modulus_for
from common.streams import Stream, generator
from server.grid import BoundedGrid
from server.replies import evaluation_problem, finite, identity, silo_history_entry
from server.run_dir import RunDir

log = logging.getLogger(__name__)


class FedRecStrategy(Strategy):
    """Everything it needs comes in here.

    Parameters
    ----------
    cfg, run_dir, engine:
        The run, where it writes, and its round engine (fresh or restored from a checkpoint).
    grid:
        Flower's grid; wrapped in a :class:`BoundedGrid` that bounds every wait and names failures.
    start_round:
        The last completed round of a resumed run (0 for a new run); Flower's workflow counts rounds
        from 1 again, so workflow round r is global round ``start_round + r``.
    secagg_workflow:
        The SecAgg+ workflow (results then carry the survivors' mean, not updates), or None.
    expected_clients, stop_after, on_round:
        Wait for this many clients before sampling; stop cleanly after this round (resume later);
        called with every metrics row (the progress bar).
    """

    def __init__(self, cfg: RunConfig, run_dir: RunDir, engine: RoundEngine, grid: Any, *, start_round: int = 0,
                 secagg_workflow: Any = None, expected_clients: int | None = None, stop_after: int | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.run_dir, self.engine = cfg, run_dir, engine
        self.grid = BoundedGrid(grid, cfg.fed.timeout, self.note_failure, stable_nodes=expected_clients)
        self.start_round, self.current_round = start_round, start_round
        self.secagg_workflow = secagg_workflow
        self.secure_aggregation = secagg_workflow is not None
        self.expected_clients, self.stop_after = expected_clients, stop_after
        self.on_round = on_round or (lambda row: None)
        self.client_ids: dict[str, int] = {}  # proxy.cid -> pseudonymous client id
        self.node_to_client: dict[int, int] = {}
        self.client_to_node: dict[int, int] = {}  # the node a client id is bound to (first claim wins)
        self.client_users: dict[int, int] = {}  # users each client said it holds (bounds its evaluation)
        self.failures: list[tuple[int, int | None, str]] = []  # (round, client id, reason)
        self.budget_stopped_at: int | None = None
        self.elapsed = 0.0
        self._row: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._released = False
        # The final test's sample when it is one: {"sampled_clients", "population", "secret"} (counts only)
        self._test_sample: dict[str, Any] | None = None

    @property
    def population(self) -> int:
        return max(len(self.client_ids), 1)

    # ---- identities
    def _resolve_ids(self, client_manager: ClientManager) -> list[ClientProxy]:
        """Ask nodes not yet known for their pseudonymous client id, all in one batch, so that
        sampling depends on the client id only, not on Flower's random node ids.

        A reply is data, not trust: one without a usable id is a failure of that node; an id
        already bound to another connected node is refused (a node cannot displace another by
        copying its id); the node is then never sampled."""
        if self.expected_clients:
            client_manager.wait_for(self.expected_clients, timeout=int(self.cfg.fed.timeout))
        proxies = list(client_manager.all().values())
        unknown = {p.node_id: p for p in proxies if p.cid not in self.client_ids}
        if unknown:
            content = recorddict_compat.getpropertiesins_to_recorddict(GetPropertiesIns({keys.PROP_QUERY: 1}))
            out = [Message(content=content, dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES,
                           group_id="identity") for nid in unknown]
            connected = {p.node_id for p in proxies}
            for reply in self.grid.send_and_receive(out, timeout=self.cfg.fed.timeout):
                proxy = unknown.get(reply.metadata.src_node_id)
                if reply.has_error() or proxy is None:
                    continue  # logged by the grid; a node that cannot say who it is is not sampled
                self._bind(proxy, reply, connected)
        return [p for p in proxies if p.cid in self.client_ids]

    def _bind(self, proxy: ClientProxy, reply: Message, connected: set[int]) -> None:
        try:
            res = recorddict_compat.recorddict_to_getpropertiesres(reply.content)
            cid, users = identity(res.properties)
        except (KeyError, TypeError, ValueError) as exc:
            self.note_failure(proxy.node_id, f"identity reply refused: {exc}")
            return
        holder = self.client_to_node.get(cid)
        if holder is not None and holder != proxy.node_id and holder in connected:
            self.note_failure(proxy.node_id, f"identity refused: client id {cid} belongs to another connected node")
            return
        self.client_ids[proxy.cid] = cid
        self.node_to_client[proxy.node_id] = cid
        self.client_to_node[cid] = proxy.node_id
        self.client_users[cid] = users

    def note_failure(self, node_id: int, reason: str) -> None:
        cid = self.node_to_client.get(node_id)
        self.failures.append((self.current_round, cid, reason))
        who = cid if cid is not None else f"node {node_id}"
        log.warning("round %d: client %s failed: %s", self.current_round, who, reason)

    # ---- Strategy hooks: training
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.engine.outgoing())

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        rnd = self.start_round + server_round
        if self._stopped(rnd):
            return []
        if self.engine.over_budget(rnd):
            self.budget_stopped_at = rnd
            log.warning("round %d would exceed the privacy budget ε=%.3g: stopping after round %d",
                        rnd, self.cfg.dp.target_epsilon, rnd - 1)
            self.run_dir.log_round({"kind": "stop", "round": rnd, "reason": "privacy budget"})
            return []
        self.current_round, self._t0, self._released = rnd, time.perf_counter(), False
        self._row = {"round": rnd, "sampled": 0, "participants": 0, "failures": 0}
        by_id = {self.client_ids[p.cid]: p for p in self._resolve_ids(client_manager)}
        self.grid.take_traffic()  # the identity query (round 1) is not this round's training traffic
        chosen = self.engine.cohort(by_id, rnd)  # secret; only the count is logged
        self._row["sampled"] = len(chosen)
        self._size_secagg(len(chosen))
        # The engine's parameters are the source of truth (a noise-only release may have changed
        # them in a round where nobody was sampled).
        ins = FitIns(ndarrays_to_parameters(self.engine.outgoing()),
                     self.engine.instruction(rnd, secure_aggregation=self.secure_aggregation))
        return [(by_id[c], ins) for c in chosen]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        self._row["failures"] = len(failures)
        updates, losses = [], []
        # Deterministic order: the sum does not depend on which reply came first.
        distributed = self.engine.distributed
        for proxy, res in sorted(results, key=lambda r: self.client_ids.get(r[0].cid, -1)):
            arrays = parameters_to_ndarrays(res.parameters)
            # Distributed DP: every result carries the workflow's dequantized sum, checked below.
            problem = None if distributed else self.engine.check(arrays, secure_aggregation=self.secure_aggregation)
            if not problem and not self.secure_aggregation and res.num_examples != 1:
                problem = f"claimed weight {res.num_examples}, the protocol's is 1"
            if problem:
                self.note_failure(proxy.node_id, f"update refused: {problem}")
                self._row["failures"] += 1
                continue
            updates.append(arrays)
            loss = finite(res.metrics.get(keys.M_TRAIN_LOSS))
            if loss is not None:
                losses.append(loss)
            self._note_silo_history(proxy, res.metrics)
        self._row["participants"] = len(updates)
        if not updates:
            return None, {}
        if distributed:
            total, problem = self._distributed_total(updates[0], len(updates))
            if problem:  # abandoned: evaluate() releases the server's noise only and charges it
                log.error("round %d: distributed-DP sum refused: %s", self.current_round, problem)
                self._row["refused"] = problem
                return None, {}
        elif self.secure_aggregation:  # every result carries the survivors' mean
            problem = self._weight_factor_problem(len(updates))
            if problem:
                # The sum cannot be trusted (a client lied about its weight, or the modulus wrapped):
                # nothing of it is released; evaluate() releases noise only and charges the round.
                log.error("round %d: secure aggregate refused: %s", self.current_round, problem)
                self._row["refused"] = problem
                return None, {}
            total, problem = self.engine.secure_total([np.asarray(a, dtype=np.float64) * len(updates)
                                                       for a in updates[0]], len(updates))
            if problem:  # only a client that ignored the protocol gets here: noise-only release
                log.error("round %d: secure aggregate refused: %s", self.current_round, problem)
                self._row["refused"] = problem
                return None, {}
        else:
            total = self.engine.total(updates)
        self._release(total, len(updates))
        if losses:
            self._row["train_loss"] = float(np.mean(losses))
        return ndarrays_to_parameters(self.engine.outgoing()), {}

    def _note_silo_history(self, proxy: ClientProxy, metrics: dict[str, Any]) -> None:
        cid = self.client_ids.get(proxy.cid)
        try:
            entry = silo_history_entry(metrics)
            if entry is not None and cid is not None:
                self.engine.note_silo_history(cid, entry)
        except (KeyError, TypeError, ValueError) as exc:
            self.note_failure(proxy.node_id, f"silo DP-SGD history entry refused: {exc}")

    # ---- SecAgg+
    def _size_secagg(self, cohort: int) -> None:
        """SecAgg+ needs num_shares ≤ cohort and a threshold ≤ num_shares: with a small cohort
        (a few silos or devices) every client shares with all others, same threshold ratio. The
        modulus is sized for the whole population, the largest cohort a round can have, so the
        masked sum never wraps (common/secure_sum.py)."""
        wf, sa = self.secagg_workflow, self.cfg.secagg
        if wf is None:
            return
        mechanism = self.engine.mechanism
        if mechanism is not None:  # distributed DP: the devices send field elements, one level each
            wf.modulus_range = mechanism.params.modulus
            wf.clipping_range, wf.quantization_range = secagg_ranges(mechanism.params.modulus)
            wf.expected_shapes = [(1,), (mechanism.params.padded_dim,)]
        else:
            wf.modulus_range = modulus_for(self.population, sa.quantization_bits)
            wf.clipping_range = self.engine.value_bound(secure_aggregation=True)
            wf.quantization_range = 2 ** sa.quantization_bits
            wf.expected_shapes = [(1,), *(tuple(np.shape(a)) for a in self.engine.model.arrays(self.engine.params))]
        if cohort >= sa.num_shares:
            wf.num_shares, wf.reconstruction_threshold = sa.num_shares, sa.reconstruction_threshold
        else:  # floats: proportions of the sampled clients / of the shares (Flower's convention)
            wf.num_shares, wf.reconstruction_threshold = 1.0, sa.reconstruction_threshold / sa.num_shares

    def _distributed_total(self, arrays: list[np.ndarray], survivors: int) -> tuple[list[np.ndarray] | None, str | None]:
        """Distributed DP: the field sum back from Flower's dequantized aggregate, then the engine's
        decoding (the noisy sum of the survivors' updates), or (None, why)."""
        if self.secagg_workflow is None:
            return None, "distributed DP without SecAgg+"
        modulus = self.engine.mechanism.params.modulus
        factor = getattr(self.secagg_workflow, "last_weight_factor", None)
        want = expected_field_weight(survivors, modulus)
        if factor != want:
            return None, (f"unmasked weight factor {factor} ≠ {want} for {survivors} survivors (a client claimed "
                          "another weight)")
        if len(arrays) != 1 or np.shape(arrays[0]) != (self.engine.mechanism.params.padded_dim,):
            return None, f"aggregate of shapes {[np.shape(a) for a in arrays]}, expected one field vector"
        modular = modular_sum_from_secagg(arrays[0], factor, survivors, modulus)
        return self.engine.distributed_total(modular, survivors)

    def _weight_factor_problem(self, survivors: int) -> str | None:
        """Why the unmasked aggregate cannot be used: its weight factor is not n·2^bits."""
        factor = getattr(self.secagg_workflow, "last_weight_factor", None)
        want = expected_weight_factor(survivors, self.cfg.secagg.quantization_bits)
        if factor is None:
            return "the unmask stage reported no weight factor"
        if factor != want:
            return (f"unmasked weight factor {factor} ≠ {survivors} survivors × 2^{self.cfg.secagg.quantization_bits} "
                    f"= {want} (a client claimed another weight, or the sum wrapped)")
        return None

    # ---- the release and the round's bookkeeping
    def _release(self, total: list[np.ndarray] | None, n: int) -> None:
        if self._released:
            raise RuntimeError(f"round {self.current_round} released twice")
        self._released = True
        t0 = time.perf_counter()
        self.engine.release(total, n, self.current_round, population=self.population)
        if self.engine.ledger is not None:
            self._row["epsilon"] = self.engine.epsilon()
        self._row["release_seconds"] = round(time.perf_counter() - t0, 3)

    def evaluate(self, server_round: int, parameters: Parameters):
        """Called by the workflow once per round after fit: per-round bookkeeping."""
        if server_round == 0 or self._stopped(self.start_round + server_round):
            return None
        if not self._released:
            failure = getattr(self.secagg_workflow, "last_failure", None)
            if failure:
                self._row["refused"] = failure
            if self.secure_aggregation and self._row.get("sampled", 0) > 0:
                # The protocol did not complete (too few survivors) or its sum was refused. Whether that
                # happens can depend on which clients were sampled and on data-dependent failures, so
                # the round still releases (noise only, with DP) and is charged, as when nobody reports.
                self._row["abandoned"] = True
                log.warning("round %d abandoned: secure aggregation did not complete; noise-only release, "
                            "the round is charged", self.current_round)
            self._release(None, 0)
        self._row["seconds"] = time.perf_counter() - self._t0
        self._row.update(self.grid.take_traffic())  # payload bytes of this round's fit (every SecAgg+ stage)
        stages = getattr(self.secagg_workflow, "stage_seconds", None)
        if stages:  # where a SecAgg+ round's seconds went (one fan-out to the cohort per stage)
            self._row["stage_seconds"] = dict(stages)
        row = {"kind": "fit", **self._row}
        self.run_dir.log_round(row)
        self._checkpoint()
        self.on_round(row)
        return None

    def _checkpoint(self) -> None:
        """One atomic file: the model, the optimizer and the ledger of the same round (run_dir.py);
        then the ledger's and the silo ε's readable copies."""
        named, optimizer_state, extra = self.engine.state()
        extra = {**extra, "failures": len(self.failures), "population": self.population}
        self.run_dir.save_checkpoint(self.current_round, named, optimizer_state, extra)
        ledger = self.engine.ledger
        if ledger is not None:
            self.run_dir.save_ledger(ledger.state_dict(), secure_noise=self.engine.noise.secure,
                                     population=self.population, secret_cohorts=self.cfg.fed.cohort_seed is None)
        if self.engine.silo_histories:
            self.run_dir.save_client_epsilons(self.engine.silo_epsilons())

    def _stopped(self, rnd: int) -> bool:
        if self.budget_stopped_at is not None and rnd >= self.budget_stopped_at:
            return True
        return self.stop_after is not None and rnd > self.stop_after

    # ---- Strategy hooks: evaluation
    def _eval_phase(self, rnd: int) -> str | None:
        last = rnd == self.cfg.fed.rounds or (self.budget_stopped_at is not None and rnd == self.budget_stopped_at)
        if last:
            return "test"
        return "valid" if rnd % self.cfg.fed.eval_every == 0 else None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        rnd = self.start_round + server_round
        phase = self._eval_phase(rnd)
        if phase is None or (self._stopped(rnd) and rnd != self.budget_stopped_at):
            return []
        ins = EvaluateIns(parameters, {keys.PHASE: phase, keys.SERVER_ROUND: rnd})
        proxies = sorted(self._resolve_ids(client_manager), key=lambda p: self.client_ids[p.cid])
        n = self.cfg.fed.eval_clients
        if phase == "valid" and 0 < n < len(proxies):
            # Monitoring: a fixed seeded subset of clients.
            pick = generator(Stream.EVAL_SUBSET, self.cfg.seed).choice(len(proxies), size=n, replace=False)
            proxies = [proxies[i] for i in sorted(pick)]
        elif phase == "test":
            proxies = self._test_cohort(proxies)
        return [(p, ins) for p in proxies]

    def _test_cohort(self, proxies: list[ClientProxy]) -> list[ClientProxy]:
        """The final test's clients: all of them, or (0 < fed.test-clients < population) a uniform
        sample without replacement of the clients whose identity is known -- secret (OS CSPRNG)
        unless fed.sampling-seed is set. Only its size is kept (the eval row carries it)."""
        n, seed = self.cfg.fed.test_clients, self.cfg.fed.cohort_seed
        self._test_sample = None
        if not 0 < n < len(proxies):
            return proxies
        by_id = {self.client_ids[p.cid]: p for p in proxies}
        chosen = uniform_subset(by_id, n, seed=seed)
        self._test_sample = {"sampled_clients": len(chosen), "population": len(by_id), "secret": seed is None}
        return [by_id[c] for c in chosen]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures):
        rnd = self.start_round + server_round
        phase = self._eval_phase(rnd)
        names = [f"{m}@{k}" for m in RANKING_METRICS for k in EVAL_KS]
        accepted, refused = [], 0
        # Deterministic order, as in aggregate_fit: a float sum depends on its order, and replies
        # arrive in any order (two runs of one seeded config differed in the last bit of ndcg@20).
        for proxy, res in sorted(results, key=lambda r: self.client_ids.get(r[0].cid, -1)):
            held = self.client_users.get(self.client_ids.get(proxy.cid, -1), 1)
            problem = evaluation_problem(res.num_examples, res.metrics, names, held)
            if problem:
                self.note_failure(proxy.node_id, f"evaluation refused: {problem}")
                refused += 1
            else:
                accepted.append(res)
        users = sum(res.num_examples for res in accepted)
        row: dict[str, Any] = {"kind": "eval", "round": rnd, "phase": phase, "users": users,
                               "failures": len(failures) + refused}
        sample = self._test_sample if phase == "test" else None
        if sample is not None:  # a sample: say so, and how far its means may be from everyone's
            row.update({"sampled": True, **sample})
        if users:
            for name in names:
                sums = [float(res.metrics.get(name, 0.0)) for res in accepted]
                row[name] = sum(sums) / users
                if sample is not None:
                    _, row[f"{name}_ci95"] = ratio_mean_ci95(sums, [res.num_examples for res in accepted],
                                                             sample["population"])
        self.run_dir.log_round(row)
        self.on_round(row)
        return None, {k: v for k, v in row.items() if isinstance(v, float)}
