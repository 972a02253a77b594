"""The MF item model (``model.kind = mf``): item embeddings and biases are the whole item side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import keys
from common.choices import ModelKind
from common.config import ModelConfig
from common.models.contract import ClientData, DeviceStep, ItemParams
from common.models.mf.params import init_items
from common.models.mf.train import local_item_update
from common.privacy.dp_fedavg import clip_grouped
from common.streams import client_generator


def model_file(params: ItemParams) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(named arrays, metadata) of an MF model file (``RunDir.save_model``), e.g. a central model."""
    return dict(zip(keys.ITEM_PARAM_NAMES, params.to_arrays())), {"format": "fedrec-mf-items", "dim": str(params.dim)}


def client_train(params: ItemParams, data: ClientData, *, model: ModelConfig, epochs: int, lr: float,
                 seed: int, server_round: int) -> tuple[ItemParams, float, list[np.ndarray]]:
    """One client's MF round: the dense item-side update, its mean training loss and the user
    vectors (to keep on the device). Raises ``ValueError`` for a client with no interactions."""
    users = list(data.trainable)
    if not users:
        raise ValueError(f"client {data.client_id} has no training interactions")
    return local_item_update(params, users, loss=model.loss, user_reg=model.user_reg, epochs=epochs,
                             lr=lr, rng=client_generator(seed, server_round, data.client_id))


class MFModel:
    """:class:`~common.models.contract.ItemModel` for matrix factorisation."""

    kind = ModelKind.MF
    context_names: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig, n_items: int) -> None:
        self.config, self.n_items = config, n_items

    def init(self, seed: int) -> ItemParams:
        return init_items(self.n_items, self.config.dim, seed=seed, scale=self.config.init_scale)

    def names(self, params: ItemParams) -> tuple[str, ...]:
        return keys.ITEM_PARAM_NAMES

    def arrays(self, params: ItemParams) -> list[np.ndarray]:
        return params.to_arrays()

    def with_arrays(self, params: ItemParams, arrays: Sequence[np.ndarray]) -> ItemParams:
        return ItemParams.from_arrays(list(arrays))

    def context(self, params: ItemParams) -> list[np.ndarray]:
        return []

    def receive(self, arrays: Sequence[np.ndarray], instruction: Mapping[str, Any]) -> tuple[ItemParams, list]:
        if len(arrays) != 2:
            raise ValueError(f"an MF model is 2 arrays (item embeddings, biases), received {len(arrays)}")
        return ItemParams.from_arrays(list(arrays)), []

    def named(self, params: ItemParams) -> dict[str, np.ndarray]:
        return model_file(params)[0]

    def from_named(self, named: Mapping[str, np.ndarray]) -> ItemParams:
        return ItemParams(named[keys.ITEM_PARAM_NAMES[0]], named[keys.ITEM_PARAM_NAMES[1]])

    def metadata(self, params: ItemParams) -> dict[str, str]:
        return model_file(params)[1]

    def server_lr_scales(self, params: ItemParams) -> list[float]:
        return [1.0, 1.0]

    def clip(self, arrays: Sequence[np.ndarray], clip: float, bias_share: float) -> list[np.ndarray]:
        return clip_grouped(list(arrays), clip, bias_share)

    def train(self, params: ItemParams, context: Sequence[np.ndarray], data: ClientData, *, epochs: int, lr: float,
              seed: int, server_round: int) -> DeviceStep:
        update, loss, vectors = client_train(params, data, model=self.config, epochs=epochs, lr=lr, seed=seed,
                                             server_round=server_round)
        return DeviceStep(update.to_arrays(), loss, vectors)

    def effective(self, params: ItemParams, context: Sequence[np.ndarray]) -> ItemParams:
        return params

    def train_dp_sgd(self, params: ItemParams, data: ClientData, *, dp: Any, epochs: int, lr: float, seed: int,
                     server_round: int, history: list, secure: bool) -> tuple[DeviceStep, list]:
        """A silo's round of user-level DP-SGD (common/silo_dp.py) instead of :meth:`train`:
        (the step, with this round's accountant entry as metrics; the accountant history)."""
        from common.silo_dp import dp_sgd_item_update

        result = dp_sgd_item_update(
            params, list(data.trainable), user_reg=self.config.user_reg, noise_multiplier=dp.silo_noise_multiplier,
            max_grad_norm=dp.silo_clip, sample_rate=dp.silo_sample_rate, epochs=epochs, lr=lr,
            seed=int(np.random.default_rng([seed, server_round, data.client_id]).integers(2**31)),
            history=history, delta=dp.silo_delta, server_round=server_round,
            noise_source="urandom" if secure else "seeded")
        sigma, rate, steps = result.history[-1]
        metrics = {keys.M_SILO_SIGMA: sigma, keys.M_SILO_RATE: rate, keys.M_SILO_STEPS: steps}
        return DeviceStep(result.update.to_arrays(), result.mean_loss, [np.zeros(1)] * len(data.trainable),
                          metrics), result.history

    def adopt(self, params: ItemParams, optimizer: Any) -> ItemParams:
        """Parameters of an earlier run of this model, to continue (nothing to add for MF)."""
        return params
