"""``policyloop simulate``: the app's traffic against a running server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.export import export_and_register
from models.policies import QNetwork
from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.cli import main
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import RewardEvent
from policyloop.registry.local import LocalRegistry
from policyloop.simulate import TrafficConfig, run_traffic
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv
from serving.config import PolicyConfig, ServeConfig
from tests.server_harness import running_server, serve_config


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("simulate") / "registry"
    torch.manual_seed(0)
    env = RoutingEnv()
    export_and_register(QNetwork(len(env.feature_schema.context), 8), env,
                        LocalRegistry(root), policy="routing", training={})
    return root


def _config(tmp_path: Path, registry: Path) -> ServeConfig:
    return serve_config(tmp_path, registry=registry,
                        policies={"routing": PolicyConfig(strategy="epsilon_greedy:0.2")})


def test_every_decision_is_scored_and_every_sent_reward_reaches_the_log(
        tmp_path: Path, registry: Path) -> None:
    with running_server(_config(tmp_path, registry)) as server:
        traffic = asyncio.run(run_traffic(TrafficConfig(
            target=server.target, scenario="routing", events=400, concurrency=4,
            reward_delay_ms=20, reward_loss=0.25, seed=3)))
    assert traffic.errors == {}
    assert traffic.decisions == len(traffic.expected) == len(traffic.versions) == 400
    assert all(0 <= e <= o <= 1 for e, o in zip(traffic.expected, traffic.optimal,
                                                  strict=True))
    # routing reports failures too, so about 75% of decisions get a reward; none twice
    assert 0.6 * 400 < traffic.rewards_sent < 0.9 * 400
    consumer = LocalLog(tmp_path / "bus").consumer("check", [bus.REWARDS])
    rewards = [RewardEvent.from_bytes(r.value) for r in consumer.poll(max_records=10_000,
                                                                       timeout=1.0)]
    assert len(rewards) == traffic.rewards_sent
    assert len({r.event_id for r in rewards}) == len(rewards)
    assert sum(r.value for r in rewards) == traffic.reward_value_sum


def test_the_drift_switches_preferences_at_the_given_decision(
        tmp_path: Path, registry: Path) -> None:
    env = RoutingEnv()
    seen: list[int] = []
    with running_server(_config(tmp_path, registry)) as server:
        asyncio.run(run_traffic(TrafficConfig(target=server.target, scenario="routing",
                                              events=50, concurrency=3, drift_at=20,
                                              reward_delay_ms=0),
                                env=env, on_drift=seen.append))
    assert seen == [20] and env.drifted


def test_the_command_exits_1_and_counts_errors_for_an_unknown_policy(
        tmp_path: Path, registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_server(_config(tmp_path, registry)) as server:
        code = main(["simulate", "--target", server.target, "--scenario", "routing",
                     "--policy", "nope", "--events", "5", "--json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == {"Decide:NOT_FOUND": 5} and report["decisions"] == 0


@pytest.mark.parametrize("field,value", [("events", 0), ("concurrency", 0), ("rate", -1.0),
                                         ("reward_loss", 1.5), ("reward_delay_ms", -1.0),
                                         ("scenario", "chess")])
def test_bad_traffic_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=field):
        TrafficConfig(target="127.0.0.1:1", **{field: value})  # type: ignore[arg-type]


def test_recsys_drift_changes_rewards_but_not_what_the_app_sees() -> None:
    env = RecsysEnv()
    before = env.sample_arrivals(500, np.random.default_rng(4))
    env.drift()
    after = env.sample_arrivals(500, np.random.default_rng(4))
    np.testing.assert_array_equal(before.context, after.context)
    assert before.action_ids == after.action_ids
    assert (before.expected.argmax(axis=1) != after.expected.argmax(axis=1)).mean() > 0.5
