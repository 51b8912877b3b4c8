"""The Kafka topics policyloop uses, and their idempotent creation (``policyloop topics``).

The test broker runs with ``auto.create.topics.enable=false``: every topic is created here,
explicitly, so its partition count, retention and cleanup policy are the declared ones rather
than broker defaults. Event topics share one partition count so that a key (an event id) maps
to the same partition number in ``decisions`` and ``rewards``. ``models`` is compacted: the
latest record per key (a policy's version or its current pointer) is kept forever, and so is
``learner-stats`` (each learner shard's latest statistics).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from policyloop.bus.interface import (
    ACTIVATIONS,
    DECISIONS,
    EXAMPLES,
    LEARNER_STATS,
    MODELS,
    REWARDS,
    BusUnavailable,
)
from policyloop.contract.errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """One topic: ``retention_ms`` -1 keeps records forever; ``compact`` keeps the newest
    record per key instead of deleting by age."""

    name: str
    partitions: int
    retention_ms: int
    compact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name) or self.name in (
                ".", ".."):
            raise InvalidArgument(
                f"topic name must be 1-249 of [A-Za-z0-9._-], got {self.name!r}")
        if (isinstance(self.partitions, bool) or not isinstance(self.partitions, int)
                or self.partitions < 1):
            raise InvalidArgument(
                f"partitions of {self.name!r} must be an int >= 1, got {self.partitions!r}")
        if (isinstance(self.retention_ms, bool) or not isinstance(self.retention_ms, int)
                or not (self.retention_ms == -1 or self.retention_ms > 0)):
            raise InvalidArgument(
                f"retention_ms of {self.name!r} must be -1 or > 0, got {self.retention_ms!r}")

    def configs(self) -> dict[str, str]:
        """The topic-level Kafka configs this spec sets."""
        return {"cleanup.policy": "compact" if self.compact else "delete",
                "retention.ms": str(self.retention_ms)}


DEFAULT_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(DECISIONS, partitions=4, retention_ms=WEEK_MS),
    TopicSpec(REWARDS, partitions=4, retention_ms=WEEK_MS),
    TopicSpec(ACTIVATIONS, partitions=4, retention_ms=WEEK_MS),
    TopicSpec(EXAMPLES, partitions=4, retention_ms=WEEK_MS),
    TopicSpec(MODELS, partitions=1, retention_ms=-1, compact=True),
    # the learner shards' latest statistics, one record per policy and shard (online/shards.py)
    TopicSpec(LEARNER_STATS, partitions=1, retention_ms=-1, compact=True),
)


def create_topics(bootstrap: str, specs: Sequence[TopicSpec] = DEFAULT_TOPICS, *,
                  timeout: float = 30.0) -> list[str]:
    """Create the topics of ``specs`` that do not exist yet; returns the names it created.

    Idempotent: a topic that already exists is left alone, but must have the spec's partition
    count and cleanup policy (else ``InvalidArgument``: recreate it or fix the spec). Returns
    once every created topic has a leader for each partition. Raises ``BusUnavailable`` when no
    broker answers at ``bootstrap`` within ``timeout`` seconds.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"specs name a topic twice: {names}")
    timeout_ms = max(int(timeout * 1000), 1)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="policyloop-topics",
                                 bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms)
    except KafkaError as e:
        raise BusUnavailable(f"kafka at {bootstrap!r} is unreachable: {e}") from e
    try:
        response = admin.create_topics(
            {s.name: {"num_partitions": s.partitions, "replication_factor": -1,
                      "configs": s.configs()} for s in specs},
            timeout_ms=timeout_ms, raise_errors=False)
        created, existing = [], []
        for result in response["topics"]:
            if result["error_code"] == 0:
                created.append(result["name"])
            elif result["error_code"] == _TOPIC_ALREADY_EXISTS:
                existing.append(result["name"])
            else:
                raise InvalidArgument(f"kafka refused to create topic {result['name']!r}: "
                                      f"{result['error_message']} (code {result['error_code']})")
        admin.wait_for_topics(created, timeout_ms=timeout_ms)
        if existing:
            by_name = {s.name: s for s in specs}
            described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(existing)}
            policies = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n, configs={"cleanup.policy": None})
                 for n in existing], config_filter="all")["topic"]
            for name in existing:
                spec = by_name[name]
                if described.get(name) != spec.partitions:
                    raise InvalidArgument(f"topic {name!r} exists with {described.get(name)} "
                                          f"partitions, the spec says {spec.partitions}")
                policy = policies[name]["cleanup.policy"]["value"]
                if policy != spec.configs()["cleanup.policy"]:
                    raise InvalidArgument(f"topic {name!r} exists with cleanup.policy={policy}, "
                                          f"the spec says {spec.configs()['cleanup.policy']}")
    except KafkaError as e:
        raise BusUnavailable(f"kafka at {bootstrap!r}: creating topics {names} failed: {e}") from e
    finally:
        admin.close()
    return [n for n in names if n in created]
