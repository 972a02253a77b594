"""The privacy report of a run: what was released, under which guarantee, and at what utility.

:func:`build_report` reads a run directory (``config.json``, ``metrics.jsonl``, ``ledger.json``
and, when present, ``client_epsilons.json``, ``audit.json`` and ``canary_audit.json``) and returns a JSON-ready dict;
:func:`write_report` writes it as ``privacy_report.{json,md,html}`` (rendering:
:mod:`server.report_render`; the HTML is one self-contained file with inline plots). ε is
recomputed from the ledger, never copied from the metrics.

Besides ε the report states, for the run, what a privacy officer signs: the unit of privacy,
the neighbouring relation, whether amplification by sampling is claimed and why it holds (or
that it did not), what the server itself sees, and what is outside ε (:func:`_claims`).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.privacy import RDP_ORDERS, Accountant, PrivacyLedger, Relation
from common.privacy.analysis import PLD_VALUE_DISCRETIZATION_INTERVAL
from common.serialization import read_jsonl, write_json
from server.report_render import _eps, plots, to_html, to_markdown

NO_DP = "NO DIFFERENTIAL PRIVACY GUARANTEE: this model was trained without DP; ε is infinite."
MECHANISM = "user-level DP-FedAvg, Gaussian noise added by the server to the sum, Poisson sampling"
LOCAL_MECHANISM = ("local DP: each device adds Gaussian noise to its own clipped update (Poisson sampling, no "
                   "amplification claimed)")
DISTRIBUTED_MECHANISM = ("distributed DP: each device adds its share of discrete Gaussian noise to its rotated, "
                         "rounded update inside the SecAgg+ field (Kairouz, Liu & Steinke 2021); the server only "
                         "sums; Poisson sampling")
PLD_FULL_HISTORY_MAX_ROUNDS = 300  # a full PLD history costs ~6 s at 300 rounds, growing with rounds
PLD_HISTORY_POINTS = 50
FILES = ("privacy_report.json", "privacy_report.md", "privacy_report.html")


def build_report(run_dir: Path) -> dict[str, Any]:
    """The report's content as a JSON-serialisable dict (see the module docstring)."""
    run = _RunFacts.read(Path(run_dir))
    report: dict[str, Any] = {
        "run": {"id": run.path.resolve().name, "path": str(run.path.resolve()),
                "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        "dp_enabled": run.dp_on,
        "mechanism": (LOCAL_MECHANISM if run.local else DISTRIBUTED_MECHANISM if run.distributed else MECHANISM)
        if run.dp_on else None,
        "dp_mode": run.flat.get("dp.mode", "central") if run.dp_on else None,
        "parameters": _parameters(run),
        "warnings": _warnings(run),
        "epsilon": None, "epsilon_history": None, "epsilon_without_amplification": None,
        "budget": None,
        "utility": [{"round": r["round"], "phase": r.get("phase"), "ndcg@10": r.get("ndcg@10"),
                     "recall@10": r.get("recall@10"), "sampled": bool(r.get("sampled"))}
                    for r in run.rows if r.get("kind") == "eval"],
        "final_test": next(({k: v for k, v in r.items() if k not in ("kind", "phase", "failures")}
                            for r in reversed(run.rows) if r.get("kind") == "eval" and r.get("phase") == "test"), None),
        "silo_dp_sgd": _silo_dp_sgd(run.path),
        "claims": _claims(run),
        "trust_model": _trust_model(run),
        "accounting_method": None,
    }
    if run.ledger is not None:
        report.update(_privacy(run))
        report["parameters"]["released_arrays"] = report.pop("parameters_released")
    else:
        report["guarantee"] = NO_DP if not run.dp_on else "NO VERIFIABLE GUARANTEE: the privacy ledger is missing."
    audit = run.path / "audit.json"
    if audit.is_file():
        report["audit"] = json.loads(audit.read_text())
    canaries = run.path / "canary_audit.json"
    if canaries.is_file():  # `fedrec audit canaries --run-dir`: the empirical ε beside the accounted one
        report["canary_audit"] = json.loads(canaries.read_text())
    return report


def write_report(run_dir: Path) -> list[Path]:
    """Write ``privacy_report.{json,md,html}`` into ``run_dir``; returns the three paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    paths = [run_dir / name for name in FILES]
    write_json(paths[0], report)
    paths[1].write_text(to_markdown(report))
    paths[2].write_text(to_html(report, plots(report)))
    return paths


# ---------------------------------------------------------------- reading the run
class _RunFacts:
    """What the report is computed from, read once."""

    def __init__(self, path: Path, raw: dict[str, Any], rows: list[dict[str, Any]], stored: dict[str, Any] | None):
        self.path, self.raw, self.rows = path, raw, rows
        try:
            self.flat = RunConfig.from_flat(raw).to_flat()
        except ValueError:  # a config of another version: report what it says, defaults for the rest
            self.flat = {**RunConfig().to_flat(), **raw}
        # A config written before DP existed has no dp.enabled: then only a ledger is evidence of DP.
        self.dp_on = bool(raw["dp.enabled"]) if "dp.enabled" in raw else stored is not None
        self.stored = stored if self.dp_on else None
        self.ledger = PrivacyLedger.from_state_dict(self.stored["ledger"]) if self.stored else None
        self.secure_noise = (self.stored.get("secure_noise", int(self.flat["dp.noise-seed"]) < 0)
                             if self.stored else None)
        self.secret_cohorts = (self.stored.get("secret_cohorts", int(self.flat["fed.sampling-seed"]) < 0)
                               if self.stored else int(self.flat["fed.sampling-seed"]) < 0)
        self.population = self.stored.get("population", "unknown") if self.stored else "unknown"
        self.per_user = self.flat["fed.partition"] == "user"
        self.local = self.dp_on and self.flat.get("dp.mode", "central") == "local"
        self.distributed = self.dp_on and self.flat.get("dp.mode", "central") == "distributed"
        # A ledger holding distributed-DP (discrete Gaussian) events is accounted by RDP only.
        self.pld = self.ledger is not None and not any(getattr(e, "l2_sensitivity", None) for e in self.ledger.events)
        self.secagg = bool(self.flat.get("secagg.enabled", False))
        # Without DP every trained round released an un-noised model.
        self.rounds_released = (len({e.round for e in self.ledger.events}) if self.ledger else
                                sum(r.get("kind") == "fit" for r in rows))

    @classmethod
    def read(cls, path: Path) -> "_RunFacts":
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found: not a run directory")
        raw = json.loads((path / "config.json").read_text())
        return cls(path, raw, read_jsonl(path / "metrics.jsonl"), _load_ledger(path))


def _load_ledger(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "ledger.json"
    if path.is_file():
        return json.loads(path.read_text())
    # Runs written before ledger.json existed kept the ledger in the checkpoint only.
    ckpt = run_dir / "checkpoint.json"
    state = json.loads(ckpt.read_text()).get("ledger") if ckpt.is_file() else None
    return {"ledger": state} if state else None


# ---------------------------------------------------------------- content
def _warnings(run: _RunFacts) -> list[str]:
    warnings: list[str] = []
    if run.dp_on and run.ledger is None:
        warnings.append("DP was enabled but the privacy ledger (ledger.json) is missing: ε cannot be computed.")
    if run.secure_noise is False:
        warnings.append(f"SEEDED NOISE (dp.noise-seed={run.flat['dp.noise-seed']}): the noise is reproducible by "
                        "anyone who knows the seed. For tests and debugging only, NOT for production.")
    if run.ledger is not None and run.ledger.claims_amplification and not run.secret_cohorts:
        warnings.append(f"SEEDED COHORTS (fed.sampling-seed={run.flat['fed.sampling-seed']}): the guarantee assumes "
                        "secret sampling, and this run's cohorts can be replayed by anyone holding config.json. "
                        "Against such an observer only the ε without amplification holds "
                        f"({_eps(run.ledger.epsilon(Accountant.RDP, amplification=False))} RDP).")
    if run.ledger and isinstance(run.population, int) and run.ledger.delta >= 1 / run.population:
        warnings.append(f"δ = {run.ledger.delta:g} is not below 1/N = {1 / run.population:.3g}: the guarantee is weak.")
    return warnings


def _parameters(run: _RunFacts) -> dict[str, Any]:
    f, dp_on = run.flat, run.dp_on
    return {
        "noise_multiplier": (min((e.noise_multiplier for e in run.ledger.events), default=None) if run.distributed
                             and run.ledger else f["dp.noise-multiplier"] if dp_on else None),
        "clip": f["dp.clip"] if dp_on else None,
        "sample_rate": f["fed.sample-rate"],
        "delta": run.ledger.delta if run.ledger else None,
        "rounds_configured": f["fed.rounds"],
        "rounds_released": run.rounds_released,
        "events": len(run.ledger.events) if run.ledger else 0,
        "population": run.population,
        "accountant": f["dp.accountant"] if dp_on else None,
        "unit": run.ledger.unit.value if run.ledger else None,
        "relation": run.ledger.relation.value if run.ledger else None,
        "sampling": ("Poisson, each client independently with probability q, "
                     + ("secret (OS CSPRNG)" if run.secret_cohorts else
                        f"SEEDED (fed.sampling-seed={f['fed.sampling-seed']}: reproducible, not secret)")),
        "noise_source": None if run.secure_noise is None else
        ("secure: os.urandom CSPRNG, 4 draws per coordinate" if run.secure_noise else
         "SEEDED (reproducible; NOT for production)"),
        "secure_aggregation": run.secagg,
        "partition": f["fed.partition"],
    }


def _privacy(run: _RunFacts) -> dict[str, Any]:
    """ε (both accountants, with and without amplification), its history, the budget, the
    guarantee sentence and how ε was computed."""
    ledger, flat = run.ledger, run.flat
    assert ledger is not None
    stop = next((r for r in run.rows if r.get("kind") == "stop"), None)
    accountants = list(Accountant) if run.pld else [Accountant.RDP]

    def both(**kw) -> dict[str, float | None]:
        return {a.value: (ledger.epsilon(a, **kw) if a in accountants else None) for a in Accountant}

    eps = {**both(), "delta": ledger.delta}
    target = float(flat["dp.target-epsilon"]) or None
    out: dict[str, Any] = {
        "epsilon": eps,
        "epsilon_history": _histories(ledger, pld=run.pld),
        "epsilon_without_amplification": both(amplification=False),
        "budget": {"target_epsilon": target, "accountant": flat["dp.accountant"],
                   "stopped_before_round": stop["round"] if stop else None,
                   "reason": stop.get("reason") if stop else None},
    }
    if not run.per_user:  # the same releases for one whole silo (add/remove): silo-level DP
        silo = PrivacyLedger.from_state_dict({**ledger.state_dict(), "unit": "silo",
                                              "relation": Relation.ADD_OR_REMOVE_ONE.value})
        out["silo_level_epsilon"] = {a.value: silo.epsilon(a) for a in accountants}
    out["parameters_released"] = list(dict.fromkeys(n for e in ledger.events for n in e.parameters))
    n = run.rounds_released
    who = "user" if run.per_user else "user of a silo"
    released = (f"each update its device sent, and hence the item model after each of {n} rounds," if run.local else
                f"the item model released after each of {n} rounds")
    observer = ("against anyone, the server included" if run.local else
                "against anyone who sees the released models but not the cohorts; against the server, which knows "
                f"the cohorts, ε = {_eps(out['epsilon_without_amplification']['rdp'])} (no amplification: only the "
                "noise of each round's surviving devices, assumed honest, protects a user, and only while the server "
                "runs SecAgg+ honestly: one that declares live devices dead unmasks a sum with less noise)"
                if run.distributed else
                "against anyone who sees the released models but not the cohorts (not against the server: see "
                "'what the server sees')")
    pld = f"PLD gives ε = {_eps(eps['pld'])}" if run.pld else "RDP only: no PLD exists for a sum of discrete Gaussians"
    out["guarantee"] = (f"For any one {who}, {released} is (ε = {_eps(eps['rdp'])}, δ = {ledger.delta:g})-differentially "
                        f"private (RDP; {pld}), {observer}.")
    out["accounting_method"] = (
        f"ε is recomputed from the privacy ledger with Google's dp-accounting: RDP over Opacus' orders "
        f"(α = {RDP_ORDERS[0]:g}…{RDP_ORDERS[-1]:g}, {len(RDP_ORDERS)} orders; replace-one with Poisson sampling is "
        f"integrated numerically over the pair dp-accounting's PLD uses) and PLD (pessimistic, value grid "
        f"{PLD_VALUE_DISCRETIZATION_INTERVAL:g}), under the {ledger.relation.value} relation, composing " + (
            f"one Gaussian mechanism per round (the device's noise σC; no amplification by sampling) over all {n} "
            f"rounds, at δ = {ledger.delta:g}. Conservative: a user is charged for every round, also those it did not "
            "take part in; each device also keeps its own ledger of the rounds it actually reported in."
            if run.local else
            f"one distributed discrete Gaussian release per round ([KLS21] Theorem 1 and Proposition 14: rounding, "
            f"the sum of m devices' shares and its τ term, as the round ran), amplified by Poisson sampling at rate q "
            f"(Zhu & Wang 2019, Theorem 5), over all {n} released rounds, at δ = {ledger.delta:g}, RDP only. A round "
            "with fewer survivors than its shares were sized for released the server's own Gaussian noise instead, "
            "charged as such."
            if run.distributed else
            f"one Poisson-subsampled Gaussian mechanism (σ, q) per release over all {n} released rounds, at "
            f"δ = {ledger.delta:g}. Rounds where nobody reported, and rounds whose secure aggregation did not "
            "complete, still released noise and are charged."))
    return out


def _histories(ledger: PrivacyLedger, *, pld: bool = True) -> dict[str, Any]:
    """ε after each released round (RDP: every round; PLD: every round up to 300, else ~50 points;
    none for a ledger PLD cannot account)."""
    rdp = ledger.epsilon_history(Accountant.RDP)
    rounds = [r for r, _ in rdp]
    if not pld:
        return {"rdp": [list(p) for p in rdp], "pld": [], "pld_subsampled_rounds": False}
    if len(rounds) <= PLD_FULL_HISTORY_MAX_ROUNDS:
        pld, sampled = ledger.epsilon_history(Accountant.PLD), False
    else:  # each point composes a prefix afresh (self-composition of merged rounds is fast)
        picks = sorted({rounds[round(i * (len(rounds) - 1) / (PLD_HISTORY_POINTS - 1))]
                        for i in range(PLD_HISTORY_POINTS)})
        pld, sampled = [], True
        for r in picks:
            prefix = PrivacyLedger(delta=ledger.delta, unit=ledger.unit, relation=ledger.relation)
            for event in ledger.events:
                if event.round <= r:
                    prefix.record(event)
            pld.append((r, prefix.epsilon(Accountant.PLD)))
    return {"rdp": [list(p) for p in rdp], "pld": [list(p) for p in pld], "pld_subsampled_rounds": sampled}


def _silo_dp_sgd(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "client_epsilons.json"
    if not path.is_file():
        return {"used": False, "note": "user-level DP-SGD inside silos: not used in this run"}
    data = json.loads(path.read_text())
    v = sorted(float(x) for x in (data.values() if isinstance(data, dict) else data))
    return {"used": True, "client_epsilons": v,
            "summary": {"clients": len(v), "min": v[0], "median": v[len(v) // 2], "max": v[-1]}
            if v else {"clients": 0},
            "note": "ε of each silo's own DP-SGD, for one user of that silo against anyone who sees the silo's "
                    "update (the server included), composed over every round the silo trained"}


def _claims(run: _RunFacts) -> dict[str, Any]:
    """What a privacy officer signs: unit, relation, amplification, what the server sees, and
    what is outside ε -- each a sentence true for this run."""
    pop = run.population
    if not run.dp_on:
        unit = relation = amplification = None
    elif run.per_user:
        unit = "one user: all of their ratings (one device)"
        relation = ("replace-one: any two data sets of one device (its noised update moves by up to 2C); a device "
                    "that is sampled always sends" if run.local else
                    f"zero-out: one user's update replaced by the zero vector (its device still adds its noise share); "
                    f"N = {pop} fixes the denominator q·N, so one user moves the sum by at most C (after rounding, "
                    "the [KLS21] bound)" if run.distributed else
                    f"add/remove one user (zero-out: the population size N = {pop} that fixes the denominator q·N "
                    "is public, so one user changes the sum by at most C)")
    else:
        unit = ("one user inside a silo (the silo's clipped update moves by up to 2C when one of its users "
                "changes); the report also gives ε for one whole silo")
        relation = "replace-one: a user of a silo replaced by any other (the silo sends either way)"
    if run.dp_on and run.local:
        amplification = {"claimed": False, "holds": None,
                         "why": "the server sees which devices report: every round is charged to every user"}
    elif run.dp_on:
        amplification = {"claimed": True, "holds": run.secret_cohorts,
                         "why": ("each client joins a round independently with probability q, drawn by the server from "
                                 "the OS CSPRNG and never released (the run directory keeps counts only), so an "
                                 "observer of the released model does not know who took part" if run.secret_cohorts else
                                 "NOT for this run: its cohorts were seeded (fed.sampling-seed) and can be replayed "
                                 "from config.json; against anyone who can, use the ε without amplification")}
    return {"unit": unit, "relation": relation, "amplification": amplification,
            "server_sees": _server_sees(run), "outside_epsilon": _outside_epsilon(run)}


def _server_sees(run: _RunFacts) -> str:
    if run.local:
        return ("each sampled device's noised update" + (" (under SecAgg+ only their sum)" if run.secagg else "")
                + "; every update is (ε, δ)-DP on its own, so the guarantee holds against the server too")
    if run.distributed:
        return ("who was asked and who survived each round, and the sum of the survivors' rotated, rounded updates "
                "with their discrete noise shares, modulo the field: already noised when unmasked (it adds nothing). "
                "Against the server the guarantee is the ε without amplification, assuming each round's fewest "
                "survivors are honest devices that added their shares")
    if run.dp_on and run.secagg:
        return ("the EXACT sum of the cohort's clipped updates: SecAgg+ hides single updates, but the server unmasks "
                "the sum and only then adds the noise. Against the server itself there is no DP guarantee on that "
                "sum; it is trusted to add the noise and to discard the sum (central DP).")
    if run.dp_on:
        return ("each sampled client's clipped update in plaintext (no secure aggregation); it adds the noise to their "
                "sum. Against the server there is no DP guarantee (central DP, trusted server).")
    return ("the sum of the cohort's updates (SecAgg+)" if run.secagg else
            "each sampled client's update in plaintext") + "; no DP guarantee against anyone."


def _outside_epsilon(run: _RunFacts) -> list[str]:
    out = [
        "Validation and test metrics (metrics.jsonl, summary.md, this report) are computed on un-noised held-out "
        "data and published as they are.",
        "Each client's evaluation sums (ranking metrics summed over its users) and user count reach the server in "
        "plaintext, under SecAgg+ too.",
        "Participation metadata: the server knows whom it asked, who replied and when; metrics.jsonl keeps the "
        "number of sampled and participating clients per round.",
        "Hyper-parameters chosen on this data set's validation split (for example the user regulariser the README "
        "recommends under DP) cost privacy that no ledger accounts for.",
    ]
    if not run.secagg and not run.local:
        out.insert(2, "Each client's training loss reaches the server in plaintext (without SecAgg+ and local DP).")
    if not run.per_user and run.dp_on:
        out.append("Inside a silo, the silo itself sees its users' raw ratings; its own DP-SGD (when on) is "
                   "reported separately.")
    return out


def _trust_model(run: _RunFacts) -> list[dict[str, str]]:
    holder = "The device" if run.per_user else "Each silo (client)"
    update = ("clipped and locally noised update (L2 ≤ C, then + N(0, (σC)²) per coordinate)" if run.local else
              "clipped update (L2 ≤ C), rotated, rounded and noised with its discrete share, as masked field "
              "elements" if run.distributed else
              "clipped update (L2 ≤ C)" if run.dp_on else "update (not clipped: DP is off)")
    model = ("covered by the (ε, δ) guarantee against anyone who sees it, including other users"
             if run.dp_on else "covered by no formal guarantee: it may reveal a user's ratings")
    return [
        {"party": "device", "statement": f"{holder} keeps its raw ratings and user embedding(s): they never "
                                         f"leave it. It sends only its {update}"
                                         + (", never its training loss." if (run.local or run.secagg) else
                                            " and its training loss.")},
        {"party": "server", "statement": "The server sees " + _server_sees(run)},
        {"party": "released model", "statement": f"The item model after each round is {model}."},
        {"party": "not covered", "statement": " ".join(_outside_epsilon(run))},
    ]
