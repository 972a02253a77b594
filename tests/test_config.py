"""Run configuration (common.config): flat round trip, refusals, pyproject defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flower's reading of ``[tool.flwr.app.config]``: nested tables become dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def typed(flat: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Compare values with their types: 120 and 120.0 or 1 and True must not pass as equal."""
    return {key: (type(value).__name__, value) for key, value in flat.items()}


def test_to_flat_round_trips_through_from_flat():
    cfg = RunConfig()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert RunConfig.from_flat({}) == cfg


def test_flat_keys_are_kebab_case_with_one_section():
    for key in RunConfig().to_flat():
        assert "_" not in key and key == key.lower(), key
        assert key.count(".") <= 1, key


def test_a_changed_value_round_trips():
    changed = {"model.dim": 16, "fed.rounds": 3, "central.lr": 0.5, "data.split": "leave-last-out", "seed": 4}
    cfg = RunConfig.from_flat(changed)
    assert cfg.model.dim == 16 and cfg.fed.rounds == 3 and cfg.central.lr == 0.5
    assert cfg.data.split == "leave-last-out" and cfg.seed == 4
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.replace(**{"fed.rounds": 7}).fed.rounds == 7 and cfg.fed.rounds == 3


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 1  # type: ignore[misc]


@pytest.mark.parametrize("key", ["model.dimension", "fed.round", "nonsense", "model"])
def test_unknown_key_is_refused_by_name(key):
    with pytest.raises(ValueError, match="unknown config key") as info:
        RunConfig.from_flat({key: 1})
    named = str(info.value).partition("known:")[0]  # the message then lists the known keys
    assert key in named


@pytest.mark.parametrize(("key", "value"), [
    ("model.dim", "sixty-four"),
    ("model.dim", 3.5),
    ("fed.sample-rate", "often"),
    ("central.epochs", [1, 2]),
])
def test_wrong_type_is_refused_by_name(key, value):
    with pytest.raises(ValueError) as info:
        RunConfig.from_flat({key: value})
    assert key in str(info.value)


def test_strings_from_the_command_line_are_coerced():
    # `flwr run --run-config` values may arrive as strings
    cfg = RunConfig.from_flat({"model.dim": "32", "fed.sample-rate": "0.5"})
    assert cfg.model.dim == 32 and cfg.fed.sample_rate == 0.5


@pytest.mark.parametrize(("key", "value"), [
    ("model.loss", "hinge"),
    ("data.split", "temporal"),
    ("fed.sample-rate", 0.0),
    ("model.user-reg", 0.0),
])
def test_invalid_value_is_refused_by_name(key, value):
    with pytest.raises(ValueError) as info:
        RunConfig.from_flat({key: value})
    assert key in str(info.value)


def test_pyproject_defaults_equal_the_dataclass_defaults():
    with PYPROJECT.open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert typed(flatten(table)) == typed(RunConfig().to_flat())


FLOAT_KEYS = sorted(key for key, value in RunConfig().to_flat().items() if isinstance(value, float))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "-Infinity", "1e999"])
def test_every_float_key_refuses_inf_and_nan_by_name(key, value):
    with pytest.raises(ValueError) as info:
        RunConfig.from_flat({key: value})
    assert repr(key) in str(info.value) and "finite" in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("fed.rounds", float("inf")), ("fed.rounds", "nan"), ("model.dim", "1e999")])
def test_int_keys_refuse_inf_and_nan_by_name(key, value):
    with pytest.raises(ValueError, match=repr(key)):
        RunConfig.from_flat({key: value})


def test_init_scale_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="model.init-scale"):
        RunConfig.from_flat({"model.init-scale": -0.1})
    assert RunConfig.from_flat({"model.init-scale": "0"}).model.init_scale == 0.0


def test_secagg_threshold_must_exceed_half_the_shares():
    """A threshold at or below half the shares would let a server that lies about dropouts collect
    both the mask-seed and the mask-key shares of one client (docs/SECURITY.md)."""
    with pytest.raises(ValueError, match="above half of num-shares"):
        RunConfig.from_flat({"secagg.num-shares": 7, "secagg.reconstruction-threshold": 3})
    RunConfig.from_flat({"secagg.num-shares": 7, "secagg.reconstruction-threshold": 4})
    RunConfig.from_flat({"secagg.num-shares": 3, "secagg.reconstruction-threshold": 2})
