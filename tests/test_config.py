"""The server's one config object: defaults, then TOML, then environment, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyloop.contract.errors import InvalidArgument
from serving.config import PolicyConfig, ServeConfig, load_serve_config


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('port = 6000\nbus = "kafka"\nkafka_bootstrap = "file:1"\n'
                    'grace_period_s = 3\n[policies.recsys]\nstrategy = "softmax:0.5"\n'
                    'apprentice = true\n')
    config = load_serve_config(path, {"port": 7000, "host": None},
                               environ={"POLICYLOOP_KAFKA_BOOTSTRAP": "env:2"})
    assert config.port == 7000  # flag beats file
    assert config.kafka_bootstrap == "env:2"  # environment beats file
    assert config.grace_period_s == 3.0 and config.host == ServeConfig().host
    assert config.policy("recsys") == PolicyConfig(strategy="softmax:0.5", apprentice=True)
    assert config.policy("other").strategy == ""  # the spec's, else default_strategy


@pytest.mark.parametrize("text, overrides, message", [
    ("bogus = 1\n", {}, "unknown keys"),
    ("", {"bus": "carrier-pigeon"}, "bus must be"),
    ("", {"bus": "kafka"}, "needs kafka_bootstrap"),
    ("", {"port": 70000}, "port must be"),
    ("", {"port": "eighty"}, "not a valid int"),
    ("", {"max_concurrency": 0}, "max_concurrency must be"),
    ("", {"model_control_mode": "watch"}, "--model-control-mode must be one of"),
])
def test_bad_settings_name_the_setting(tmp_path: Path, text, overrides, message) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        load_serve_config(path, overrides, environ={})


def test_the_registry_is_polled_unless_policies_are_configured_or_explicit_is_asked() -> None:
    configured = {"recsys": PolicyConfig()}
    assert ServeConfig().discovers_policies
    assert not ServeConfig(policies=configured).discovers_policies
    assert ServeConfig(policies=configured, model_control_mode="poll").discovers_policies
    assert not ServeConfig(model_control_mode="explicit").discovers_policies
    with pytest.raises(InvalidArgument, match="model_control_mode must be one of"):
        ServeConfig(model_control_mode="none").validate()
