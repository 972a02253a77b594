"""docs/ARCHITECTURE.md lists every module: a new file that nobody places in the layout fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "benchmarks")


def _layout() -> str:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    match = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S)
    assert match, "docs/ARCHITECTURE.md has no ## Layout code block"
    return match.group(1)


def _modules() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        files = [Path(f) for f in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the files on disk
        files = [p.relative_to(ROOT) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return sorted(f for f in files if f.suffix == ".py" and f.name not in ("__init__.py", "__main__.py")
                  and not f.name.startswith("_"))


def test_every_module_is_placed_in_the_layout():
    layout = _layout()
    missing = [str(m) for m in _modules() if not re.search(rf"(?<![\w.]){re.escape(m.name)}\b", layout)]
    assert not missing, f"docs/ARCHITECTURE.md's layout does not mention: {', '.join(missing)}"


def test_every_folder_is_placed_in_the_layout():
    layout = _layout()
    folders = sorted({m.parent for m in _modules() if m.parent != Path(".")})
    missing = [str(f) for f in folders if not re.search(rf"(?<![\w.]){re.escape(f.name)}/", layout)]
    assert not missing, f"docs/ARCHITECTURE.md's layout does not mention the folders: {', '.join(missing)}"


def test_every_test_the_docs_name_as_evidence_exists():
    """PRIVACY.md and SECURITY.md map each claim to the test that fails if it breaks: a renamed or
    deleted test would leave a claim with no evidence behind it."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for path, name in set(re.findall(r"(tests/test_\w+\.py)::(\w+)", text)):
            source = ROOT / path
            if not source.is_file() or not re.search(rf"(def|class) {name}", source.read_text(encoding="utf-8")):
                missing.append(f"{doc.name}: {path}::{name}")
        for path in set(re.findall(r"(tests/test_\w+\.py)", text)):
            if not (ROOT / path).is_file():
                missing.append(f"{doc.name}: {path}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(sorted(missing))
