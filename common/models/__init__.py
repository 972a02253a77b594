"""Item-side models behind one contract (:mod:`common.models.contract`), each in its own package
with the same few files (``params.py``, ``train.py``, ``model.py``; the hybrid adds its text
encoder and blends): ``mf`` and ``hybrid``. :func:`build_model` is the one place that maps
``model.kind`` to a class; nothing else asks which kind it has."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.choices import ModelKind
from common.config import ModelConfig
from common.models.contract import ClientData, DeviceStep, ItemModel, ItemParams, UserData

__all__ = ["ClientData", "DeviceStep", "ItemModel", "ItemParams", "UserData", "build_model"]


def build_model(config: ModelConfig, *, n_items: int, seed: int,
                texts: Callable[[], Sequence[str]] | None = None) -> ItemModel:
    """The item model ``config.kind`` names, for ``n_items`` items. ``texts`` gives the public item
    texts (in model-row order) to a model that reads them; it is not called otherwise."""
    if config.kind == ModelKind.MF:
        from common.models.mf.model import MFModel

        return MFModel(config, n_items)
    if config.kind == ModelKind.HYBRID:
        from common.models.hybrid.model import HybridModel

        if texts is None:
            raise ValueError("model.kind = hybrid needs the item texts (the catalogue's public text of every item)")
        return HybridModel(config, n_items, texts, seed)
    raise ValueError(f"unknown model.kind {config.kind!r}")
