"""The online learner's configuration, one typed object: ``policyloop learn``'s flags fill it
and every part of the learner reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policyloop.contract.errors import InvalidArgument


@dataclass(frozen=True)
class LearnConfig:
    registry: Path  # the registry folder, or this process's cache with registry_kafka
    policy: str
    registry_kafka: str = ""  # bootstrap of a Kafka-backed registry (policyloop/registry/kafka.py)
    registry_topic: str = "models"
    bus: str = "local"
    bus_path: Path = Path("var/bus")
    kafka_bootstrap: str = ""
    partitions: int = 4
    group: str = "policyloop-learner"
    from_latest: bool = False  # Kafka: a new group skips what the topics already hold
    shard_index: int = 0  # scale-out: this learner reads partitions p % shard_count == index
    shard_count: int = 1
    checkpoint: Path = Path("var/learner/checkpoint.json")
    window_ms: int = 30_000
    default_reward: float = 0.0
    reward_rule: str = "first"
    publish_every: int = 500
    publish_interval_s: float = 30.0
    gamma: float = 1.0
    discount: float = 0.0  # > 0: Q-learning on sequential decisions (qnet; online/qlearning.py)
    prior: float = 1.0
    holdout_every: int = 5
    gate: bool = True
    gate_margin: float = 0.01
    max_examples: int | None = None  # stop after this many (tests, replays)
    idle_exit_s: float | None = None  # stop after this long with the bus drained (replays)

    def __post_init__(self) -> None:
        for name in ("partitions", "publish_every", "window_ms"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.publish_interval_s > 0:
            raise InvalidArgument(
                f"publish_interval_s must be > 0, got {self.publish_interval_s}")
