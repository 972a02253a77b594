"""A run directory: resolved config, per-round metrics, checkpoints and the final model.

Layout::

    runs/<timestamp>/
      config.json          the resolved flat config (a resume must match it)
      metrics.jsonl        one JSON object per round (a last line torn by a crash is dropped)
      checkpoint.safetensors   ONE atomic file: global model, optimizer state, and in its metadata
                           the round, the privacy ledger and what else a resume needs
      model.safetensors    the final global model (item embeddings, item biases)
      items.csv            item_id,title per model row (what a device needs to use the model)
      ledger.json          the privacy ledger: every DP mechanism that ran (absent without DP)
      privacy_report.{json,md,html}  written at the end of the run (server/report.py)
      summary.md           a short table written at the end
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import keys
from common.config import RunConfig
from common.serialization import JsonlError, append_jsonl, load_arrays, read_jsonl, save_arrays, write_json

# Keys that say where the run lives, not what it computes: never compared on resume.
NOT_COMPARED = ("run-dir",)
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "fedrec-checkpoint"  # safetensors metadata key holding the JSON of the round's state
CHECKPOINT_VERSION = 2


class ConfigMismatchError(ValueError):
    pass


class RunDirError(ValueError):
    """A run directory's file that cannot be used (damaged, missing, of another format): the
    message names the file and what to do."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | Path, cfg: RunConfig) -> "RunDir":
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(root) / stamp
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{stamp}-{n}"
        path.mkdir(parents=True)
        run = cls(path)
        write_json(run.path / "config.json", cfg.to_flat())
        return run

    def _saved_config(self) -> dict[str, Any]:
        path = self.path / "config.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{path}: not found: {self.path} is not a fedrec run directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{path}: damaged ({exc}); it is the run's config, restore it or start a new run") from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{path}: expected a JSON object of config keys, found {type(saved).__name__}")
        return saved

    def config(self) -> RunConfig:
        try:
            return RunConfig.from_flat(self._saved_config())
        except RunDirError:
            raise
        except ValueError as exc:
            raise RunDirError(f"{self.path / 'config.json'}: {exc}") from None

    def check_resume(self, cfg: RunConfig) -> None:
        """Refuse to resume with a config that differs from the run's, naming what changed."""
        saved = {**RunConfig().to_flat(), **self.config().to_flat()}
        now = cfg.to_flat()
        keys = sorted((set(saved) | set(now)) - set(NOT_COMPARED))
        diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
        if diff:
            raise ConfigMismatchError(f"cannot resume {self.path}: the config changed ({'; '.join(diff)}). "
                                      "Resume with the run's own config, or start a new run.")

    # ---- metrics
    def log_round(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path / "metrics.jsonl", row)

    def rounds(self) -> list[dict[str, Any]]:
        try:
            return read_jsonl(self.path / "metrics.jsonl")
        except JsonlError as exc:
            raise RunDirError(f"{exc}: the run's metrics are damaged beyond a torn last line") from None

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after the checkpoint (a crash between metrics and checkpoint) and a
        torn last line; the file is rewritten atomically."""
        rows = [r for r in self.rounds() if r.get("round", 0) <= last_round]
        path = self.path / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.part")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        os.replace(tmp, path)

    # ---- checkpoints
    def save_checkpoint(self, server_round: int, named: dict[str, np.ndarray], optimizer_state: dict[str, np.ndarray],
                        extra: dict[str, Any]) -> None:
        """One atomic, durable file: the model's arrays by name (:meth:`ItemModel.named`), the
        optimizer's, and in its metadata the round and ``extra`` (the ledger, ...): a crash leaves
        this round's checkpoint or the last one, never a mix of two rounds."""
        arrays = {**named, **{f"opt.{k}": v for k, v in optimizer_state.items()}}
        state = {"version": CHECKPOINT_VERSION, "round": int(server_round), **extra}
        save_arrays(self.path / CHECKPOINT, arrays, metadata={CHECKPOINT_META: json.dumps(state, sort_keys=True)})
        legacy = self.path / "checkpoint.json"  # the old two-file format's half: never mixed with the new file
        if legacy.exists():
            legacy.unlink()

    def checkpoint_round(self) -> int | None:
        """The round of the last checkpoint, or None (no checkpoint yet)."""
        loaded = self.load_checkpoint()
        return None if loaded is None else loaded[0]

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]] | None:
        """(round, the model's arrays by name, optimizer state, extra) of the last checkpoint; None
        when there is none. Raises :class:`RunDirError` naming the file when it is damaged."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
            arrays = load_arrays(path)
            if CHECKPOINT_META in meta:
                info = json.loads(meta[CHECKPOINT_META])
            else:  # version 1: two files (checkpoint.json beside it)
                info = json.loads((self.path / "checkpoint.json").read_text())
            server_round = int(info.pop("round"))
            info.pop("version", None)
            for name in keys.ITEM_PARAM_NAMES:  # every item model has them
                arrays[name]
        except Exception as exc:  # safetensors, JSON and missing keys each raise their own types
            raise RunDirError(f"{path}: damaged checkpoint ({type(exc).__name__}: {exc}); restore it from a backup, "
                              "or delete it to start the run again from round 0") from None
        named = {k: v for k, v in arrays.items() if not k.startswith("opt.")}
        opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
        return server_round, named, opt, info

    def save_ledger(self, state: dict[str, Any], *, secure_noise: bool, population: int,
                    secret_cohorts: bool = True) -> None:
        """``ledger.json``: every mechanism that ran (the privacy report is computed from it); a
        copy of the checkpoint's ledger, which is what a resume reads."""
        write_json(self.path / "ledger.json", {"ledger": state, "secure_noise": secure_noise, "population": population,
                                               "secret_cohorts": secret_cohorts})

    def load_ledger(self) -> dict[str, Any] | None:
        path = self.path / "ledger.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{path}: damaged ({exc}); `fedrec report` rewrites it from the checkpoint") from None

    def save_client_epsilons(self, epsilons: dict[int, float]) -> None:
        """``client_epsilons.json``: each silo's user-level DP-SGD ε, for the report. A value already
        in the file is never lowered (a reported ε never decreases)."""
        path = self.path / "client_epsilons.json"
        old: dict[str, float] = {}
        if path.is_file():
            try:
                old = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError):
                old = {}
        merged = {**old, **{str(k): max(float(v), old.get(str(k), 0.0)) for k, v in epsilons.items()}}
        write_json(path, dict(sorted(merged.items(), key=lambda kv: int(kv[0]) if kv[0].lstrip("-").isdigit() else 0)))

    def save_items(self, item_ids: tuple[str, ...], titles: list[str], texts: Sequence[str] | None = None) -> None:
        """``items.csv`` (item_id,title[,text], one row per model row): published beside the
        model, in the format the device reads (common.data.items_file.read_items_file); the item
        texts let a device run the hybrid model."""
        from common.data.items_file import write_items_file

        write_items_file(self.path / "items.csv", item_ids, titles, texts)

    def save_model(self, named: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        """``model.safetensors``: the released model's arrays by name (:meth:`ItemModel.named`;
        a hybrid's base encoder is public and never saved) and what it says about itself."""
        save_arrays(self.path / "model.safetensors", named, metadata=metadata)
