"""The online learner's configuration, one typed object: ``policyloop learn`` builds it from
these defaults, a TOML file, ``POLICYLOOP_*`` variables and its flags
(``policyloop/contract/settings.py``), and every part of the learner reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import REWARD_LIMIT
from policyloop.contract.settings import setting
from policyloop.contract.signature import PolicyDefaults

# the reward contract of a policy whose spec names none
WINDOW_MS = 30_000
DEFAULT_REWARD = 0.0
REWARD_RULE = "first"
PUBLISH_FIRST = 16  # with publish_ramp: examples before the first version


@dataclass(frozen=True, kw_only=True)
class LearnConfig:
    registry: Path = setting(Path("var/registry"), "model registry folder (with "
                             "--registry-kafka: this process's cache of it)")
    policy: str = setting(help="the policy to learn and publish")
    registry_kafka: str = setting("", "publish to the Kafka-backed registry at this bootstrap "
                                  "(policyloop/registry/kafka.py); empty: the folder alone",
                                  metavar="HOST:PORT")
    registry_topic: str = setting("models", "the Kafka-backed registry's compacted topic")
    bus: str = setting("local", "event bus: the embedded log under --bus-path, or Kafka",
                       choices=("local", "kafka"))
    bus_path: Path = setting(Path("var/bus"), "embedded event log folder (bus local)")
    kafka_bootstrap: str = setting("", "Kafka bootstrap (bus kafka)", flag="--kafka",
                                   metavar="HOST:PORT")
    partitions: int = setting(4, "partitions of the event topics: the join waits for each of "
                              "them, so on Kafka this must equal the topics' partition count")
    group: str = setting("policyloop-learner", "Kafka consumer group")
    from_latest: bool = setting(False, "Kafka: a group without committed offsets starts at the "
                                "end of the topics (skips the history) instead of the beginning")
    # Scale-out: both come from one flag, --shard I/N (policyloop/cli.py).
    shard_index: int = setting(0, "this learner is shard shard_index of shard_count and reads "
                               "partitions p with p % shard_count == shard_index")
    shard_count: int = setting(1, "learner shards; shard 0 publishes, merging the others' "
                               "statistics; at most the topics' partitions")
    checkpoint: Path = setting(Path("var/learner/checkpoint.json"),
                               "the learner's state file (each shard its own)")
    # The reward contract: unset, the policy spec's [reward] table, else the defaults below
    # (resolved by the learner from the version it starts on: ``reward_contract``).
    window_ms: int | None = setting(None, "reward window, milliseconds; unset: the policy "
                                    f"spec's [reward] window_s, else {WINDOW_MS}")
    default_reward: float | None = setting(None, "reward of a decision none arrived for in "
                                           "its window; unset: the spec's [reward] default, "
                                           f"else {DEFAULT_REWARD}")
    reward_rule: str | None = setting(None, "several rewards for one decision: the first wins, "
                                      "or they add up; unset: the spec's [reward] rule, else "
                                      f"{REWARD_RULE}", choices=("first", "sum"))
    reward_limit: float = setting(REWARD_LIMIT, "largest |reward| learned from; a larger or "
                                  "non-finite one on the bus is skipped and counted "
                                  "(joiner.refused_rewards)")
    publish_every: int = setting(500, "examples per version")
    publish_ramp: bool = setting(True, "while the learner is young, publish sooner: a version "
                                 f"after {PUBLISH_FIRST} examples, then each time it has "
                                 "learned half as much again, until that reaches "
                                 "publish_every (a policy started from nothing is served "
                                 "what it learned at once, not after publish_every)")
    publish_interval_s: float = setting(30.0, "seconds per version", flag="--publish-interval")
    gamma: float = setting(1.0, "forgetting factor (1 = none)")
    discount: float = setting(0.0, "Q-learning discount in [0, 1) for sequential decisions "
                              "with a fixed action set (routing; online/qlearning.py): targets "
                              "r + discount * max Q of the next decision, DQN-style target head "
                              "synced at each promotion; 0 = contextual bandit. Use with "
                              "forgetting (--gamma < 1) so targets of older heads fade")
    prior: float = setting(1.0, "ridge prior strength")
    holdout_every: int = setting(5, "hold out one event in this many (by a hash of its id) "
                                 "for the promotion gate; 0 = none (with --no-gate none is "
                                 "held out: every event is learned from)")
    gate: bool = setting(True, "promote a version only if off-policy evaluation on held-out "
                         "events does not find it worse (--no-gate: promote every version)")
    gate_margin: float = setting(0.01, "how much lower a candidate's estimated value may be, "
                                 "beyond two standard errors, and still be promoted")
    max_examples: int | None = setting(None, "stop after this many examples (tests, replays)")
    idle_exit_s: float | None = setting(None, "stop after the bus has been drained for this "
                                        "many seconds; on Kafka, exit 2 if no partition was "
                                        "assigned within max(this, 20) seconds",
                                        flag="--idle-exit", metavar="S")
    # The network learner (models/network_learner.py, torch): its keyword options.
    network: Path | None = setting(None, "refit the whole torch network (IPS then DR, from "
                                   "this `train --checkpoint` of the serving version) at each "
                                   "publish instead of the linear head; slower, needs torch",
                                   metavar="CHECKPOINT")
    network_epochs: int = setting(2, "with --network: passes over the replay window per "
                                  "publish")
    replay: int = setting(20_000, "with --network: the latest joined examples trained on")
    network_clip: float = setting(50.0, "with --network: importance weights are "
                                  "min(1 / propensity, this)")
    network_lr: float = setting(1e-3, "with --network: Adam's learning rate")
    network_seed: int = setting(0, "with --network: seed of its shuffling and torch")
    metrics_port: int | None = setting(None, "serve Prometheus metrics on /metrics and "
                                       "readiness on /healthz (0 = any port)")
    metrics_host: str = setting("127.0.0.1", "address the metrics port binds (0.0.0.0 in a "
                                "pod, for the scraper)")

    def reward_contract(self, spec: PolicyDefaults) -> tuple[int, float, str]:
        """(window_ms, default_reward, reward_rule): each as set here, else as the policy's
        spec says, else the module's default; the spec's default reward must also fit
        ``reward_limit``."""
        default = self.default_reward
        if default is None:
            default = DEFAULT_REWARD if spec.default_reward is None else spec.default_reward
            if abs(default) > self.reward_limit:
                raise InvalidArgument(f"the spec's [reward] default {default} is beyond "
                                      f"reward_limit {self.reward_limit}")
        window = self.window_ms if self.window_ms is not None else spec.window_ms
        return (WINDOW_MS if window is None else window, default,
                self.reward_rule or spec.reward_rule or REWARD_RULE)

    def __post_init__(self) -> None:
        for name in ("partitions", "publish_every", "window_ms"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.reward_limit) and self.reward_limit > 0):
            raise InvalidArgument(f"reward_limit must be positive and finite, got "
                                  f"{self.reward_limit}")
        if self.default_reward is not None and (not math.isfinite(self.default_reward)
                                                or abs(self.default_reward) > self.reward_limit):
            raise InvalidArgument(f"default_reward must be finite and within ±reward_limit, got "
                                  f"{self.default_reward}")
        if not self.publish_interval_s > 0:
            raise InvalidArgument(
                f"publish_interval_s must be > 0, got {self.publish_interval_s}")
