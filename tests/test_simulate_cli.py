"""simulate.py as a user types it: a mistake in a flag, the config or the data ends in one line
``simulate.py: error: ...`` and exit status 2, never a traceback, and no run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def simulate(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "simulate.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


CASES = [
    (["--set", "dp.clip=inf"], "config key 'dp.clip': expected a finite number, got 'inf'"),
    (["--set", "model.init-scale=nan"], "config key 'model.init-scale': expected a finite number, got 'nan'"),
    (["--clip", "nan"], "config key 'dp.clip': expected a finite number"),
    (["--num-cpus", "-1"], "--num-cpus -1.0: expected CPUs per simulated client in (0, "),
    (["--num-cpus", "inf"], "--num-cpus inf"),
    (["--stop-after", "-3"], "--stop-after -3: expected a round ≥ 1"),
    (["--set", "fed.rounds=0"], "fed.rounds must be ≥ 1"),
    (["--set", "nonsense=1"], "unknown config key(s): nonsense"),
    (["--local-dp", "--no-dp"], "--local-dp and --no-dp contradict each other"),
    (["--distributed-dp", "--no-secagg"], "--distributed-dp needs DP and SecAgg+ on"),
    (["--distributed-dp", "--target-epsilon", "0"], "dp.mode=distributed plans the devices' noise for dp.target-epsilon"),
    (["--distributed-dp", "--set", "dp.bits=40"], "dp.bits must be in [12, 30], got 40"),
    (["--resume", "{tmp}/no-such-run"], "no-such-run"),
    (["--data", "{tmp}/no-such.csv"], "no-such.csv: no such file or directory"),
    (["--data", "{tmp}/big.csv"], "big.csv:3: column 'rating': expected a rating within"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_a_bad_flag_config_or_data_file_is_one_line_and_exit_2(tmp_path, argv, expected):
    (tmp_path / "big.csv").write_text("user,item,rating\nu1,i1,4\nu2,i1,1e308\n")
    (tmp_path / "tiny.csv").write_text("user,item,rating\nu1,i1,4\nu2,i1,1\nu2,i2,5\n")
    runs = tmp_path / "runs"
    # Should a check ever regress, the run these flags start is tiny (one round, three ratings), not ML-100K.
    safe = ["--data", str(tmp_path / "tiny.csv"), "--rounds", "1", "--runs-dir", str(runs), "--no-progress"]
    proc = simulate(*safe, *[a.format(tmp=tmp_path) for a in argv], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("simulate.py: error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert not runs.exists()  # refused before a run directory was made
