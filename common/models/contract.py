"""The one item-model contract: what every item-side model (MF, the hybrid, the next one) offers
the rest of fedrec, in the spirit of implicit's ``recommend``/``recalculate_user`` and RecBole's
``full_sort_predict``. Outside ``common/models/`` nothing asks which kind of model it has; it
calls these methods (tests/test_model_contract.py runs the same checks against every model).

A model's *parameters* are what the server trains and releases (travelling as ``arrays`` in the
order of ``names``); its *context* is what the server computes from them and sends along, never
trained (the hybrid's item text vectors). Scoring, user reconstruction and evaluation work on the
*effective* :class:`ItemParams` (one vector and one bias per item) that every model gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from common.choices import ModelKind

if TYPE_CHECKING:  # pragma: no cover
    from common.evaluation import EvalSets


@dataclass
class ItemParams:
    """The global model: item embeddings (I, d) and item biases (I,), float32."""

    embeddings: np.ndarray
    bias: np.ndarray

    @property
    def n_items(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def to_arrays(self) -> list[np.ndarray]:
        return [self.embeddings, self.bias]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> "ItemParams":
        emb, bias = arrays
        return cls(np.asarray(emb, dtype=np.float32), np.asarray(bias, dtype=np.float32))

    def copy(self) -> "ItemParams":
        return ItemParams(self.embeddings.copy(), self.bias.copy())


@dataclass(frozen=True)
class UserData:
    """One user's training interactions as the device holds them."""

    items: np.ndarray  # item indices, int64
    ratings: np.ndarray  # float32, 1.0 for implicit data



@dataclass(frozen=True)
class ClientData:
    """What one client (a device with one user, or a silo) holds: its users' items."""

    client_id: int
    users: tuple[int, ...]
    train: tuple[UserData, ...]
    valid: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]

    @classmethod
    def from_sets(cls, client_id: int, users: np.ndarray, sets: "EvalSets") -> "ClientData":
        return cls(
            client_id=client_id,
            users=tuple(int(u) for u in users),
            train=tuple(UserData(sets.train[u], sets.train_ratings[u]) for u in users),
            valid=tuple(sets.valid[u] for u in users),
            test=tuple(sets.test[u] for u in users),
        )

    @property
    def trainable(self) -> tuple[UserData, ...]:
        return tuple(u for u in self.train if len(u.items) > 0)



@dataclass(frozen=True)
class DeviceStep:
    """What one client's round produced: the update of the trainable arrays (travel order), the
    mean training loss, the users' vectors (kept on the device), and model-specific metrics."""

    update: list[np.ndarray]
    loss: float
    user_vectors: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


class ItemModel(Protocol):
    """One family of item-side models. ``P`` is the model's parameter type (MF:
    :class:`ItemParams`; hybrid: ``HybridParams``)."""

    kind: ModelKind
    #: The names of the context arrays sent after the trainable ones (MF: none).
    context_names: tuple[str, ...]

    # ---- parameters: what is trained, released and travels
    def init(self, seed: int) -> Any:
        """The initial global parameters."""

    def names(self, params: Any) -> tuple[str, ...]:
        """The trainable arrays' names in travel order (what the privacy ledger records)."""

    def arrays(self, params: Any) -> list[np.ndarray]:
        """The trainable arrays in travel order."""

    def with_arrays(self, params: Any, arrays: Sequence[np.ndarray]) -> Any:
        """The same parameters with new values (after the server's release)."""

    def context(self, params: Any) -> list[np.ndarray]:
        """The context arrays for these parameters (computed by the server; public)."""

    def receive(self, arrays: Sequence[np.ndarray], instruction: Mapping[str, Any]) -> tuple[Any, list[np.ndarray]]:
        """A device's view of what arrived: (parameters, context); ValueError if it does not fit."""

    def named(self, params: Any) -> dict[str, np.ndarray]:
        """Every trainable array by name (checkpoints, the released model file)."""

    def from_named(self, named: Mapping[str, np.ndarray]) -> Any:
        """Parameters from :meth:`named` (a checkpoint or model file); other keys are ignored."""

    def metadata(self, params: Any) -> dict[str, str]:
        """What the released model file says about itself."""

    def server_lr_scales(self, params: Any) -> list[float]:
        """One factor per trainable array on the server optimizer's learning rate (MF: all 1)."""

    # ---- privacy: how an update is clipped
    def clip(self, arrays: Sequence[np.ndarray], clip: float, bias_share: float) -> list[np.ndarray]:
        """Clip an update to joint L2 norm ≤ ``clip`` by the model's clipping groups (the biases
        get ``bias_share`` of C², the rest the remainder; ``bias_share`` ≤ 0: one flat clip)."""

    # ---- the device's round
    def train(self, params: Any, context: Sequence[np.ndarray], data: ClientData, *, epochs: int, lr: float,
              seed: int, server_round: int) -> DeviceStep:
        """One client's local training: the dense update of every trainable array."""

    # ---- scoring
    def effective(self, params: Any, context: Sequence[np.ndarray]) -> ItemParams:
        """One vector and one bias per item: what users are reconstructed against and ranked by."""
