"""Offline training from logged data beats the policy that logged it, on the simulator's truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.training import TrainConfig, dr_targets, load_checkpoint, save_checkpoint, train_offline
from policyloop.contract.errors import InvalidArgument
from policyloop.simulators.logged import collect_logs, logging_probabilities, true_policy_value
from policyloop.simulators.routing import RoutingEnv


@pytest.fixture(scope="module", params=["recsys", "routing"])
def trained(request: pytest.FixtureRequest):
    torch.set_num_threads(1)
    env = {"n_items": 200} if request.param == "recsys" else {}
    return train_offline(TrainConfig(scenario=request.param, n_logged=8000, epochs=6, env=env))


def test_trained_policy_beats_the_logging_policy_on_true_reward(trained) -> None:
    s = trained.summary
    assert s["value_trained"] > s["value_logging"] + 0.5 * (s["value_oracle"] - s["value_logging"])
    assert s["value_logging"] >= s["value_uniform"] - 0.01
    assert s["value_trained"] <= s["value_oracle"] + 1e-9


def test_checkpoint_round_trips(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path / "ck.pt")
    model, scenario, env_kwargs, training = load_checkpoint(tmp_path / "ck.pt")
    ctx, act, _ = trained.env.sample_contexts(5, np.random.default_rng(0))
    with torch.no_grad():
        args = (torch.from_numpy(ctx),) if act is None else (torch.from_numpy(ctx),
                                                              torch.from_numpy(act))
        assert torch.equal(model(*args)[0], trained.model(*args)[0])
    assert scenario == trained.env.scenario and env_kwargs == trained.config.env
    assert training == trained.summary


def test_logged_propensities_are_the_logging_policy_probabilities() -> None:
    env = RoutingEnv()
    data = collect_logs(env, 20_000, seed=0)
    probs = logging_probabilities(env, data.context, data.action_features)
    assert np.allclose(data.propensity, probs[np.arange(len(data)), data.action])
    # the logged action frequencies match the stated distribution
    expected = probs.mean(axis=0)
    observed = np.bincount(data.action, minlength=probs.shape[1]) / len(data)
    assert np.abs(observed - expected).max() < 0.01
    # IPS on the logs estimates the logging policy's own true value
    assert abs(data.reward.mean() - true_policy_value(probs, data.expected_rewards)) < 0.02


def test_uniform_logging_has_propensity_one_over_k() -> None:
    data = collect_logs(RoutingEnv(), 1000, seed=0, logging_policy="uniform")
    assert np.all(data.propensity == 1 / data.expected_rewards.shape[1])


def test_training_is_deterministic_given_the_seed() -> None:
    cfg = TrainConfig(scenario="routing", n_logged=2000, epochs=2)
    first, second = train_offline(cfg), train_offline(cfg)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("field, value, message", [
    ("scenario", "chess", "scenario must be recsys or routing, got 'chess'"),
    ("objective", "sl", "objective must be ips or dr, got 'sl'"),
    ("logging_policy", "oracle", "logging_policy must be one of"),
    ("n_logged", 0, "n_logged must be >= 1, got 0"),
    ("lr", 0.0, "lr must be > 0, got 0.0"),
    ("clip", 0.5, "clip must be >= 1, got 0.5"),
])
def test_bad_training_configs_are_refused(field: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        TrainConfig(**{field: value})


def test_dr_targets_are_unbiased_for_every_action() -> None:
    env = RoutingEnv()
    data = collect_logs(env, 50_000, seed=1)
    q = np.full(data.expected_rewards.shape, 0.5)  # a deliberately wrong reward model
    targets = dr_targets(q, data, clip=1e9)
    assert np.abs(targets.mean(axis=0) - data.expected_rewards.mean(axis=0)).max() < 0.03
