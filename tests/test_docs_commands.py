"""Every command that README.md and docs/*.md show works as written (issue #13).

The commands are parsed out of the shell code blocks (```bash) and the inline code of each
file: ``python simulate.py ...``, ``python benchmarks/X.py ...``, ``python -m server.X ...``,
``fedrec ...`` and ``fedrec-client ...``. Each runs with ``--help`` appended, in a subprocess
from the repository root, and must exit 0: argparse checks every option and value the command
names on its way to the help (an option renamed, a choice gone, a subcommand moved, a module
that no longer imports all fail), and the help stops it before it does anything.

Notation of the docs: ``[--json out.json]`` is kept without its brackets, ``...`` is dropped,
``certs|keys|sign`` is one command per alternative; comments in code blocks are not commands.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL_FENCES = {"bash", "sh", "shell", "console"}
# A command starts with one of fedrec's programs, at the start of a shell segment.
PROGRAM = re.compile(r"(?:\$ )?(?:(?:python(?:3(?:\.\d+)?)? )?(?:simulate\.py|benchmarks/\w+\.py)"
                     r"|python(?:3(?:\.\d+)?)? -m (?:server|client)(?:\.\w+)+"
                     r"|fedrec(?:-client)?)(?=\s|$)")
SEPARATORS = re.compile(r"\s*(?:&&|\|\||;|\s\|\s)\s*")
FENCE = re.compile(r"^[ \t]*```[ \t]*(\S*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
# Commands the docs name as work still to do: they must fail today (remove them once they work).
NOT_YET: dict[tuple[str, ...], str] = {}


@dataclass(frozen=True)
class DocCommand:
    argv: tuple[str, ...]  # as written, notation resolved, without the --help
    where: str  # file:line of its first appearance

    @property
    def words(self) -> str:
        return " ".join(self.argv)


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` at the start or after white space, unquoted)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def _expand(tokens: list[str]) -> list[tuple[str, ...]]:
    """The docs' notation resolved: brackets of optional parts dropped, ``...`` dropped, one
    command per alternative of ``a|b|c``."""
    words: list[list[str]] = []
    for token in tokens:
        token = token.removeprefix("[").removesuffix("]")
        if token in ("", "...", "…"):
            continue
        words.append(token.split("|") if "|" in token and not token.startswith("-") else [token])
    return [tuple(choice) for choice in itertools.product(*words)]


def commands_in(text: str, *, code_block: bool) -> list[tuple[str, ...]]:
    """The fedrec commands of a shell code block (one per line, ``\\`` continues a line) or of one
    inline code span."""
    if code_block:
        lines = [_strip_comment(line) for line in text.replace("\\\n", " ").splitlines()]
    else:
        lines = [" ".join(text.split())]
    found = []
    for line in lines:
        for segment in SEPARATORS.split(line.strip()):
            if PROGRAM.match(segment):
                try:
                    tokens = shlex.split(segment.removeprefix("$ "))
                except ValueError:  # unbalanced quotes: prose, not a command
                    continue
                found += _expand(tokens)
    return found


def doc_commands() -> list[DocCommand]:
    """Every command of README.md and docs/*.md, once, in order of first appearance."""
    seen: dict[tuple[str, ...], DocCommand] = {}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        pieces: list[tuple[int, str, bool]] = []  # (line, text, is a code block)
        for fence in FENCE.finditer(text):
            if fence.group(1).lower() in SHELL_FENCES:
                pieces.append((text.count("\n", 0, fence.start(2)) + 1, fence.group(2), True))
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers
        pieces += [(prose.count("\n", 0, span.start(1)) + 1, span.group(1), False) for span in INLINE.finditer(prose)]
        for line, piece, code_block in sorted(pieces):
            for argv in commands_in(piece, code_block=code_block):
                seen.setdefault(argv, DocCommand(argv, f"{path.relative_to(ROOT)}:{line}"))
    return list(seen.values())


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def executable(argv: tuple[str, ...]) -> list[str]:
    """``argv`` as a process to start: ``python`` is this interpreter, ``simulate.py`` or
    ``benchmarks/X.py`` alone is run with it, ``fedrec``/``fedrec-client`` is the installed
    console script (or, without an install, its entry point from pyproject.toml)."""
    program, *rest = argv
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        return [sys.executable, *rest]
    if program.endswith(".py"):
        return [sys.executable, program, *rest]
    script = Path(sys.executable).parent / program
    return [str(script), *rest] if script.is_file() else [*entry_point(program), *rest]


def entry_point(program: str) -> list[str]:
    """A console script of pyproject.toml run through this interpreter, as pip's wrapper runs it."""
    module, func = _scripts()[program].split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {program!r}; from {module} import {func}; "
                                  f"sys.exit({func}())"]


COMMANDS = doc_commands()


def test_the_docs_show_commands_of_every_program():
    # guards against a parser that silently finds nothing (every test below would pass vacuously)
    programs = {c.argv[0] if c.argv[0] != "python" else c.argv[1].split("/")[0] for c in COMMANDS}
    assert {"fedrec", "fedrec-client", "simulate.py", "benchmarks"} <= programs, programs
    assert len(COMMANDS) >= 30, [c.words for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.words for c in COMMANDS])
def test_a_documented_command_answers_help(command):
    # As in a fresh shell after the README's install: no PYTHONPATH to put the checkout on sys.path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([*executable(command.argv), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    words = tuple(w for w in command.argv if not w.startswith("-"))
    if words[:3] in NOT_YET:
        assert proc.returncode == 2, f"{command.words} works now: remove it from NOT_YET ({NOT_YET[words[:3]]})"
        return
    assert proc.returncode == 0, f"{command.where}: `{command.words} --help` exited {proc.returncode}:\n{proc.stderr}"
    assert "usage:" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(_scripts()))
def test_each_console_script_names_a_function_that_answers_help(name):
    module, func = _scripts()[name].split(":")
    assert callable(getattr(import_module(module), func))
    proc = subprocess.run([*entry_point(name), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name} "), proc.stderr


# ---------------------------------------------------------------- the parser itself

@pytest.mark.parametrize("text, code_block, expected", [
    ('python3.11 -m venv .venv && . .venv/bin/activate && pip install -e ".[sim]" && python simulate.py', True,
     [("python", "simulate.py")]),
    ("fedrec deploy items --data ml-100k --out items.csv      # the run's data.source", True,
     [("fedrec", "deploy", "items", "--data", "ml-100k", "--out", "items.csv")]),
    ("fedrec-client join --superlink h:9093 --root-certificates ca.crt \\\n    --auth-key k   # --port 9095", True,
     [("fedrec-client", "join", "--superlink", "h:9093", "--root-certificates", "ca.crt", "--auth-key", "k")]),
    ("ssh-keygen -f ~/.fedrec/node.key   # or: fedrec deploy keys --out ~/.fedrec", True, []),
    ("flwr run @fedrec/fedrec==0.1.0 fedrec --run-config 'fed.rounds=20'", True, []),
    ("python benchmarks/central.py [--json out.json]", False,
     [("python", "benchmarks/central.py", "--json", "out.json")]),
    ("fedrec deploy\n  certs|keys", False, [("fedrec", "deploy", "certs"), ("fedrec", "deploy", "keys")]),
    ("fedrec-client privacy set ...", False, [("fedrec-client", "privacy", "set")]),
    ("simulate.py --partition silo", False, [("simulate.py", "--partition", "silo")]),
    ('pip install "fedrec[client]"', False, []),
    ("fedrec[client]", False, []),
    ("dp.mode = local", False, []),
])
def test_commands_are_parsed_with_the_docs_notation(text, code_block, expected):
    assert commands_in(text, code_block=code_block) == expected
