"""A run directory: resolved config, per-round metrics, checkpoints and the final model.

Layout::

    runs/<timestamp>/
      config.json          the resolved flat config (a resume must match it)
      metrics.jsonl        one JSON object per round
      checkpoint.safetensors + checkpoint.json   global model, optimizer state, last round
      model.safetensors    the final global model (item embeddings, item biases)
      items.csv            item_id,title per model row (what a device needs to use the model)
      ledger.json          the privacy ledger: every DP mechanism that ran (absent without DP)
      privacy_report.{json,md,html}  written at the end of the run (server/report.py)
      summary.md           a short table written at the end
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from common import keys
from common.config import RunConfig
from common.mf import ItemParams
from common.serialization import append_jsonl, load_arrays, read_jsonl, save_arrays, write_json


# Keys that say where the run lives, not what it computes: never compared on resume.
NOT_COMPARED = ("run-dir",)


class ConfigMismatchError(ValueError):
    pass


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

    def config(self) -> RunConfig:
        return RunConfig.from_flat(json.loads((self.path / "config.json").read_text()))

    def check_resume(self, cfg: RunConfig) -> None:
        """Refuse to resume with a config that differs from the run's, naming what changed."""
        saved = json.loads((self.path / "config.json").read_text())
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
        return read_jsonl(self.path / "metrics.jsonl")

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after the checkpoint (a crash between metrics and checkpoint)."""
        rows = [r for r in self.rounds() if r.get("round", 0) <= last_round]
        (self.path / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    # ---- checkpoints
    def save_checkpoint(self, server_round: int, params: ItemParams, optimizer_state: dict[str, np.ndarray],
                        extra: dict[str, Any]) -> None:
        if hasattr(params, "named_arrays"):  # hybrid: free part, biases, head, LoRA (by name)
            arrays = dict(params.named_arrays())
        else:
            arrays = {keys.ITEM_PARAM_NAMES[0]: params.embeddings, keys.ITEM_PARAM_NAMES[1]: params.bias}
        arrays.update({f"opt.{k}": v for k, v in optimizer_state.items()})
        save_arrays(self.path / "checkpoint.safetensors", arrays)
        write_json(self.path / "checkpoint.json", {"round": server_round, **extra})

    def load_checkpoint(self) -> tuple[int, ItemParams, dict[str, np.ndarray], dict[str, Any]] | None:
        meta = self.path / "checkpoint.json"
        if not meta.is_file():
            return None
        info = json.loads(meta.read_text())
        arrays = load_arrays(self.path / "checkpoint.safetensors")
        params = ItemParams(arrays[keys.ITEM_PARAM_NAMES[0]], arrays[keys.ITEM_PARAM_NAMES[1]])
        if "head.weight" in arrays:  # a hybrid run's checkpoint
            from common.hybrid_federated import HybridParams

            params = HybridParams.from_named({k: v for k, v in arrays.items() if not k.startswith("opt.")})
        opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
        return int(info.pop("round")), params, opt, info

    def save_ledger(self, state: dict[str, Any], *, secure_noise: bool, population: int) -> None:
        """``ledger.json``: every mechanism that ran (the privacy report is computed from it)."""
        write_json(self.path / "ledger.json", {"ledger": state, "secure_noise": secure_noise, "population": population})

    def load_ledger(self) -> dict[str, Any] | None:
        path = self.path / "ledger.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_client_epsilons(self, epsilons: dict[int, float]) -> None:
        """``client_epsilons.json``: each silo's record-level ε (Opacus DP-SGD), for the report."""
        write_json(self.path / "client_epsilons.json", {str(k): v for k, v in sorted(epsilons.items())})

    def save_items(self, item_ids: tuple[str, ...], titles: list[str]) -> None:
        """``items.csv`` (item_id,title, one row per model row): published beside the model, in
        the format the device reads (client.store.read_items_file)."""
        from client.store import write_items_file

        write_items_file(self.path / "items.csv", item_ids, titles)

    def save_model(self, params: ItemParams) -> None:
        if hasattr(params, "named_arrays"):  # hybrid: the released arrays by name (the base model is public)
            save_arrays(self.path / "model.safetensors", dict(params.named_arrays()),
                        metadata={"format": "fedrec-hybrid-items", "dim": str(params.dim),
                                  "text_encoder": "all-MiniLM-L6-v2 (frozen) + head"
                                  + (" + LoRA" if any(k.startswith("lora.") for k in params.adapter) else "")})
            return
        save_arrays(self.path / "model.safetensors",
                    {keys.ITEM_PARAM_NAMES[0]: params.embeddings, keys.ITEM_PARAM_NAMES[1]: params.bias},
                    metadata={"format": "fedrec-mf-items", "dim": str(params.dim)})
