"""Decision and reward events of a simulated app, written to a bus like the server would."""

from __future__ import annotations

import json
import time

import numpy as np

from policyloop.bus import interface as bus
from policyloop.contract.events import DecisionEvent, RewardEvent
from policyloop.registry.interface import ModelVersion, Registry
from policyloop.simulators.routing import RoutingEnv


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


def kafka_start_ms(bootstrap: str, gap_ms: int = 5_000) -> int:
    """When a test's events on the shared Kafka topics should start: at the wall clock, or
    after the newest event already there if that is later (an earlier test's stream may run
    ahead of the clock). Other policies' records move a learner's join clock too, so a stream
    older than records before it on the log would close its windows at times that depend on
    how the partitions' reads interleave."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for topic in (bus.DECISIONS, bus.REWARDS)
                 for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        wanted = {tp for tp in parts if ends[tp] > 0}
        for tp in wanted:
            consumer.seek(tp, ends[tp] - 1)
        newest = 0
        deadline = time.monotonic() + 30
        while wanted and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    if record.offset == ends[tp] - 1:
                        newest = max(newest, int(json.loads(record.value)["timestamp_ms"]))
                        wanted.discard(tp)
        if wanted:
            raise TimeoutError(f"could not read the last record of {sorted(map(str, wanted))}")
    finally:
        consumer.close()
    return max(int(time.time() * 1000), newest + gap_ms)


def start_groups_at_end(bootstrap: str, groups: list[str]) -> None:
    """Commit the event topics' current end offsets for consumer groups that have not run yet,
    so learners in them read only what is written after this call. Tests that compare two
    learners' join statistics need this: whatever earlier tests and benchmarks left on the
    shared broker (rewards that name no policy, in particular, which every learner holds until
    their window closes) would otherwise count, in an order that depends on how the
    partitions' reads interleave."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p)
                 for topic in (bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS)
                 for p in sorted(probe.partitions_for_topic(topic) or ())]
        ends = probe.end_offsets(parts)
    finally:
        probe.close()
    for group in groups:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                 enable_auto_commit=False)
        try:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1)
                             for tp, offset in ends.items()})
        finally:
            consumer.close()
