"""common/cli.py: the one user-mistake error of every command line, its one-line report, and the
one function that turns flags and ``--set KEY=VALUE`` into a config for simulate.py and
``fedrec train-central`` alike."""

from __future__ import annotations

import argparse
import io

import pytest

from common.choices import DataFormat, Loss, ModelKind, Partition, ServerOptimizer, Split, values
from common.cli import EXIT_USAGE, UsageError, config_from_flags, parse_set, report_error
from common.config import RunConfig
from server import simulation
from server.cli import build_parser
from server.cli.central import CENTRAL_FLAGS, central_config

FLAGS = {"rounds": "fed.rounds", "loss": "model.loss"}
SWITCHES = {"no_dp": ("dp.enabled", False)}


def namespace(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"rounds": None, "loss": None, "no_dp": False, "set": [], **given})


# ---------------------------------------------------------------- flags and --set -> config
def test_nothing_given_is_the_default_config():
    assert config_from_flags(namespace(), FLAGS, switches=SWITCHES) == RunConfig()


def test_flags_switches_then_set_and_the_last_one_wins():
    cfg = config_from_flags(namespace(rounds=7, loss="bpr", no_dp=True, set=["fed.rounds=9", "seed = 3"]), FLAGS,
                            switches=SWITCHES)
    assert (cfg.fed.rounds, cfg.model.loss, cfg.dp.enabled, cfg.seed) == (9, Loss.BPR, False, 3)


def test_flags_change_the_base_config_not_the_defaults():
    base = RunConfig().replace(**{"model.dim": 8, "fed.rounds": 4})
    cfg = config_from_flags(namespace(rounds=5), FLAGS, base=base)
    assert (cfg.model.dim, cfg.fed.rounds) == (8, 5)


@pytest.mark.parametrize("given, named", [
    ({"set": ["fed.rounds"]}, "--set expects KEY=VALUE, got 'fed.rounds'"),
    ({"set": ["=3"]}, "--set expects KEY=VALUE, got '=3'"),
    ({"set": ["nonsense=1"]}, "unknown config key(s): nonsense"),
    ({"set": ["dp.clip=inf"]}, "config key 'dp.clip': expected a finite number"),
    ({"rounds": 0}, "fed.rounds must be ≥ 1"),
    ({"loss": "hinge"}, "config key 'model.loss': expected one of softmax, bpr, mse"),
])
def test_a_mistake_is_a_usage_error_naming_the_key(given, named):
    with pytest.raises(UsageError) as caught:
        config_from_flags(namespace(**given), FLAGS, switches=SWITCHES)
    assert named in str(caught.value)


def test_parse_set_keeps_values_as_typed_for_the_config_to_convert():
    assert parse_set(["fed.rounds=10", " data.source = a=b.csv "]) == {"fed.rounds": "10", "data.source": "a=b.csv"}


@pytest.mark.parametrize("argv, named", [
    (["--set", "nonsense=1"], "unknown config key(s): nonsense"),
    (["--set", "central.patience"], "--set expects KEY=VALUE"),
    (["--set", "model.dim=0"], "model.dim must be ≥ 1"),
    (["--dim", "16", "--set", "model.dim=0"], "model.dim must be ≥ 1"),  # --set wins over the flag
])
def test_simulate_and_train_central_refuse_the_same_mistake_with_the_same_words(argv, named):
    with pytest.raises(UsageError) as by_simulate:
        simulation.build_config(simulation.parse_args(argv))
    central = build_parser().parse_args(["train-central", *argv])
    with pytest.raises(UsageError) as by_central:
        central_config(central)
    assert named in str(by_simulate.value) and str(by_simulate.value) == str(by_central.value)


def test_both_command_lines_map_their_shared_flags_to_the_same_keys():
    shared = set(simulation.FLAGS) & set(CENTRAL_FLAGS)
    assert {"data", "format", "item_file", "split", "dim", "loss", "seed"} <= shared
    assert all(simulation.FLAGS[flag] == CENTRAL_FLAGS[flag] for flag in shared)


# ---------------------------------------------------------------- choices are the enums
def _choices(parser: argparse.ArgumentParser, option: str) -> tuple[str, ...]:
    action = next(a for a in parser._actions if option in a.option_strings)
    return tuple(action.choices)


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_string_choices_of_both_command_lines_are_the_enums():
    simulate, fedrec = simulation.build_parser(), build_parser()
    central = _subparser(fedrec, "train-central")
    for option, enum in (("--format", DataFormat), ("--split", Split), ("--loss", Loss), ("--model", ModelKind),
                         ("--partition", Partition), ("--server-opt", ServerOptimizer)):
        assert _choices(simulate, option) == values(enum), option
    for option, enum in (("--format", DataFormat), ("--split", Split), ("--loss", Loss)):
        assert _choices(central, option) == values(enum), option
    assert _choices(_subparser(fedrec, "data", "info"), "--format") == values(DataFormat)
    assert _choices(_subparser(fedrec, "deploy", "items"), "--format") == values(DataFormat)


# ---------------------------------------------------------------- one error type, one line
def test_the_error_is_one_line_with_the_program_and_exit_status_2():
    out = io.StringIO()
    assert report_error("fedrec", UsageError("bad  value\n  for --x"), out) == EXIT_USAGE == 2
    assert out.getvalue() == "fedrec: error: bad value for --x\n"


def test_details_such_as_a_log_tail_follow_below_the_line_as_they_are():
    out = io.StringIO()
    report_error("fedrec", UsageError.from_text("nginx refused nginx.conf:\nline 1\n  line 2\n"), out)
    assert out.getvalue() == "fedrec: error: nginx refused nginx.conf:\nline 1\n  line 2\n"


def test_every_command_line_raises_the_same_type():
    import client.cli
    import server.cli._args

    assert client.cli.UsageError is UsageError
    assert server.cli._args.UsageError is UsageError
    assert simulation.UsageError is UsageError
