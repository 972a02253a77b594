"""The hybrid model's parameters: the free item part (MF) and the text side's adapter (head + LoRA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common import keys
from common.models.contract import ItemParams
from common.models.hybrid.encoder import HEAD_KEYS

ADAPTER_HEAD = ("head.weight", "head.bias")  # travel order of the head (then the LoRA arrays, sorted)

assert set(ADAPTER_HEAD) == set(HEAD_KEYS)


def adapter_order(names: Sequence[str]) -> list[str]:
    """The travel order of adapter arrays: head weight, head bias, then the LoRA arrays sorted."""
    extra = sorted(n for n in names if n not in ADAPTER_HEAD)
    return [*ADAPTER_HEAD, *extra]


@dataclass
class HybridParams:
    """The hybrid model's global trainable parameters: the free item part (an MF
    :class:`ItemParams`) and the text side's adapter (head + LoRA, ``trainable_state`` keys)."""

    free: ItemParams
    adapter: dict[str, np.ndarray]

    @property
    def n_items(self) -> int:
        return self.free.n_items

    @property
    def dim(self) -> int:
        return self.free.dim

    @property
    def adapter_names(self) -> list[str]:
        return adapter_order(self.adapter)

    def names(self) -> tuple[str, ...]:
        """Names of the trainable arrays in travel order (what the privacy ledger records)."""
        return (*keys.ITEM_PARAM_NAMES, *self.adapter_names)

    def to_arrays(self) -> list[np.ndarray]:
        return [self.free.embeddings, self.free.bias, *(self.adapter[k] for k in self.adapter_names)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], adapter_names: Sequence[str]) -> "HybridParams":
        names = adapter_order(adapter_names)
        if len(arrays) != 2 + len(names):
            raise ValueError(f"{len(arrays)} arrays, expected {2 + len(names)} (free embeddings, biases, {len(names)} adapter)")
        return cls(ItemParams.from_arrays(list(arrays[:2])),
                   {k: np.asarray(a, dtype=np.float32) for k, a in zip(names, arrays[2:])})

    def with_arrays(self, arrays: Sequence[np.ndarray]) -> "HybridParams":
        return HybridParams.from_arrays(arrays, self.adapter_names)

    def named_arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names(), self.to_arrays()))

    @classmethod
    def from_named(cls, named: dict[str, np.ndarray]) -> "HybridParams":
        free = ItemParams(np.asarray(named[keys.ITEM_PARAM_NAMES[0]], np.float32),
                          np.asarray(named[keys.ITEM_PARAM_NAMES[1]], np.float32))
        adapter = {k: np.asarray(v, np.float32) for k, v in named.items() if k not in keys.ITEM_PARAM_NAMES}
        return cls(free, adapter)

    def copy(self) -> "HybridParams":
        return HybridParams(self.free.copy(), {k: v.copy() for k, v in self.adapter.items()})

    def effective(self, text_vectors: np.ndarray) -> ItemParams:
        """The MF view: embeddings ``free + text``, biases ``free``."""
        return ItemParams((self.free.embeddings + np.asarray(text_vectors, np.float32)).astype(np.float32),
                          self.free.bias)
