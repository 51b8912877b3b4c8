"""Decision and reward events of a simulated app, written to a bus like the server would."""

from __future__ import annotations

import numpy as np

from models.registry import ModelVersion, Registry
from models.routing_env import RoutingEnv
from online import bus
from online.events import DecisionEvent, RewardEvent


def register_untrained_routing(registry: Registry, policy: str = "routing") -> ModelVersion:
    """An untrained routing QNetwork (seeded) as the first version of ``policy``: learners
    start from it."""
    import torch

    from models.export import export_and_register
    from models.policies import QNetwork

    torch.manual_seed(0)
    env = RoutingEnv()
    return export_and_register(QNetwork(len(env.feature_schema.context), 8), env, registry,
                               policy=policy, training={})


def routing_events(n: int, seed: int, *, reward_rate: float = 0.9,
                   start_ms: int = 1_000_000,
                   policy: str = "routing") -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) records: uniform-random routing decisions, each rewarded (with
    probability ``reward_rate``) 100 ms later from the simulator's true expected reward."""
    env = RoutingEnv()
    rng = np.random.default_rng(seed)
    context, _, expected = env.sample_contexts(n, rng)
    a = len(env.action_names)
    out = []
    for i in range(n):
        action = int(rng.integers(a))
        t = start_ms + 10 * i
        d = DecisionEvent(
            event_id=f"{policy}-{seed}-{i}", policy=policy, model_version=1, timestamp_ms=t,
            context=context[i], action_ids=list(env.action_names), action_features=None,
            chosen=[action], propensities=[1 / a], probabilities=np.full((1, a), 1 / a),
            strategy="uniform", active=True, baseline_action=None, policy_action=None)
        out.append((bus.DECISIONS, d.key, d.to_bytes()))
        if rng.random() < reward_rate:
            r = RewardEvent(event_id=d.event_id, policy=policy,
                            value=float(rng.random() < expected[i, action]), slot_rewards=[],
                            timestamp_ms=t + 100)
            out.append((bus.REWARDS, r.key, r.to_bytes()))
    return out


def write(producer: bus.Producer, records: list[tuple[str, bytes, bytes]]) -> None:
    for topic, key, value in records:
        producer.send(topic, value, key)
    producer.flush()
