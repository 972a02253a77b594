"""The ``fedrec`` command line (server/cli/), called in-process on tiny files written here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from server.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_ratings(path: Path, n_users: int = 12, n_items: int = 40, per_user: int = 15, seed: int = 0) -> Path:
    """``n_users`` users in 4 taste groups over ``n_items`` items, ``per_user`` ratings each."""
    rng = np.random.default_rng(seed)
    block = n_items // 4
    rows = ["user,item,rating,timestamp"]
    for u in range(n_users):
        own = rng.choice(np.arange((u % 4) * block, (u % 4 + 1) * block), size=per_user - 5, replace=False)
        other = rng.choice(np.setdiff1d(np.arange(n_items), own), size=5, replace=False)
        rows += [f"u{u},i{i},{rng.integers(1, 6)},{1000 + t}" for t, i in enumerate(np.r_[own, other])]
    path.write_text("\n".join(rows) + "\n")
    return path


def one_line_error(err: str) -> str:
    """stderr of a refused command: one line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "expected an error message on stderr"
    return lines[-1]


# ---------------------------------------------------------------- privacy plan
def test_privacy_plan_prints_a_sigma_that_meets_the_target(capsys):
    from common.privacy.ledger import Accountant
    from common.privacy.plan import epsilon_for

    target, delta, rounds, q = 3.0, 1e-5, 100, 0.05
    code = main(["privacy", "plan", "--target-epsilon", str(target), "--delta", str(delta), "--rounds", str(rounds),
                 "--clients-per-round", "10", "--population", "200"])
    out = capsys.readouterr().out
    assert code == 0
    sigma = float(re.search(r"sigma = ([0-9.]+)", out).group(1))
    kwargs = {"sample_rate": q, "delta": delta, "rounds": rounds, "accountant": Accountant.RDP}
    assert epsilon_for(noise_multiplier=sigma, **kwargs) <= target
    assert epsilon_for(noise_multiplier=sigma - 0.001, **kwargs) > target  # the smallest such sigma
    # the table: the planned sigma with its RDP and PLD epsilon, PLD below RDP
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [f"{sigma:.3f}"])
    eps_rdp, eps_pld = float(row[1]), float(row[2])
    assert eps_pld <= eps_rdp <= target
    assert "eps_rdp" in out and "eps_pld" in out


def test_privacy_plan_with_the_pld_accountant_meets_the_target_under_pld(capsys):
    from common.privacy.ledger import Accountant
    from common.privacy.plan import epsilon_for

    code = main(["privacy", "plan", "--target-epsilon", "2", "--delta", "1e-5", "--rounds", "20",
                 "--sample-rate", "0.1", "--accountant", "pld"])
    out = capsys.readouterr().out
    assert code == 0
    sigma = float(re.search(r"sigma = ([0-9.]+)", out).group(1))
    assert epsilon_for(noise_multiplier=sigma, sample_rate=0.1, delta=1e-5, rounds=20,
                       accountant=Accountant.PLD) <= 2


