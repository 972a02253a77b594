"""Poisoning (issue #12, docs/SECURITY.md "Poisoning"): what the server does with a round's sum
when clients send whatever they like, the attack of the lab, and `fedrec audit poisoning`.

Each defence is tested against the attack it stops: the attack is run first without it and must
succeed, so a test here cannot pass because the attack is broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.choices import Aggregate
from common.config import RunConfig
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.models import build_model
from common.poisoning import (
    Cell,
    TargetPush,
    attackers_for,
    defences,
    exposure_and_ndcg,
    plan_cells,
    run_cell,
    with_targets,
)
from common.robust import clamp_total, robust_total, sum_out_of_range
from common.rounds import RoundEngine, sum_updates
from server.cli import main
from tests.conftest import zipf_sets

torch.set_num_threads(1)

#: Seeded cohorts and noise: the cells of one test are comparable.
LAB = {"model.dim": 8, "fed.rounds": 12, "fed.sample-rate": 0.2, "fed.sampling-seed": 0, "dp.noise-seed": 0,
       "dp.target-epsilon": 0.0, "fed.server-lr": 0.05}


@pytest.fixture(scope="module")
def lab():
    return with_targets(zipf_sets())


# ---------------------------------------------------------------- the server's rules on the sum
def test_a_sum_no_honest_cohort_could_make_is_refused():
    honest = [[np.full((3, 2), 0.4), np.full(3, -0.4)] for _ in range(5)]  # every value within ±0.5
    assert sum_out_of_range(sum_updates(honest), 5, 0.5) is None
    forged = [[np.zeros((3, 2)), np.zeros(3)] for _ in range(5)]
    forged[0][1][2] = 2.5 + 0.1  # the rest of the cohort at -0.4: -1.6 + 2.6 = 1.0 is fine,
    assert sum_out_of_range(sum_updates([*honest[:4], forged[0]]), 5, 0.5) is None
    forged[0][1][2] = 10.0  # ... 8.4 is not: no five values within ±0.5 add up to it
    assert "array 1" in sum_out_of_range(sum_updates([*honest[:4], forged[0]]), 5, 0.5)
    assert "NaN" in sum_out_of_range([np.array([np.nan])], 1, 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_clamping_the_sum_never_adds_to_one_users_influence(seed):
    """The clamp is 1-Lipschitz: one user's update of norm ≤ C moves the clamped sum by ≤ C in L2,
    so the noise sized for C still covers it (the DP claim of fed.sum-clamp)."""
    rng = np.random.default_rng(seed)
    rest = [rng.normal(0, 3, size=(40, 4)), rng.normal(0, 3, size=40)]
    one = [rng.normal(size=(40, 4)), rng.normal(size=40)]
    scale = 1.0 / np.sqrt(sum(float(np.sum(a ** 2)) for a in one))
    one = [a * scale for a in one]  # norm exactly C = 1
    with_one = clamp_total([r + o for r, o in zip(rest, one)], 0.7)
    without = clamp_total(rest, 0.7)
    moved = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(with_one, without)))
    assert moved <= 1.0 + 1e-12
    assert all(np.max(np.abs(a)) <= 0.7 for a in with_one)


def test_the_sum_is_what_the_runner_added_before_bit_for_bit_and_a_median_ignores_one_outlier():
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32)] for _ in range(9)]
    for got, want in zip(robust_total(updates, Aggregate.SUM), sum_updates(updates)):
        assert np.array_equal(got, want)
    poisoned = [*updates, [np.full((6, 3), 1e6, np.float32), np.full(6, 1e6, np.float32)]]
    assert np.max(np.abs(robust_total(poisoned, Aggregate.SUM)[0])) > 1e5
    for kind in (Aggregate.MEDIAN, Aggregate.TRIMMED_MEAN):
        assert np.max(np.abs(robust_total(poisoned, kind, trim_fraction=0.1)[0])) < 50


def test_robust_aggregates_need_dp_and_secagg_off_and_the_new_keys_are_checked():
    with pytest.raises(ValueError, match="DP accounts for"):
        RunConfig.from_flat({"fed.aggregate": "median"})
    with pytest.raises(ValueError, match="DP accounts for"):
        RunConfig.from_flat({"fed.aggregate": "trimmed-mean", "dp.enabled": False})
    assert RunConfig.from_flat({"fed.aggregate": "median", "dp.enabled": False,
                                "secagg.enabled": False}).fed.aggregate == Aggregate.MEDIAN
    for key, bad in (("secagg.value-range", 0), ("secagg.value-range", 1.5), ("fed.sum-clamp", -1),
                     ("fed.trim-fraction", 0.5)):
        with pytest.raises(ValueError, match=key):
            RunConfig.from_flat({key: bad})


def test_under_secagg_the_value_range_shrinks_what_the_engine_accepts():
    cfg = RunConfig.from_flat({**LAB, "secagg.value-range": 0.1})
    engine = RoundEngine(cfg, build_model(cfg.model, n_items=5, seed=0))
    assert engine.value_bound(secure_aggregation=True) == pytest.approx(0.1)
    assert engine.value_bound(secure_aggregation=False) == pytest.approx(1.0)  # plaintext: the L2 bound governs
    total = [np.zeros((5, 8)), np.zeros(5)]
    total[0][2, 3] = 3 * 0.1 + 0.01  # three clients cannot reach it with values within ±0.1
    assert engine.secure_total(total, 3)[0] is None
    total[0][2, 3] = 0.29
    assert engine.secure_total(total, 3)[1] is None


# ---------------------------------------------------------------- the attack and the defences
def test_the_attack_works_without_a_defence_and_secagg_value_range_and_plaintext_bounds_cut_it(lab):
    """Attack first: under SecAgg+ (the server sees only the sum) 3% attackers put the new item
    into most honest users' top-10; the value range ρ = 0.01 and the plaintext path's per-update
    L2 bound take most of that away."""
    sets, targets = lab
    cfg = RunConfig.from_flat(LAB)
    table = defences(cfg, ranges=(0.01,), clamps=())

    def cell(name, target=None):
        ov, sec = table[name]
        return run_cell(cfg, sets, targets, Cell(name, ov, sec, target, 0.03))

    clean = cell("as configured (SecAgg+)")
    attacked = cell("as configured (SecAgg+)", "new")
    assert attacked["attackers"] == attackers_for(0.03, len(sets.train)) == 7
    assert attacked["rounds_attacked"] >= 3
    assert clean["er@10 new"] <= 0.05
    assert attacked["er@10 new"] >= 0.5, attacked  # the attack works
    ranged = cell("value range ±0.01·C", "new")
    assert ranged["er@10 new"] <= attacked["er@10 new"] / 2, ranged
    plain = cell("plaintext: L2 bound per update", "new")
    assert plain["er@10 new"] <= attacked["er@10 new"] / 2, plain


def test_a_coalition_that_ignores_the_range_voids_the_round_which_releases_noise_only(lab):
    """Malicious clients above the sum's range: each such round is refused (noise only), so they
    deny service in the rounds they are sampled in but never move the target."""
    sets, targets = lab

    class Overflow(TargetPush):
        def updates(self, engine, sampled, cohort, server_round):
            out = super().updates(engine, sampled, cohort, server_round)
            return [[a * 10 for a in u] for u in out]

    cfg = RunConfig.from_flat(LAB)
    adversary = Overflow(target=targets.new, count=7, secure_aggregation=True)
    result = run_inprocess(cfg, sets, adversary=adversary, secure_aggregation=True, final_eval=False)
    refused = [r for r in result.rounds if "refused" in r]
    assert adversary.rounds_sampled >= 3 and len(refused) == adversary.rounds_sampled
    assert all(r["participants"] == 0 for r in refused)
    assert result.ledger.epsilon() > 0  # every round charged, refused or not
    figures = exposure_and_ndcg(result.effective, sets, cfg, [targets.new])
    assert figures[f"er@10/{targets.new}"] <= 0.05


def test_the_lab_needs_embeddings_and_biases_and_says_so(lab):
    sets, targets = lab
    cfg = RunConfig.from_flat({**LAB, "model.kind": "hybrid"})
    with pytest.raises(ValueError, match="item embeddings"):
        TargetPush(target=1, count=1, secure_aggregation=True).updates(
            RoundEngine(cfg, build_model(cfg.model, n_items=sets.n_items, seed=0, texts=lambda: ["x"] * sets.n_items)),
            [0], 10, 1)


def test_the_plan_runs_every_defence_at_one_percent_and_the_sum_clamps_at_the_other_shares():
    cfg = RunConfig()
    cells = plan_cells(cfg)
    names = list(defences(cfg))
    assert [c.defence for c in cells if c.target is None] == names
    assert {c.defence for c in cells if c.fraction == 0.01} == set(names)
    others = {c.defence for c in cells if c.target and c.fraction != 0.01}
    assert others == {names[0], *(n for n in names if n.startswith("sum clamp"))}


# ---------------------------------------------------------------- the command
def write_zipf_csv(path, sets: EvalSets):
    rows = ["user,item,rating,timestamp"]
    for u, (tr, va, te) in enumerate(zip(sets.train, sets.valid, sets.test)):
        for t, i in enumerate(np.r_[tr, va, te]):
            rows.append(f"u{u},i{i},5,{1000 + t}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_fedrec_audit_poisoning_prints_every_cell_and_writes_json(tmp_path, capsys):
    data = write_zipf_csv(tmp_path / "ratings.csv", zipf_sets(n_users=120, n_items=100))
    out = tmp_path / "lab.json"
    assert main(["audit", "poisoning", "--data", str(data), "--rounds", "2", "--fractions", "0.03",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert len(doc["cells"]) == len(defences(RunConfig())) * 3
    assert "ER@10 long-tail" in printed and "value range ±0.01·C" in printed
    assert doc["summary"]["baseline_ndcg@10"] == doc["cells"][0]["ndcg@10"]


@pytest.mark.parametrize("args, message", [
    (["--fractions", "0.5,x"], "expected numbers"),
    (["--fractions", "1.5"], "in (0, 1)"),
    (["--run-dir", "/nonexistent/run"], "not a run directory"),
])
def test_fedrec_audit_poisoning_refuses_bad_arguments_clearly(args, message, capsys):
    assert main(["audit", "poisoning", *args]) == 2
    assert message in capsys.readouterr().err
