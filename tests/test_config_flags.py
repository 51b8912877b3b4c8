"""Configuration stated once: every setting of a command's config dataclass has a flag whose
default is the dataclass's, shown in ``--help``, and the same setting comes from a TOML file
(``--config``) and ``POLICYLOOP_<FIELD>``, later sources winning (file, environment, flags)."""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from online.config import LearnConfig
from policyloop import cli
from policyloop.contract import settings
from policyloop.contract.errors import InvalidArgument
from policyloop.demo import DemoConfig
from policyloop.simulate import TrafficConfig
from serving.config import PolicyConfig, ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def train_config_class() -> Any:
    from models.training import TrainConfig

    return TrainConfig


# command -> (its config class, the flags it cannot run without, fields that are no setting,
# fields reached through a flag of the command's own)
COMMANDS: dict[str, tuple[Any, list[str], set[str], dict[str, str]]] = {
    "learn": (LearnConfig, ["--policy", "recsys"], set(),
              {"shard_index": "--shard", "shard_count": "--shard"}),
    "train": (train_config_class, [], set(), {}),
    "serve": (ServeConfig, [], {"policies"}, {}),
    "demo": (DemoConfig, [], set(), {}),
    "simulate": (TrafficConfig, ["--target", "127.0.0.1:1"], set(), {}),
}


def config_class(command: str) -> Any:
    cls = COMMANDS[command][0]
    return cls if dataclasses.is_dataclass(cls) else cls()


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def build(command: str, args: Any, environ: dict[str, str]) -> Any:
    """The config ``policyloop COMMAND`` runs with, as its handler builds it."""
    if command == "learn":
        return cli.learn_config(args, environ)
    if command == "serve":
        return cli.serve_config(args, environ)
    return settings.load(config_class(command), args, environ=environ)


def options(command: str) -> set[str]:
    parser = cli.build_parser()
    sub: Any = next(a for a in parser._actions if a.dest == "command").choices
    sub = sub[command]
    sub.format_help()  # adds the command's flags
    return {o for action in sub._actions for o in action.option_strings}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_setting_with_a_flag(command: str) -> None:
    cls = config_class(command)
    _, _, not_settings, own_flag = COMMANDS[command]
    names = {f.name for f in dataclasses.fields(cls)}
    assert names - {f.name for f in settings.settings(cls)} == not_settings
    flags = options(command)
    missing = [f.name for f in settings.settings(cls)
               if own_flag.get(f.name, settings.flag_of(f)) not in flags]
    assert missing == [], f"{command}: fields without a flag"


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_left_out_give_the_dataclass_defaults(command: str) -> None:
    cls = config_class(command)
    required = COMMANDS[command][1]
    given = dict(zip(required[::2], required[1::2], strict=True))
    expected = cls(**{f.name: given[settings.flag_of(f)] for f in settings.settings(cls)
                      if settings.flag_of(f) in given})
    assert build(command, parse(command, *required), environ={}) == expected


