"""The operator's ``flwr`` CLI (Flower 1.42) driven from Python: nodes, runs, their real status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.deploy.commands import CONNECTION, executable
from server.deploy.errors import DeployError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_PARTS = ("pyproject.toml", "README.md", "common", "client", "server")  # what the FAB needs
FINISHED = "finished"


# ---------------------------------------------------------------- the app copy and run configs
def copy_app(dest: str | Path, source: str | Path = PROJECT_ROOT) -> Path:
    """A copy of the Flower app (pyproject.toml, common/, client/, server/) for ``flwr run``.

    ``flwr run`` builds its FAB from every matching file under the directory it is given, and
    rewrites ``pyproject.toml`` when it finds a legacy ``[tool.flwr.federations]`` table: a
    small private copy keeps the FAB small and the working tree untouched."""
    dest, source = Path(dest), Path(source)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in APP_PARTS:
        src = source / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def write_run_config(path: str | Path, overrides: Mapping[str, Any]) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config FILE.toml`` (flat
    ``section.key`` names, checked against RunConfig first so a typo fails here, by name)."""
    import tomli_w

    from common.config import RunConfig

    flat = RunConfig.from_flat(dict(overrides)).to_flat()  # unknown key, wrong type, out of range: raises now
    typed = {key: flat[key] for key in overrides}  # "0.5" -> 0.5, 1 -> 1.0 for a float key, ...
    path = Path(path)
    path.write_text(tomli_w.dumps(typed))
    return path


# ---------------------------------------------------------------- flwr CLI
@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  # Flower's "finished:completed", "finished:failed", "finished:stopped", "running", ...
    details: str
    seconds: float

    @property
    def finished(self) -> bool:
        return self.status.startswith(FINISHED)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flwr_cli(args: Sequence[str], *, flwr_home: str | Path, timeout: float = 120.0,
             check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1",
           "COLUMNS": "200", "TERM": "dumb"}
    result = subprocess.run([executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, stdin=subprocess.DEVNULL, umask=0o077)
    if check and result.returncode != 0:
        raise DeployError(f"flwr {' '.join(args)} exited with status {result.returncode}:\n"
                          f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result


def _json_out(result: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON document ``flwr ... --format json`` prints (other lines may precede it)."""
    text = result.stdout
    decoder = json.JSONDecoder()
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("{"):
            try:
                return decoder.raw_decode(text, offset + line.index("{"))[0]
            except json.JSONDecodeError:
                pass
        offset += len(line)
    raise DeployError(f"no JSON in the output of flwr:\n{text[-2000:]}{result.stderr[-2000:]}")


def list_nodes(flwr_home: str | Path, connection: str = CONNECTION) -> list[dict[str, Any]]:
    """``flwr supernode ls --format json``: one dict per node (node-id, status, ...)."""
    out = _json_out(flwr_cli(["supernode", "ls", connection, "--format", "json", "-v"], flwr_home=flwr_home))
    return list(out.get("nodes", []))


def list_runs(flwr_home: str | Path, connection: str = CONNECTION, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", connection, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(_json_out(flwr_cli(args, flwr_home=flwr_home)).get("runs", []))


def register_node(public_key: str | Path, flwr_home: str | Path, connection: str = CONNECTION,
                  name: str | None = None) -> int:
    """``flwr supernode register KEY.pub CONN``: the node id the SuperLink gave the key."""
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    return int(_json_out(flwr_cli(args, flwr_home=flwr_home))["node-id"])


def start_run(app_dir: str | Path, flwr_home: str | Path, *, run_config: Mapping[str, Any] | None = None,
              connection: str = CONNECTION, workdir: str | Path | None = None,
              federation_config: Mapping[str, Any] | None = None) -> int:
    """``flwr run APP CONN --run-config OVERRIDES.toml``: returns the run id (the run goes on
    in the SuperLink; ``flwr run`` itself returns at once and exits 0 even if it later fails).
    ``federation_config``: ``--federation-config`` of a simulation federation, e.g.
    ``{"num-supernodes": 943, "client-resources-num-cpus": 1}``."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        where = Path(workdir or tempfile.mkdtemp(prefix="fedrec-runcfg-"))
        args += ["--run-config", str(write_run_config(where / f"run-config-{time.time_ns()}.toml", run_config))]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
    out = _json_out(flwr_cli(args, flwr_home=flwr_home, timeout=300))
    if not out.get("success") or not out.get("run-id"):
        raise DeployError(f"flwr run did not start a run: {out}")
    return int(out["run-id"])


def wait_for_run(run_id: int, flwr_home: str | Path, *, connection: str = CONNECTION, timeout: float = 600.0,
                 poll: float = 5.0, busy: Callable[[], bool] | None = None, quiet: float = 30.0) -> RunStatus:
    """Poll ``flwr ls --run-id`` until the run is finished; its real status.

    Each ``flwr`` call is a new Python process (~1 CPU-second): while ``busy()`` says the run
    is visibly still going (a local ServerApp process is alive), it is asked only every
    ``quiet`` seconds."""
    t0 = time.monotonic()
    last_ls = -float("inf")
    status = "unknown"
    while True:
        interval = quiet if busy is not None and busy() else poll
        if time.monotonic() - last_ls >= interval:
            last_ls = time.monotonic()
            runs = list_runs(flwr_home, connection, run_id)
            row = next((r for r in runs if int(r["run-id"]) == run_id), None)
            status = str(row["status"]) if row is not None else "unknown"
            if status.startswith(FINISHED):
                return RunStatus(run_id, status, str(row.get("status-details") or ""), time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (status {status})")
        time.sleep(poll if busy is None else 1.0)  # busy() is a cheap local check


def run_log(run_id: int, flwr_home: str | Path, connection: str = CONNECTION, lines: int = 40) -> str:
    """The last ``lines`` of the run's ServerApp log (``flwr log RUN_ID CONN --show``)."""
    result = flwr_cli(["log", str(run_id), connection, "--show"], flwr_home=flwr_home, check=False)
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def stop_run(run_id: int, flwr_home: str | Path, connection: str = CONNECTION) -> None:
    """``flwr stop RUN_ID CONN``."""
    flwr_cli(["stop", str(run_id), connection], flwr_home=flwr_home)


def run_and_wait(flwr_home: str | Path, *, run_config: Mapping[str, Any] | None = None, connection: str = CONNECTION,
                 app_dir: str | Path | None = None, timeout: float = 600.0, check: bool = True,
                 workdir: str | Path | None = None) -> RunStatus:
    """``flwr run`` ``app_dir`` (a directory, or a signed bundle's ``@publisher/name==x.y.z``;
    default: an unsigned copy of this checkout, which SuperNodes with ``--trusted-entities``
    refuse), wait for the end and return the real status; with ``check`` a run that did not
    complete raises :class:`DeployError` with Flower's details."""
    work = Path(workdir or tempfile.mkdtemp(prefix="fedrec-run-"))
    app = copy_app(work / "fedrec") if app_dir is None else app_dir
    run_id = start_run(app, flwr_home, run_config=run_config, connection=connection, workdir=work)
    status = wait_for_run(run_id, flwr_home, connection=connection, timeout=timeout)
    if check and not status.ok:
        raise DeployError(f"run {run_id} ended {status.status}: {status.details}; its log ends:\n"
                          f"{run_log(run_id, flwr_home, connection)}")
    return status
