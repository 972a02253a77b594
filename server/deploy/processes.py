"""Start processes in their own sessions with a log file each, wait for their ports, and stop
whole process trees by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.deploy.errors import DeployError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: str | Path, n: int = 30) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Started:
    """``with X(...) as x:`` for what starts processes: ``start()`` on entry (a failed start stops
    what it had started), ``stop()`` on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Proc:
    """A process this module started: its command, its log file and the Popen handle."""

    name: str
    command: list[str]
    log: Path
    popen: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace") if Path(self.log).is_file() else ""


PRIVATE_UMASK = 0o077  # files 0600, directories 0700: the SuperLink's state, run directories, logs


def start_process(name: str, command: Sequence[str], log: str | Path, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None, umask: int = PRIVATE_UMASK) -> Proc:
    """Start ``command`` in its own session (signals to this process leave it alone), with
    stdout and stderr appended to ``log`` and the file-creation mask ``umask``, which every
    process it starts inherits (the SuperLink's database with its -wal and -shm, each run
    directory of a ServerApp, unpacked app bundles: 0600 files, 0700 directories)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as fh:
        popen = subprocess.Popen(list(command), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                 umask=umask)
    return Proc(name, list(command), log, popen)


def stop_processes(procs: Sequence[Proc], timeout: float = 10.0) -> None:
    """Stop ``procs`` and every process they started, each by its PID: SIGTERM to all of them
    at once, then SIGKILL for whatever is still there after ``timeout`` seconds.

    Descendants are found through the process tree and, when their parent already exited
    (orphans), through the process group each of ``procs`` was started in (its own session:
    process group id = its PID)."""
    import psutil

    groups = {proc.pid for proc in procs}

    def family() -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for proc in procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.pid not in found and os.getpgid(p.pid) in groups:
                    found[p.pid] = p
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        return found

    def send(members: Iterable[psutil.Process], sig: int) -> None:
        for p in members:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait_dead(members: Iterable[psutil.Process], limit: float) -> list[psutil.Process]:
        """Those still running after ``limit`` s; a zombie (dead, parent yet to reap) counts as dead."""
        pending = list(members)
        deadline = time.monotonic() + limit
        while pending:
            for proc in procs:
                proc.popen.poll()  # reap our own children as they exit
            still = []
            for p in pending:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        still.append(p)
                except psutil.NoSuchProcess:
                    pass
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return pending

    members = family()
    send(members.values(), signal.SIGTERM)
    alive = wait_dead(members.values(), timeout)
    rest = {p.pid: p for p in alive}
    rest.update({pid: p for pid, p in family().items() if pid not in members})  # spawned while stopping
    if rest:
        send(rest.values(), signal.SIGKILL)
        wait_dead(rest.values(), 5.0)
    for proc in procs:
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # cannot happen after SIGKILL; keep the reaper honest
            pass


def stop_process(proc: Proc, timeout: float = 10.0) -> None:
    """:func:`stop_processes` for one process (and everything it started)."""
    stop_processes([proc], timeout)


def wait_for_port(proc: Proc, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeployError(f"{proc.name} exited with status {proc.popen.returncode} before opening "
                              f"{host}:{port}; its log {proc.log} ends:\n{tail(proc.log)}")
        if port_open(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"{proc.name} did not open {host}:{port} within {timeout:.0f} s; its log {proc.log} ends:\n"
                      f"{tail(proc.log)}")
