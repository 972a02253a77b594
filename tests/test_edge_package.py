"""The edge package: the wheel with the ``[client]`` extra installs into a fresh virtual
environment (no system site-packages) and gives a working ``fedrec-client`` without the
server's or the simulation's dependencies (no Ray, no matplotlib).

One venv, a few minutes: pip resolves torch to the local CPU wheel through pip's own config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "common", "client", "server")
# pip's words when it cannot reach a package index (not when a package is simply wrong)
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                         r"Network is unreachable|Connection refused|ConnectTimeout|ReadTimeout|"
                         r"No matching distribution found|Could not find a version that satisfies")


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_client_wheel_installs_alone_and_runs(tmp_path):
    # PYTHONPATH would let the checkout shadow the installed wheel: the venv must stand alone.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["FLWR_TELEMETRY_ENABLED"] = "0"

    source = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    source.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, source / name)
    wheels = tmp_path / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w", wheels],
                cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("fedrec-*.whl")

    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    installed = run([python, "-m", "pip", "install", f"{wheel}[client]"], cwd=tmp_path, env=env, timeout=1800)
    if installed.returncode != 0 and UNREACHABLE.search(installed.stdout + installed.stderr):
        last = (installed.stderr.strip() or installed.stdout.strip()).splitlines()[-1]
        pytest.skip(f"the package index is unreachable from here, cannot install fedrec[client]: {last}")
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    imported = run([python, "-c", "import client.app, client.cli, client.store; print(client.cli.__file__)"],
                   cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr
    assert str(env_dir) in imported.stdout  # the installed copy, not the checkout
    assert run([python, "-m", "pip", "show", "ray"], cwd=tmp_path, env=env).returncode != 0
    assert run([python, "-c", "import matplotlib"], cwd=tmp_path, env=env).returncode != 0
    helped = run([bin_dir / "fedrec-client", "--help"], cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "recommend" in helped.stdout and "join" in helped.stdout
    assert run([bin_dir / "flower-supernode", "--help"], cwd=tmp_path, env=env).returncode == 0

    size = subprocess.run(["du", "-sh", env_dir], capture_output=True, text=True).stdout.split()[0]
    print(f"\nfedrec[client] venv: {size} installed at {env_dir}")
