"""Shared fixtures: small data sets written to disk in the formats users have."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


#: Ten MovieLens-style item texts in three taste clusters (animation, war, thriller), for the text side.
ITEM_TEXTS = [
    "Toy Story (1995) Genres: Animation, Children's, Comedy.",
    "Aladdin (1992) Genres: Animation, Children's, Comedy, Musical.",
    "Lion King, The (1994) Genres: Animation, Children's, Musical.",
    "Apocalypse Now (1979) Genres: Drama, War.",
    "Full Metal Jacket (1987) Genres: Action, Drama, War.",
    "Alien (1979) Genres: Action, Horror, Sci-Fi, Thriller.",
    "Psycho (1960) Genres: Horror, Romance, Thriller.",
    "Casablanca (1942) Genres: Drama, Romance, War.",
    "Fargo (1996) Genres: Crime, Drama, Thriller.",
    "Star Wars (1977) Genres: Action, Adventure, Romance, Sci-Fi, War.",
]


def write_block_csv(path: Path, n_users: int = 12, n_items: int = 48, per_user: int = 16, seed: int = 0) -> Path:
    """Users in 4 taste groups, each preferring its own block of items (plus a little noise)."""
    rng = np.random.default_rng(seed)
    block = n_items // 4
    rows = ["user,item,rating,timestamp"]
    for u in range(n_users):
        group = u % 4
        own = rng.choice(np.arange(group * block, (group + 1) * block), size=min(per_user - 4, block), replace=False)
        other = rng.choice(np.setdiff1d(np.arange(n_items), own), size=per_user - len(own), replace=False)
        for t, i in enumerate(np.r_[own, other]):
            rows.append(f"u{u},i{i},{rng.integers(1, 6)},{1000 + t}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def block_csv(tmp_path: Path) -> Path:
    return write_block_csv(tmp_path / "ratings.csv")


def zipf_sets(n_users: int = 240, n_items: int = 160, per_user: int = 14, seed: int = 0) -> "common.evaluation.EvalSets":  # noqa: F821
    """Users rating items with Zipf-like popularity: a long tail (items with 2-3 ratings) and a
    middle (10-30 ratings) exist."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.9
    p /= p.sum()
    train, valid, test = [], [], []
    for _ in range(n_users):
        items = rng.choice(n_items, per_user + 2, replace=False, p=p)
        train.append(np.sort(items[:per_user]).astype(np.int64))
        valid.append(items[per_user:per_user + 1].astype(np.int64))
        test.append(items[per_user + 1:].astype(np.int64))
    from common.evaluation import EvalSets

    return EvalSets(train=train, valid=valid, test=test, train_ratings=[np.ones(per_user, np.float32)] * n_users,
                    popularity=np.bincount(np.concatenate(train), minlength=n_items), n_items=n_items)


def render_in_chromium(page: Path, out_dir: Path, *, height: int = 6000) -> tuple[str, np.ndarray]:
    """A real browser's view of a local HTML file: (the DOM chromium built, the screenshot's RGB
    pixels). Headless chromium (Debian's package; .ci/run installs it) with no network needed."""
    import shutil
    import subprocess

    from PIL import Image

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "HTML reports are checked in a real browser: install chromium (apt-get install -y chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    uri = Path(page).resolve().as_uri()
    dom = subprocess.run([exe, *flags, "--dump-dom", uri], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = Path(out_dir) / "screenshot.png"
    proc = subprocess.run([exe, *flags, f"--window-size=1200,{height}", f"--screenshot={shot}", uri],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return dom.stdout, np.asarray(Image.open(shot).convert("RGB"))


def colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels are within ``tol`` (L1) of ``rgb`` (e.g. matplotlib's first line colour)."""
    return int((np.abs(pixels.reshape(-1, 3).astype(int) - np.array(rgb)).sum(axis=1) < tol).sum())


@pytest.fixture
def flower_task_identity(monkeypatch):
    """The process's Flower task identity, as ``run_simulation`` sets it before it builds messages
    and link state (Flower 1.42 reads it when a Message is created)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
