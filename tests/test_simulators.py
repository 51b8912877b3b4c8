"""The simulators follow the Gymnasium API and their reward model is known and true."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

ENVS = [lambda **kw: RecsysEnv(n_items=100, **kw), lambda **kw: RoutingEnv(**kw)]


@pytest.mark.parametrize("make", ENVS, ids=["recsys", "routing"])
def test_passes_the_gymnasium_env_checker(make) -> None:
    check_env(make(), skip_render_check=True)


@pytest.mark.parametrize("make", ENVS, ids=["recsys", "routing"])
def test_same_seed_same_trajectory(make) -> None:
    def run() -> list[float]:
        env = make(seed=3)
        obs, info = env.reset(seed=5)
        out = [float(obs["context"].sum())]
        for t in range(50):
            obs, reward, _, _, info = env.step(t % env.action_space.n)
            out += [reward, float(obs["context"].sum())]
        return out

    assert run() == run()


@pytest.mark.parametrize("make", ENVS, ids=["recsys", "routing"])
def test_rewards_are_drawn_from_the_stated_expected_rewards(make) -> None:
    env = make()
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    surprise, variance = 0.0, 0.0
    for _ in range(4000):
        action = int(rng.integers(env.action_space.n))
        p = env.expected_rewards()[action]
        _, reward, _, truncated, info = env.step(action)
        assert info["expected_reward"] == pytest.approx(p)
        surprise += reward - p
        variance += p * (1 - p)
        if truncated:
            env.reset()
    assert abs(surprise) < 4 * np.sqrt(variance)


@pytest.mark.parametrize("make, margin", [(ENVS[0], 2.5), (ENVS[1], 2.0)],
                         ids=["recsys", "routing"])
def test_the_oracle_clearly_beats_random(make, margin) -> None:
    _, _, expected = make().sample_contexts(5000, np.random.default_rng(0))
    assert expected.max(axis=1).mean() > margin * expected.mean()


@pytest.mark.parametrize("make", ENVS, ids=["recsys", "routing"])
def test_drift_changes_the_best_action_for_most_contexts(make) -> None:
    env = make()
    before = env.sample_contexts(2000, np.random.default_rng(1))[2].argmax(axis=1)
    env.drift()
    assert env.drifted
    after = env.sample_contexts(2000, np.random.default_rng(1))[2].argmax(axis=1)
    assert (before != after).mean() > 0.5


def test_drift_at_triggers_during_steps() -> None:
    env = RecsysEnv(n_items=100, drift_at=10)
    env.reset(seed=0)
    for _ in range(9):
        env.step(0)
    assert not env.drifted
    env.step(0)
    assert env.drifted


@pytest.mark.parametrize("make", ENVS, ids=["recsys", "routing"])
def test_sample_contexts_shapes_match_the_env(make) -> None:
    env = make()
    ctx, act, expected = env.sample_contexts(7, np.random.default_rng(0))
    assert ctx.shape == (7, len(env.feature_schema.context)) and ctx.dtype == np.float32
    assert expected.shape == (7, env.action_space.n)
    assert ((expected > 0) & (expected < 1)).all()
    if act is not None:
        assert act.shape == (7, env.action_space.n, len(env.feature_schema.action))


def test_routing_load_lowers_a_queues_chance() -> None:
    env = RoutingEnv()
    env.reset(seed=0)
    before = env.expected_rewards()[0]
    for _ in range(5):
        env.step(0)
    env._ticket = (0, 0, 0.5)  # noqa: SLF001 - compare the same ticket
    loaded = env.expected_rewards()[0]
    fresh = RoutingEnv()
    fresh.reset(seed=0)
    fresh._ticket = (0, 0, 0.5)  # noqa: SLF001
    assert loaded < fresh.expected_rewards()[0]
    assert 0 < before < 1


def test_slate_value_weights_positions() -> None:
    env = RecsysEnv(n_items=100)
    env.reset(seed=0)
    p = env.expected_rewards()
    order = list(np.argsort(-p)[:3])
    assert env.slate_expected_reward(order) > env.slate_expected_reward(order[::-1])
    assert env.slate_expected_reward(order[:1]) == pytest.approx(p.max())