def shown(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return {"": "empty", "{}": "none"}.get(str(default), str(default))


@pytest.mark.parametrize("command", ["learn", "serve", "simulate"])
def test_help_shows_every_default_and_variable(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "policyloop.cli", command, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in settings.settings(config_class(command)):
        default = settings.default_of(f)
        if f.name in ("shard_index", "shard_count"):
            continue
        if default is dataclasses.MISSING:
            assert f"(required; {settings.env_of(f)})" in text
        else:
            assert f"(default: {shown(default)}; {settings.env_of(f)})" in text, f.name
    if command == "learn":
        assert ("--window-ms WINDOW_MS reward window, milliseconds; unset: the policy spec's "
                "[reward] window_s, else 30000 (default: unset;") in text
        assert "--shard I/N" in text and "(default: 0/1;" in text


def test_learn_takes_the_file_then_the_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "learn.toml"
    path.write_text('policy = "routing"\nwindow_ms = 1\ngamma = 0.5\ngroup = "file"\n'
                    'gate = false\nshard_index = 1\nshard_count = 2\n')
    environ = {"POLICYLOOP_WINDOW_MS": "2", "POLICYLOOP_GROUP": "env",
               "POLICYLOOP_BUS": "kafka", "POLICYLOOP_HOLDOUT_EVERY": "0"}
    config = cli.learn_config(parse("learn", "--config", str(path), "--window-ms", "3",
                                    "--kafka", "flag:1"), environ)
    assert config.policy == "routing" and config.gamma == 0.5 and not config.gate  # file
    assert config.group == "env" and config.bus == "kafka" and config.holdout_every == 0
    assert config.window_ms == 3 and config.kafka_bootstrap == "flag:1"  # flags
    assert (config.shard_index, config.shard_count) == (1, 2)
    assert config.publish_every == LearnConfig.publish_every  # default
    again = cli.learn_config(parse("learn", "--config", str(path), "--shard", "0/4",
                                   "--gate"), {"POLICYLOOP_GATE": "0"})
    assert (again.shard_index, again.shard_count) == (0, 4) and again.gate


def test_train_takes_the_file_then_the_environment_then_flags(tmp_path: Path) -> None:
    train_config = train_config_class()
    path = tmp_path / "train.toml"
    path.write_text('scenario = "routing"\nepochs = 3\nhidden = 16\n[env]\nn_queues = 4\n')
    environ = {"POLICYLOOP_EPOCHS": "4", "POLICYLOOP_LR": "0.01",
               "POLICYLOOP_ENV": "{n_queues = 6, episode_length = 50}"}
    args = parse("train", "--config", str(path), "--epochs", "5", "--env", "seed=3",
                 "--env", "episode_length=7", "--objective", "ips")
    config = settings.load(train_config, args, environ=environ)
    assert config.scenario == "routing" and config.hidden == 16  # file
    assert config.lr == 0.01  # environment
    assert config.epochs == 5 and config.objective == "ips"  # flags
    assert config.env == {"seed": 3, "episode_length": 7}  # the flags' table replaces others
    assert settings.load(train_config, parse("train", "--config", str(path)),
                         environ={}).env == {"n_queues": 4}
    assert config.batch_size == train_config.batch_size


def test_serve_reads_every_setting_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('default_strategy = "softmax:0.5"\nmax_concurrency = 8\n')
    environ = {"POLICYLOOP_PORT": "6000", "POLICYLOOP_USE_GPU": "false",
               "POLICYLOOP_MAX_CONCURRENCY": "16", "POLICYLOOP_TLS_CERT": ""}
    config = cli.serve_config(parse("serve", "--config", str(path), "--policy", "recsys",
                                    "--policy", "routing=greedy", "--apprentice", "routing",
                                    "--micro-batch", "1", "--durable-ack"), environ)
    assert config.port == 6000 and not config.use_gpu and config.max_concurrency == 16
    assert config.micro_batch_size == 1 and config.durable_ack and config.tls_cert is None
    # A policy named without a strategy has none here: when served, its spec's, else the
    # default_strategy the sources settled on
    assert config.default_strategy == "softmax:0.5"
    assert config.policies == {"recsys": PolicyConfig(strategy=""),
                               "routing": PolicyConfig(strategy="greedy", apprentice=True)}


def test_simulate_takes_its_token_from_the_environment() -> None:
    args = parse("simulate", "--target", "h:1", "--timeout", "2")
    config = settings.load(TrafficConfig, args, environ={"POLICYLOOP_TOKEN": "t0k"})
    assert config.token == "t0k" and config.timeout_s == 2.0


@pytest.mark.parametrize("command, argv, environ, file, message", [
    ("learn", [], {}, "", "policy is required: give --policy, policy in the --config file "
     "or POLICYLOOP_POLICY"),
    ("learn", ["--policy", "p"], {"POLICYLOOP_WINDOW_MS": "soon"}, "",
     "POLICYLOOP_WINDOW_MS: 'soon' is not a valid int"),
    ("learn", ["--policy", "p"], {"POLICYLOOP_GATE": "maybe"}, "",
     "POLICYLOOP_GATE: 'maybe' is not a valid bool"),
    ("learn", ["--policy", "p"], {}, "window = 5\n", r"unknown keys \['window'\]"),
    ("learn", ["--policy", "p"], {}, 'reward_rule = "last"\n',
     r"reward_rule must be one of \['first', 'sum'\], got 'last'"),
    ("learn", ["--policy", "p"], {}, 'partitions = "four"\n',
     "partitions: 'four' is not a valid int"),
    ("learn", ["--policy", "p"], {}, "partitions = 0\n", "partitions must be >= 1, got 0"),
    ("learn", ["--policy", "p", "--shard", "1"], {}, "", "shard must be INDEX/COUNT"),
    ("simulate", [], {}, "", "target: HOST:PORT of a server is required"),
    ("simulate", ["--target", "h:1"], {}, "events = 2.5\n", "events: 2.5 is not a valid int"),
    ("demo", [], {"POLICYLOOP_SCENARIO": "chess"}, "",
     r"POLICYLOOP_SCENARIO must be one of \['recsys', 'routing'\]"),
])
def test_bad_settings_name_their_source_and_value(tmp_path: Path, command: str,
                                                  argv: list[str], environ: dict[str, str],
                                                  file: str, message: str) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(file)
    with pytest.raises(InvalidArgument, match=message):
        build(command, parse(command, "--config", str(path), *argv), environ)


def test_a_missing_setting_exits_2_with_the_message() -> None:
    out = subprocess.run([sys.executable, "-m", "policyloop.cli", "learn"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "policyloop learn: policy is required" in out.stderr


def test_network_options_match_the_network_learners_keywords() -> None:
    """``learn --network``'s settings are passed as NetworkLearner's keywords, whose own
    defaults must be the same (models/network_learner.py states them for direct use)."""
    pytest.importorskip("torch")
    from models.network_learner import NetworkLearner

    keywords = {"network_epochs": "epochs", "replay": "replay", "network_clip": "clip",
                "network_lr": "lr", "network_seed": "seed"}
    parameters = inspect.signature(NetworkLearner.__init__).parameters
    assert set(keywords.values()) == {name for name, p in parameters.items()
                                      if p.kind is p.KEYWORD_ONLY}
    for field, keyword in keywords.items():
        assert getattr(LearnConfig, field) == parameters[keyword].default, field


def test_the_settings_docstring_examples_run() -> None:
    failed, tried = doctest.testmod(settings)
    assert tried >= 4 and failed == 0