def test_privacy_plan_unreachable_target_exits_2(capsys):
    code = main(["privacy", "plan", "--target-epsilon", "0.01", "--delta", "1e-5", "--rounds", "1000",
                 "--sample-rate", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "unreachable" in one_line_error(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize("args, named", [
    (["--target-epsilon", "-1", "--delta", "1e-5", "--rounds", "10", "--sample-rate", "0.1"], "--target-epsilon"),
    (["--target-epsilon", "1", "--delta", "2", "--rounds", "10", "--sample-rate", "0.1"], "--delta"),
    (["--target-epsilon", "1", "--delta", "1e-5", "--rounds", "ten", "--sample-rate", "0.1"], "--rounds"),
    (["--target-epsilon", "1", "--delta", "1e-5", "--rounds", "10", "--clients-per-round", "5"], "--population"),
    (["--target-epsilon", "1", "--delta", "1e-5", "--rounds", "10", "--clients-per-round", "50",
      "--population", "10"], "population"),
])
def test_privacy_plan_bad_numbers_exit_2_naming_the_argument(capsys, args, named):
    assert main(["privacy", "plan", *args]) == 2
    assert named in one_line_error(capsys.readouterr().err)


DDP = ["privacy", "plan", "--distributed", "--target-epsilon", "4", "--delta", "1e-5", "--rounds", "50",
       "--sample-rate", "0.05", "--max-cohort", "40", "--min-survivors", "10", "--clip", "0.5", "--dim", "5000"]


def test_privacy_plan_distributed_prints_each_devices_noise_per_bit_width(capsys):
    from common.privacy.distributed_plan import plan_distributed

    assert main([*DDP, "--bits", "8", "14", "18"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["14"], ["18"])}
    assert set(rows) == {"14", "18"} and "refused: 8 bits" in out and "use at least" in out
    header = next(line.split() for line in out.splitlines() if line.startswith("bits"))
    for bits, row in rows.items():
        cell = dict(zip(header, row, strict=True))
        plan = plan_distributed(target_epsilon=4.0, delta=1e-5, rounds=50, sample_rate=0.05, modulus_bits=int(bits),
                                min_survivors=10, max_cohort=40, clip=0.5, dim=5000)
        assert int(cell["sigma2_grid"]) == plan.local_variance and float(cell["eps_released"]) <= 4.0
        assert float(cell["eps_server"]) > 4.0
    assert "central DP at the same target: sigma =" in out


@pytest.mark.parametrize("extra, named", [
    (["--local"], "--local"), (["--accountant", "pld"], "RDP only"), (["--bits", "6"], "no bit width"),
])
def test_privacy_plan_distributed_mistakes_exit_2(capsys, extra, named):
    assert main([*DDP, *extra]) == 2
    assert named in one_line_error(capsys.readouterr().err)


def test_privacy_plan_distributed_needs_the_minimum_survivors_and_a_cohort_bound(capsys):
    without = [a for a in DDP if a not in ("--min-survivors", "10")]
    assert main(without) == 2 and "--min-survivors" in one_line_error(capsys.readouterr().err)
    no_cohort = [a for a in DDP if a not in ("--max-cohort", "40")]
    assert main(no_cohort) == 2 and "--max-cohort" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- data
def test_data_info_prints_user_and_item_counts(tmp_path, capsys):
    path = write_ratings(tmp_path / "ratings.csv", n_users=12, n_items=40)
    with path.open("a") as fh:
        fh.write("u0,i999,5,1\nu0,i999,4,2\n")  # a duplicate pair: the reader drops one and says so
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\b12 users\b", out), out
    n_items = len({line.split(",")[1] for line in path.read_text().splitlines()[1:]})
    assert re.search(rf"\b{n_items} items\b", out), out
    assert "duplicate" in out


def test_data_info_broken_csv_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.csv"
    path.write_text("user,item,rating\nu1,i1,5\nu1,i2,five\nu2,i1,3\n")
    assert main(["data", "info", str(path)]) == 2
    captured = capsys.readouterr()
    error = one_line_error(captured.err)
    assert f"{path}:3" in error, error
    assert "rating" in error
    assert captured.out == ""


def test_data_info_missing_path_exits_2(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in one_line_error(capsys.readouterr().err)


def test_data_fetch_with_a_broken_wheel_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))  # nothing cached: the wheel is read
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    wheel.write_text("not a zip file")
    assert main(["data", "fetch", "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a recbole 1.2.1 wheel" in err


def test_data_fetch_missing_wheel_exits_2(tmp_path, capsys):
    assert main(["data", "fetch", "--wheel", str(tmp_path / "missing.whl")]) == 2
    assert "missing.whl" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- train-central
def test_train_central_writes_a_run_dir(tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    data = write_ratings(tmp_path / "ratings.csv", n_users=12, n_items=40)
    runs = tmp_path / "runs"
    code = main(["train-central", "--data", str(data), "--epochs", "3", "--dim", "8", "--lr", "0.05",
                 "--runs-dir", str(runs), "--no-progress", "--set", "central.batch-users=4"])
    out = capsys.readouterr().out
    assert code == 0
    (run,) = runs.iterdir()
    assert str(run) in out
    for name in ("NDCG@10", "Recall@10", "HR@10", "MRR@10", "coverage@10", "novelty@10"):
        assert name in out
    assert {p.name for p in run.iterdir()} >= {"config.json", "central_metrics.json", "model.safetensors"}
    assert not (run / "user_vectors.safetensors").exists()

    config = json.loads((run / "config.json").read_text())
    assert config["central.epochs"] == 3 and config["model.dim"] == 8 and config["central.batch-users"] == 4
    assert config["data.source"] == str(data)
    metrics = json.loads((run / "central_metrics.json").read_text())
    assert {"valid", "test", "best_epoch", "seconds_to_best", "history"} <= set(metrics)
    assert 1 <= metrics["best_epoch"] <= 3 and len(metrics["history"]) == 3
    assert 0 <= metrics["test"]["ndcg@10"] <= 1

    from common import keys
    from common.serialization import load_arrays
    from server.run_dir import RunDir

    arrays = load_arrays(run / "model.safetensors")
    assert arrays[keys.ITEM_PARAM_NAMES[0]].shape == (40, 8)
    assert RunDir(run).config().model.dim == 8


def test_train_central_bad_set_key_exits_2_naming_it(tmp_path, capsys):
    data = write_ratings(tmp_path / "ratings.csv")
    runs = tmp_path / "runs"
    code = main(["train-central", "--data", str(data), "--runs-dir", str(runs), "--set", "bad.key=1"])
    assert code == 2
    assert "bad.key" in one_line_error(capsys.readouterr().err)
    assert not runs.exists()  # refused before anything was written


@pytest.mark.parametrize("args, named", [
    (["--set", "central.patience=soon"], "central.patience"),
    (["--set", "model.user-reg=0"], "model.user-reg"),
    (["--set", "central.patience"], "KEY=VALUE"),
    (["--epochs", "0"], "--epochs"),
    (["--data", "/no/such/ratings.csv"], "/no/such/ratings.csv"),
])
def test_train_central_user_mistakes_exit_2(tmp_path, capsys, args, named):
    assert main(["train-central", "--runs-dir", str(tmp_path / "runs"), "--no-progress", *args]) == 2
    assert named in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- report
def test_report_without_the_report_module_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "server.report", None)  # import of server.report fails
    assert main(["report", str(tmp_path)]) == 2
    assert "privacy report not available in this version" in capsys.readouterr().err


def test_report_prints_the_paths_written(tmp_path, monkeypatch, capsys):
    calls = []

    def write_report(run_dir: Path) -> list[Path]:
        calls.append(run_dir)
        return [run_dir / "privacy.md", run_dir / "privacy.json"]

    monkeypatch.setitem(sys.modules, "server.report", types.SimpleNamespace(write_report=write_report))
    assert main(["report", str(tmp_path)]) == 0
    assert calls == [tmp_path]
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "privacy.md"), str(tmp_path / "privacy.json")]


def test_report_missing_run_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- entry point
def test_module_help_runs_as_a_script():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("data", "train-central", "privacy", "report"):
        assert command in proc.stdout


def test_no_command_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
