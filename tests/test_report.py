"""The privacy report: ε recomputed from the ledger, honest wording, self-contained HTML."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig
from common.privacy import Accountant, MechanismEvent, PrivacyLedger, Sampling
from common.privacy.dp_fedavg import ledger_for
from server import report as rpt

SIGMA, Q, DELTA = 1.0, 0.1, 1e-4


def _ledger(rounds: int) -> PrivacyLedger:
    ledger = ledger_for("central", DELTA)
    for r in range(1, rounds + 1):
        ledger.record(MechanismEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=1, sampling=Sampling.POISSON,
                                     parameters=("item_embeddings", "item_bias"), round=r))
    return ledger


def make_run(path: Path, *, dp: bool = True, rounds: int = 4, stop: int | None = None, secure: bool = True,
             population: int | None = None, flat: dict[str, Any] | None = None,
             client_epsilons: list[float] | None = None, audit: dict[str, Any] | None = None) -> Path:
    """A run directory written by hand: config, metrics (fit/eval/stop rows), ledger."""
    path.mkdir(parents=True)
    # SecAgg+ off unless `flat` turns it on: the trust model's plaintext wording is the default here.
    cfg = RunConfig().replace(**{"dp.enabled": dp, "dp.noise-multiplier": SIGMA, "fed.sample-rate": Q,
                                 "dp.delta": DELTA, "fed.rounds": 10, "dp.noise-seed": -1 if secure else 3,
                                 "secagg.enabled": False})
    (path / "config.json").write_text(json.dumps({**cfg.to_flat(), **(flat or {})}))
    rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        rows.append({"kind": "fit", "round": r, "sampled": 9, "participants": 9, "failures": 0, "train_loss": 7.0 - r})
        if r % 2 == 0:
            rows.append({"kind": "eval", "round": r, "phase": "valid", "users": 50, "ndcg@10": 0.01 * r,
                         "recall@10": 0.02 * r})
    if stop is not None:
        rows.append({"kind": "stop", "round": stop, "reason": "privacy budget"})
    rows.append({"kind": "eval", "round": rounds, "phase": "test", "users": 90, "ndcg@10": 0.1, "recall@10": 0.2,
                 "ndcg@20": 0.12, "recall@20": 0.3})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if dp:
        stored: dict[str, Any] = {"ledger": _ledger(rounds).state_dict(), "secure_noise": secure}
        if population is not None:
            stored["population"] = population
        (path / "ledger.json").write_text(json.dumps(stored))
    if client_epsilons is not None:
        (path / "client_epsilons.json").write_text(json.dumps(client_epsilons))
    if audit is not None:
        (path / "audit.json").write_text(json.dumps(audit))
    return path


def _written(run: Path) -> tuple[dict[str, Any], str, str]:
    def strict(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    paths = rpt.write_report(run)
    assert [p.name for p in paths] == list(rpt.FILES) and all(p.is_file() for p in paths)
    return json.loads(paths[0].read_text(), parse_constant=strict), paths[1].read_text(), paths[2].read_text()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    run = make_run(tmp_path_factory.mktemp("r") / "dp", rounds=4, population=90,
                   client_epsilons=[1.5, 2.0, 2.5, 4.0], audit={"membership AUC <b>": 0.51})
    return _written(run)


@pytest.fixture(scope="module")
def off_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    return _written(make_run(tmp_path_factory.mktemp("r") / "off", dp=False))


def test_final_epsilon_is_the_ledgers(dp_run) -> None:
    rep, md, html = dp_run
    ledger = _ledger(4)
    assert rep["epsilon"]["rdp"] == ledger.epsilon()
    assert rep["epsilon"]["pld"] == ledger.epsilon(Accountant.PLD)
    assert rep["epsilon"]["pld"] < rep["epsilon"]["rdp"]
    assert rep["epsilon"]["delta"] == DELTA
    assert rpt._eps(ledger.epsilon()) in md and rpt._eps(ledger.epsilon()) in html


def test_history_increases_and_counts_released_rounds(dp_run) -> None:
    rep, _, _ = dp_run
    for name in ("rdp", "pld"):
        hist = rep["epsilon_history"][name]
        assert [r for r, _ in hist] == [1, 2, 3, 4]
        assert all(b > a for (_, a), (_, b) in zip(hist, hist[1:]))
    assert rep["epsilon_history"]["rdp"][-1][1] == pytest.approx(rep["epsilon"]["rdp"], rel=1e-9)
    assert rep["parameters"]["rounds_released"] == rep["parameters"]["events"] == 4
    assert rep["parameters"]["rounds_configured"] == 10
    assert rep["mechanism"] == rpt.MECHANISM and rep["dp_enabled"] is True


def test_parameters_and_trust_model(dp_run) -> None:
    rep, md, html = dp_run
    p = rep["parameters"]
    assert (p["noise_multiplier"], p["clip"], p["sample_rate"], p["population"]) == (SIGMA, 1.0, Q, 90)
    assert (p["unit"], p["relation"]) == ("user", "add-or-remove-one") and p["noise_source"].startswith("secure")
    assert not rep["warnings"]
    server = next(t["statement"] for t in rep["trust_model"] if t["party"] == "server")
    assert "in plaintext" in server
    outside = " ".join(rep["claims"]["outside_epsilon"])
    assert "evaluation sums" in outside and "training loss" in outside  # SecAgg+ off: the loss goes out too
    assert "central DP" in md and "How ε was computed" in html


def test_the_report_states_what_a_privacy_officer_signs(dp_run) -> None:
    """Issue #11: unit of privacy, neighbouring relation, whether amplification is claimed and why it
    holds, what the server sees, and what is outside ε -- in the JSON, the Markdown and the HTML."""
    rep, md, html = dp_run
    c = rep["claims"]
    assert c["unit"].startswith("one user")
    assert "zero-out" in c["relation"] and "N = 90" in c["relation"]
    assert c["amplification"]["claimed"] and c["amplification"]["holds"]
    assert "OS CSPRNG" in c["amplification"]["why"]
    assert "clipped update in plaintext" in c["server_sees"]
    outside = " ".join(c["outside_epsilon"])
    for item in ("un-noised held-out", "evaluation sums", "Participation metadata", "validation split"):
        assert item in outside
    for text in (md, html):
        assert "What is claimed" in text and "outside ε" in text and "amplification by sampling" in text
    assert rep["epsilon_without_amplification"]["rdp"] > rep["epsilon"]["rdp"]


def test_silo_dp_sgd_and_audit(dp_run) -> None:
    rep, md, html = dp_run
    assert rep["silo_dp_sgd"]["used"] and rep["silo_dp_sgd"]["summary"]["max"] == 4.0
    assert rep["audit"] == {"membership AUC <b>": 0.51}
    assert "membership AUC &lt;b&gt;" in html and "<b>membership" not in html  # escaped
    assert html.count("data:image/png;base64,") == 2  # ε beside utility, record-level histogram


def test_html_is_self_contained(dp_run, off_run) -> None:
    for _, _, html in (dp_run, off_run):
        assert "data:image/png;base64," in html
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
        assert "<link" not in html and "<script" not in html and "@import" not in html


@pytest.mark.slow
def test_the_privacy_report_renders_in_a_real_browser(dp_run, tmp_path) -> None:
    """The HTML a privacy officer opens, in headless chromium: the ε box, the claims, the plot."""
    from conftest import colour_pixels, render_in_chromium

    rep, _, page_html = dp_run
    page = tmp_path / "privacy_report.html"
    page.write_text(page_html, encoding="utf-8")
    dom, pixels = render_in_chromium(page, tmp_path, height=3000)
    assert "<h2>What is claimed</h2>" in dom and "<h2>Trust model: who sees what</h2>" in dom
    assert re.search(r"ε = \d+\.\d{3}", dom)
    assert colour_pixels(pixels, (31, 119, 180)) > 200  # the ε-over-rounds plot drew


def test_dp_off_says_no_guarantee(off_run) -> None:
    rep, md, html = off_run
    assert rpt.NO_DP in md and rpt.NO_DP in html
    assert rep["dp_enabled"] is False and rep["mechanism"] is None

    def finite_epsilons(obj: Any, under: bool = False) -> list[Any]:
        if isinstance(obj, dict):
            return [x for k, v in obj.items() for x in finite_epsilons(v, under or "epsilon" in k)]
        if isinstance(obj, list):
            return [x for v in obj for x in finite_epsilons(v, under)]
        return [obj] if under and isinstance(obj, (int, float)) and math.isfinite(obj) else []

    assert finite_epsilons(rep) == []
    assert "ε over rounds" not in html and html.count("data:image/png;base64,") == 1  # utility only
    assert rep["parameters"]["rounds_released"] == 4  # un-noised models were still released


def test_budget_stop_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", rounds=3, stop=4, flat={"dp.target-epsilon": 2.5})
    rep, md, html = _written(run)
    assert rep["budget"] == {"target_epsilon": 2.5, "accountant": "rdp", "stopped_before_round": 4,
                             "reason": "privacy budget"}
    assert "stopped before round 4" in md and "stopped before round 4" in html


def test_seeded_noise_unknown_population_and_secagg(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", rounds=2, secure=False, flat={"secagg.enabled": True})
    rep = rpt.build_report(run)
    assert rep["parameters"]["population"] == "unknown"
    assert rep["parameters"]["noise_source"].startswith("SEEDED")
    assert any("NOT for production" in w for w in rep["warnings"])
    server = next(t["statement"] for t in rep["trust_model"] if t["party"] == "server")
    # Issue #11 (11): with central DP the server unmasks the EXACT sum and only then adds the noise.
    assert "EXACT sum" in server and "noised sum" not in server
    assert "training loss" not in " ".join(rep["claims"]["outside_epsilon"])  # under SecAgg+ it stays home
    assert rep["silo_dp_sgd"]["note"].endswith("not used in this run") and "audit" not in rep
    _, md, html = _written(run)
    assert "NOT for production" in md and "NOT for production" in html


def test_long_runs_sample_the_pld_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpt, "PLD_FULL_HISTORY_MAX_ROUNDS", 4)
    monkeypatch.setattr(rpt, "PLD_HISTORY_POINTS", 3)
    hist = rpt.build_report(make_run(tmp_path / "run", rounds=6))["epsilon_history"]
    assert hist["pld_subsampled_rounds"] and len(hist["rdp"]) == 6
    full = dict(_ledger(6).epsilon_history(Accountant.PLD))
    assert [r for r, _ in hist["pld"]] == [1, 3, 6]  # evenly spaced, first and last included
    assert all(e == pytest.approx(full[r], rel=1e-6) for r, e in hist["pld"])


def test_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        rpt.build_report(tmp_path)


def test_local_dp_run_is_reported_as_local(tmp_path: Path) -> None:
    from common.privacy.dp_fedavg import ledger_for, release_event

    run = make_run(tmp_path / "run", flat={"dp.mode": "local", "dp.noise-multiplier": 12.0})
    ledger = ledger_for("local", DELTA)
    for r in range(1, 5):
        ledger.record(release_event("local", noise_multiplier=12.0, sample_rate=Q,
                                    parameters=("item_embeddings", "item_bias"), server_round=r))
    (run / "ledger.json").write_text(json.dumps({"ledger": ledger.state_dict(), "secure_noise": True}))
    rep, md, html = _written(run)
    assert rep["dp_mode"] == "local" and rep["mechanism"].startswith("local DP")
    assert rep["epsilon"]["rdp"] == pytest.approx(ledger.epsilon())
    assert rep["parameters"]["relation"] == "replace-one" and "2C" in rep["claims"]["relation"]
    assert rep["claims"]["amplification"]["claimed"] is False
    assert "each update its device sent" in rep["guarantee"] and "the server included" in rep["guarantee"]
    device = next(t["statement"] for t in rep["trust_model"] if t["party"] == "device")
    assert "locally noised" in device and "never its training loss" in device
    assert "against the server too" in md and "replace-one" in html


def test_seeded_cohorts_are_reported_as_breaking_the_sampling_assumption(tmp_path: Path) -> None:
    """Issue #11 (1): a run whose cohorts can be replayed from config.json does not get the
    amplification; the report says so and gives the ε that holds against such an observer."""
    run = make_run(tmp_path / "run", rounds=4, flat={"fed.sampling-seed": 5})
    stored = json.loads((run / "ledger.json").read_text())
    (run / "ledger.json").write_text(json.dumps({**stored, "secret_cohorts": False}))
    rep, md, html = _written(run)
    assert any("SEEDED COHORTS" in w for w in rep["warnings"])
    assert rep["claims"]["amplification"] == {**rep["claims"]["amplification"], "claimed": True, "holds": False}
    assert "SEEDED" in rep["parameters"]["sampling"]
    assert "does NOT hold" in md and "SEEDED COHORTS" in html
    unamplified = _ledger(4).epsilon(amplification=False)
    assert rep["epsilon_without_amplification"]["rdp"] == pytest.approx(unamplified)
    assert rpt._eps(unamplified) in " ".join(rep["warnings"])


def test_silo_runs_report_a_user_inside_a_silo_as_replace_one(tmp_path: Path) -> None:
    """Issue #11 (5): one user of a sampled silo moves the silo's update by up to 2C."""
    from common.privacy.dp_fedavg import ledger_for, release_event

    run = make_run(tmp_path / "run", flat={"fed.partition": "silo", "fed.num-silos": 10})
    ledger = ledger_for("central", DELTA, "silo")
    for r in range(1, 5):
        ledger.record(release_event("central", noise_multiplier=SIGMA, sample_rate=Q,
                                    parameters=("item_embeddings", "item_bias"), server_round=r))
    (run / "ledger.json").write_text(json.dumps({"ledger": ledger.state_dict(), "secure_noise": True}))
    rep, md, _ = _written(run)
    assert rep["parameters"]["relation"] == "replace-one"
    assert "user inside a silo" in rep["claims"]["unit"] and "user of a silo" in rep["guarantee"]
    user_eps, silo_eps = rep["epsilon"]["pld"], rep["silo_level_epsilon"]["pld"]
    assert user_eps > silo_eps == pytest.approx(_ledger(4).epsilon(Accountant.PLD))
    assert "one whole silo" in md
