"""The server's strategy: Poisson client sampling, FedAvg/FedAdam of item-side updates,
federated evaluation, and per-round bookkeeping (metrics, checkpoint, progress).

Hooks on Flower's legacy ``Strategy`` (the path SecAgg+ supports in 1.42); the round loop is
Flower's own ``DefaultWorkflow``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns, EvaluateRes, FitIns, FitRes, GetPropertiesIns, Parameters, Scalar,
    ndarrays_to_parameters, parameters_to_ndarrays,
)
from flwr.app import Message
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common import keys
from common.config import RunConfig
from common.federated import EVAL_KS, ServerOptimizer, server_update, sum_updates, validate_update
from common.metrics import RANKING_METRICS
from common.mf import ItemParams
from common.privacy import Accountant, MechanismEvent
from common.privacy.dp_fedavg import GaussianNoise, ledger_for, local_bound, release_event
from common.sampling import poisson_sample
from common.secure_sum import clip_before_rounding, expected_weight_factor, modulus_for
from common.silo_dp import checked_history, ledger_from_history
from server.run_dir import RunDir

log = logging.getLogger(__name__)


class FedRecStrategy(Strategy):
    """``start_round`` is the last completed round of a resumed run (0 for a new run); Flower's
    workflow counts rounds from 1 again, so workflow round r is global round ``start_round + r``."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, params: ItemParams, optimizer: ServerOptimizer, *,
                 start_round: int = 0, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.run_dir, self.params, self.optimizer = cfg, run_dir, params, optimizer
        self.start_round = start_round
        self.on_round = on_round or (lambda row: None)
        self.client_ids: dict[str, int] = {}  # proxy.cid -> pseudonymous client id
        self.node_to_client: dict[int, int] = {}
        self.client_to_node: dict[int, int] = {}  # the node a client id is bound to (first claim wins)
        self.client_users: dict[int, int] = {}  # users each client said it holds (bounds its evaluation)
        self.failures: list[tuple[int, int | None, str]] = []  # (round, client id, reason)
        self.current_round = start_round
        self._row: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self.expected_clients: int | None = None
        self.grid = None  # set by the ServerApp: the (bounded) grid, for the identity query
        self.elapsed = 0.0
        self.stop_after: int | None = None  # stop cleanly after this round (resume later)
        self.secure_aggregation = False  # results carry the survivors' mean (SecAgg+), not updates
        self.secagg_workflow = None  # Flower's SecAggPlusWorkflow, sized to each round's cohort
        dp = cfg.dp
        self.ledger = ledger_for(dp.mode, dp.delta, cfg.fed.partition) if dp.enabled else None
        self.local_dp = dp.enabled and dp.mode == "local"  # the devices add the noise, not the server
        self.noise = GaussianNoise(dp.seed)
        self.budget_stopped_at: int | None = None
        self._released = False
        # silo DP-SGD: each silo's Opacus history [(σ, q, steps), ...], kept with the checkpoint so
        # that a resumed run composes on (a reported ε never goes down)
        self.silo_histories: dict[int, list[tuple[float, float, int]]] = {}
        # Hybrid (model.kind = "hybrid"): self.params is a HybridParams; the text side computes the
        # item text vectors sent after the trainable arrays (a context array, never trained).
        self.text_side = None
        self.text_vectors: np.ndarray | None = None

    def set_text_side(self, side) -> None:
        """Hybrid: the text side (common.hybrid_federated.TextSide) and the current text vectors."""
        self.text_side = side
        self.text_vectors = side.vectors(self.params.adapter)

    def _outgoing(self) -> list[np.ndarray]:
        """What an instruction carries: the trainable arrays (+ the item text vectors, hybrid)."""
        arrays = self.params.to_arrays()
        return arrays if self.text_side is None else [*arrays, self.text_vectors]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the released (trainable) arrays, for the privacy ledger."""
        return keys.ITEM_PARAM_NAMES if self.text_side is None else self.params.names()

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
        if unknown and self.grid is not None:
            content = recorddict_compat.getpropertiesins_to_recorddict(GetPropertiesIns({keys.PROP_QUERY: 1}))
            out = [Message(content=content, dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES,
                           group_id="identity") for nid in unknown]
            connected = {p.node_id for p in proxies}
            for reply in self.grid.send_and_receive(out, timeout=self.cfg.fed.timeout):
                proxy = unknown.get(reply.metadata.src_node_id)
                if reply.has_error() or proxy is None:
                    continue  # logged by the grid; a node that cannot say who it is is not sampled
                try:
                    res = recorddict_compat.recorddict_to_getpropertiesres(reply.content)
                    cid, users = _identity(res.properties)
                except (KeyError, TypeError, ValueError) as exc:
                    self.note_failure(proxy.node_id, f"identity reply refused: {exc}")
                    continue
                holder = self.client_to_node.get(cid)
                if holder is not None and holder != proxy.node_id and holder in connected:
                    self.note_failure(proxy.node_id, f"identity refused: client id {cid} belongs to another "
                                                     "connected node")
                    continue
                self.client_ids[proxy.cid] = cid
                self.node_to_client[proxy.node_id] = cid
                self.client_to_node[cid] = proxy.node_id
                self.client_users[cid] = users
        return [p for p in proxies if p.cid in self.client_ids]

    def note_failure(self, node_id: int, reason: str) -> None:
        cid = self.node_to_client.get(node_id)
        self.failures.append((self.current_round, cid, reason))
        log.warning("round %d: client %s failed: %s", self.current_round, cid if cid is not None else f"node {node_id}", reason)

    # ---- Strategy hooks
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self._outgoing())

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        rnd = self.start_round + server_round
        if self._stopped(rnd):
            return []
        if self.ledger is not None and self.cfg.dp.target_epsilon > 0 and self.ledger.would_exceed(
                self._event(rnd), target_epsilon=self.cfg.dp.target_epsilon, accountant=Accountant(self.cfg.dp.accountant)):
            self.budget_stopped_at = rnd
            log.warning("round %d would exceed the privacy budget ε=%.3g: stopping after round %d",
                        rnd, self.cfg.dp.target_epsilon, rnd - 1)
            self.run_dir.log_round({"kind": "stop", "round": rnd, "reason": "privacy budget"})
            return []
        self.current_round = rnd
        self._t0 = time.perf_counter()
        self._released = False
        self._row = {"round": rnd, "sampled": 0, "participants": 0, "failures": 0}
        proxies = self._resolve_ids(client_manager)
        by_id = {self.client_ids[p.cid]: p for p in proxies}
        # Secret cohorts (OS CSPRNG) unless the run set fed.sampling-seed for tests; only counts are logged.
        chosen = poisson_sample(list(by_id), self.cfg.fed.sample_rate, seed=self.cfg.fed.cohort_seed,
                                server_round=rnd)
        self._row["sampled"] = len(chosen)
        self._size_secagg(len(chosen))
        config = {keys.SERVER_ROUND: rnd, keys.LOCAL_EPOCHS: self.cfg.fed.local_epochs, keys.CLIENT_LR: self.cfg.fed.client_lr}
        if self.ledger is not None or self.secure_aggregation:
            config[keys.CLIP_NORM] = self.device_clip
            config[keys.BIAS_SHARE] = self.cfg.dp.bias_share
        if self.local_dp:
            config[keys.LOCAL_NOISE] = self.cfg.dp.noise_multiplier
        # The strategy's parameters are the source of truth (a noise-only release may have
        # changed them in a round where nobody was sampled).
        if self.text_side is not None:  # the trailing context array gets no update
            config[keys.TRAINABLE_ARRAYS] = len(self.params.to_arrays())
            config[keys.CONTEXT_ARRAYS] = keys.TEXT_VECTORS_NAME
        ins = FitIns(ndarrays_to_parameters(self._outgoing()), config)
        return [(by_id[c], ins) for c in chosen]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        self._row["failures"] = len(failures)
        expected = [a.shape for a in self.params.to_arrays()]
        updates, losses = [], []
        # Deterministic order: the sum does not depend on which reply came first.
        for proxy, res in sorted(results, key=lambda r: self.client_ids.get(r[0].cid, -1)):
            arrays = parameters_to_ndarrays(res.parameters)
            problem = validate_update(arrays, expected, self.clip_bound, l2=self.l2_bound,
                                      bias_share=max(self.cfg.dp.bias_share, 0.0))
            if not problem and not self.secure_aggregation and res.num_examples != 1:
                problem = f"claimed weight {res.num_examples}, the protocol's is 1"
            if problem:
                self.note_failure(proxy.node_id, f"update refused: {problem}")
                self._row["failures"] += 1
                continue
            updates.append(arrays)
            loss = _finite(res.metrics.get(keys.M_TRAIN_LOSS))
            if loss is not None:
                losses.append(loss)
            self._note_silo_history(proxy, res.metrics)
        self._row["participants"] = len(updates)
        if not updates:
            return None, {}
        if self.secure_aggregation:  # every result carries the survivors' mean
            problem = self._weight_factor_problem(len(updates))
            if problem:
                # The sum cannot be trusted (a client lied about its weight, or the modulus wrapped):
                # nothing of it is released; evaluate() releases noise only and charges the round.
                log.error("round %d: secure aggregate refused: %s", self.current_round, problem)
                self._row["refused"] = problem
                return None, {}
            total = [np.asarray(a, dtype=np.float64) * len(updates) for a in updates[0]]
        else:
            total = sum_updates(updates)
        self._release(total, len(updates))
        if losses:
            self._row["train_loss"] = float(np.mean(losses))
        return ndarrays_to_parameters(self._outgoing()), {}

    def _size_secagg(self, cohort: int) -> None:
        """SecAgg+ needs num_shares ≤ cohort and a threshold ≤ num_shares: with a small cohort
        (a few silos or devices) every client shares with all others, same threshold ratio. The
        modulus is sized for the whole population, the largest cohort a round can have, so the
        masked sum never wraps (common/secure_sum.py)."""
        wf, sa = self.secagg_workflow, self.cfg.secagg
        if wf is None:
            return
        wf.modulus_range = modulus_for(self.population, sa.quantization_bits)
        wf.expected_shapes = [(1,), *(tuple(np.shape(a)) for a in self.params.to_arrays())]
        if cohort >= sa.num_shares:
            wf.num_shares, wf.reconstruction_threshold = sa.num_shares, sa.reconstruction_threshold
        else:  # floats: proportions of the sampled clients / of the shares (Flower's convention)
            wf.num_shares, wf.reconstruction_threshold = 1.0, sa.reconstruction_threshold / sa.num_shares

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

    def _note_silo_history(self, proxy: ClientProxy, metrics: dict[str, Scalar]) -> None:
        """A silo's DP-SGD history entry of this round (public settings: σ, q, steps)."""
        if keys.M_SILO_SIGMA not in metrics:
            return
        cid = self.client_ids.get(proxy.cid)
        try:
            entry = checked_history([(metrics[keys.M_SILO_SIGMA], metrics[keys.M_SILO_RATE],
                                      int(metrics[keys.M_SILO_STEPS]))])[0]
        except (KeyError, TypeError, ValueError) as exc:
            self.note_failure(proxy.node_id, f"silo DP-SGD history entry refused: {exc}")
            return
        if cid is not None:
            self.silo_histories.setdefault(cid, []).append(entry)

    def silo_epsilons(self) -> dict[int, float]:
        """ε of each silo's DP-SGD (one user of the silo), composed over every round it trained."""
        delta = self.cfg.dp.silo_delta
        return {cid: ledger_from_history(h, delta=delta).epsilon() for cid, h in sorted(self.silo_histories.items())}

    # ---- the release: DP noise, server optimizer, privacy ledger
    @property
    def device_clip(self) -> float:
        """The clip norm devices are told to use. With SecAgg+ and central DP, C less the rounding
        margin, so an update's norm after quantization is still ≤ C (what the noise is sized
        for); under local DP rounding comes after the noise (post-processing): C itself."""
        clip = self.cfg.dp.clip
        if self.secure_aggregation and not self.local_dp:
            dim = int(sum(np.size(a) for a in self.params.to_arrays()))
            return clip_before_rounding(clip, dim=dim, bits=self.cfg.secagg.quantization_bits)
        return clip

    @property
    def l2_bound(self) -> float:
        """The L2 bound every plaintext update must meet (per group too): the clip devices were
        told to use; without DP or SecAgg+ still ``fed.update-norm-bound`` (one client can push
        the model only so far). Locally noised updates are bounded per value only; under SecAgg+
        the server has no single update to check (only the sum: see ``aggregate_fit``)."""
        if self.local_dp or self.secure_aggregation:
            return np.inf
        if self.ledger is not None or self.secure_aggregation:
            return self.device_clip
        return self.cfg.fed.update_norm_bound

    @property
    def clip_bound(self) -> float:
        """Every coordinate of a clipped update lies within ±C (no bound without clipping); a
        locally noised one within ±local_bound (also SecAgg+'s quantization range)."""
        if self.local_dp:
            return local_bound(self.cfg.dp.noise_multiplier, self.cfg.dp.clip)
        return self.cfg.dp.clip if (self.ledger is not None or self.secure_aggregation) else np.inf

    @property
    def population(self) -> int:
        return max(len(self.client_ids), 1)

    def _event(self, rnd: int) -> MechanismEvent:
        return release_event(self.cfg.dp.mode, noise_multiplier=self.cfg.dp.noise_multiplier,
                             sample_rate=self.cfg.fed.sample_rate, parameters=self.param_names, server_round=rnd)

    def _release(self, total: list[np.ndarray] | None, n: int) -> None:
        """Turn the round's sum of updates (None: nobody reported) into the next global model.
        With central DP the noise is added exactly once here; with local DP the devices added it and
        the server only averages. Either way the round is charged to the ledger."""
        if self._released:
            raise RuntimeError(f"round {self.current_round} released twice")
        self._released = True
        dp = self.cfg.dp if (self.ledger is not None and not self.local_dp) else None
        if self.text_side is not None:  # hybrid: every trainable array alike, then new text vectors
            from common.hybrid_federated import hybrid_server_update

            self.params = hybrid_server_update(self.params, total, n, optimizer=self.optimizer, dp=dp,
                                               expected_cohort=self.cfg.fed.sample_rate * self.population,
                                               noise=self.noise.for_round(self.current_round))
            self.text_vectors = self.text_side.vectors(self.params.adapter)
        else:
            self.params = server_update(self.params, total, n, optimizer=self.optimizer, dp=dp,
                                        expected_cohort=self.cfg.fed.sample_rate * self.population,
                                        noise=self.noise.for_round(self.current_round))
        if self.ledger is not None:
            self.ledger.record(self._event(self.current_round))
            self._row["epsilon"] = self.ledger.epsilon(Accountant.RDP)

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
        row = {"kind": "fit", **self._row}
        self.run_dir.log_round(row)
        extra: dict[str, Any] = {"failures": len(self.failures), "population": self.population}
        if self.ledger is not None:
            extra["ledger"] = self.ledger.state_dict()
        if self.silo_histories:
            extra["silo_histories"] = {str(k): v for k, v in sorted(self.silo_histories.items())}
        # One atomic file: the model, the optimizer and the ledger of the same round (run_dir.py).
        self.run_dir.save_checkpoint(self.current_round, self.params, self.optimizer.state_dict(), extra)
        if self.ledger is not None:
            self.run_dir.save_ledger(self.ledger.state_dict(), secure_noise=self.noise.secure,
                                     population=self.population, secret_cohorts=self.cfg.fed.cohort_seed is None)
        if self.silo_histories:
            self.run_dir.save_client_epsilons(self.silo_epsilons())
        self.on_round(row)
        return None

    def _stopped(self, rnd: int) -> bool:
        if self.budget_stopped_at is not None and rnd >= self.budget_stopped_at:
            return True
        return self.stop_after is not None and rnd > self.stop_after

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
        ins = EvaluateIns(parameters, {keys.PHASE: phase, keys.SERVER_ROUND: self.start_round + server_round})
        proxies = sorted(self._resolve_ids(client_manager), key=lambda p: self.client_ids[p.cid])
        n = self.cfg.fed.eval_clients
        if phase == "valid" and 0 < n < len(proxies):
            # Monitoring: a fixed seeded subset of clients; the final test uses everyone.
            pick = np.random.default_rng([self.cfg.seed, 0xE7]).choice(len(proxies), size=n, replace=False)
            proxies = [proxies[i] for i in sorted(pick)]
        return [(p, ins) for p in proxies]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures):
        rnd = self.start_round + server_round
        phase = self._eval_phase(rnd)
        names = [f"{m}@{k}" for m in RANKING_METRICS for k in EVAL_KS]
        accepted, refused = [], 0
        for proxy, res in results:
            problem = self._evaluation_problem(proxy, res, names)
            if problem:
                self.note_failure(proxy.node_id, f"evaluation refused: {problem}")
                refused += 1
            else:
                accepted.append(res)
        users = sum(res.num_examples for res in accepted)
        row: dict[str, Any] = {"kind": "eval", "round": rnd, "phase": phase, "users": users,
                               "failures": len(failures) + refused}
        if users:
            for name in names:
                row[name] = sum(float(res.metrics.get(name, 0.0)) for res in accepted) / users
        self.run_dir.log_round(row)
        self.on_round(row)
        return None, {k: v for k, v in row.items() if isinstance(v, float)}

    def _evaluation_problem(self, proxy: ClientProxy, res: EvaluateRes, names: list[str]) -> str | None:
        """Why a client's evaluation sums cannot be true: a user count outside 0..(users it said it
        holds), or a metric sum that is not a number in [0, users] (each metric is in [0, 1] per user)."""
        users = res.num_examples
        held = self.client_users.get(self.client_ids.get(proxy.cid, -1), 1)
        if isinstance(users, bool) or not isinstance(users, int) or not 0 <= users <= held:
            return f"{users!r} users evaluated, the client holds {held}"
        for name in names:
            value = _finite(res.metrics.get(name, 0.0))
            if value is None or not 0.0 <= value <= users * (1 + 1e-9):
                return f"{name} sum {res.metrics.get(name)!r} is not within [0, {users}]"
        return None


def _identity(properties: dict[str, Scalar]) -> tuple[int, int]:
    """(client id, users held) from an identity reply; ValueError when they are not integers."""
    cid, users = properties[keys.PROP_CLIENT_ID], properties.get(keys.PROP_USERS, 1)
    for name, value in ((keys.PROP_CLIENT_ID, cid), (keys.PROP_USERS, users)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if users < 0:
        raise ValueError(f"{keys.PROP_USERS} must be ≥ 0, got {users}")
    return int(cid), int(users)


def _finite(value: Any) -> float | None:
    """A client's metric as a finite float, or None (missing, not a number, NaN/Inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if np.isfinite(value) else None
