"""``policyloop learn``: join decisions with rewards from the bus, feed the joined examples to an
online learner, gate each of its candidates with off-policy evaluation, publish versions to the
registry.

The loop here is the same for every learner (``online/learners.py``: the protocol, and the
default that refreshes the neural-linear head and its posterior on the fixed body;
``online/qlearning.py``; ``models/network_learner.py``). The head learners recompute an
example's embedding with the serving model from the logged context and candidate features, so
they need no torch.

With the gate on, one example in ``holdout_every`` (chosen by a hash of its event id, so the
choice does not depend on arrival order) is held out from training for the promotion gate
(``online/gate.py``; with the gate off every example is learned from);
a candidate the gate rejects is still published (not current) with its evaluation, for the
audit trail.

State (consumer positions, joiner, the learner's state, held-out window, counters) is checkpointed
atomically in one file after every publish, then the consumer group's offsets are committed; a
restarted learner skips what the checkpoint already covers and resumes. Joins do not depend on
the interleaving of partitions (see ``online/join.py``) and, without forgetting (gamma = 1),
the statistics are sums that do not depend on the order of examples, so a killed and
restarted learner ends with the same head as an uninterrupted one. With forgetting, or with the
gate on, the result also depends on when versions were published, which a restart can shift.

Scale-out (``shard_count`` > 1, ``online/shards.py``): each shard reads its share of the
partitions and keeps its own checkpoint; shard 0 alone publishes models, from its statistics
merged with the other shards' latest snapshots, and gates on its own held-out events.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from online.config import PUBLISH_FIRST, LearnConfig
from online.gate import HOLDOUT_LIMIT, Holdout
from online.join import Example, RewardJoiner
from online.learners import LinearHeadLearner, OnlineLearner, Serving
from online.linear import LinearHeads
from online.qlearning import QLearner
from online.shards import ShardMerge
from policyloop.bus import interface as bus
from policyloop.contract.errors import (
    ExportParityError,
    InvalidArgument,
    ModelRejected,
    NotFound,
    PolicyloopError,
    Unavailable,
)
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent
from policyloop.registry.interface import ModelVersion, Registry, open_intact, open_registry
from policyloop.registry.onnx_model import LoadedModel, choose_providers, load_model, open_model

# Builds the learner for a loop, from the version serving at start and the loop's config.
LearnerFactory = Callable[[Serving, LearnConfig], OnlineLearner]


def default_learner(serving: Serving, config: LearnConfig) -> OnlineLearner:
    """The head learner, or Q-learning when the config has a discount."""
    if config.discount:
        if config.shard_count > 1:
            raise InvalidArgument("discount (Q-learning) runs unsharded: its transitions "
                                  "follow the decisions of all partitions in time order")
        return QLearner(serving, discount=config.discount, prior=config.prior,
                        gamma=config.gamma)
    return LinearHeadLearner(serving, prior=config.prior, gamma=config.gamma)

log = logging.getLogger(__name__)

DRAINED_CHECK_S = 0.5  # the longest the learner goes without asking the bus for end offsets
NEVER_ASSIGNED_S = 20.0  # a replay on Kafka never given a partition stops after this long


def _partitions_by_topic(assignment: set[bus.TopicPartition],
                         topics: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(topics, 0)
    for topic, _ in assignment:
        counts[topic] = counts.get(topic, 0) + 1
    return counts


def publish_threshold(publish_every: int, ramp: bool, learned: int) -> int:
    """Examples to learn before the next version, ``learned`` having been learned at the last
    one (``Learner._publish_threshold`` says why).

    >>> [publish_threshold(500, True, n) for n in (0, 16, 72, 2000)]
    [16, 16, 36, 500]
    """
    return min(publish_every, max(PUBLISH_FIRST, learned // 2)) if ramp else publish_every


class Learner:
    """The ``policyloop learn`` process: consume, join, learn, gate, publish, checkpoint.

    ``learner`` builds the online learner it feeds (default: ``default_learner``)."""

    def __init__(self, config: LearnConfig, learner: LearnerFactory | None = None) -> None:
        self.config = config
        self.registry: Registry = open_registry(config.registry, kafka=config.registry_kafka,
                                                topic=config.registry_topic)
        self._providers = choose_providers(False)
        self.serving = self._open_intact()
        self.algorithm: OnlineLearner = (learner or default_learner)(self.serving, config)
        if config.shard_count > 1 and not isinstance(self.algorithm, LinearHeadLearner):
            raise InvalidArgument(f"{type(self.algorithm).__name__} cannot be sharded: only the "
                                  "head learner's statistics merge across shards")
        self.shard = bus.check_shard((config.shard_index, config.shard_count))
        self.partitions = [p for p in range(config.partitions)
                           if p % config.shard_count == config.shard_index]
        if not self.partitions:
            raise InvalidArgument(f"shard {config.shard_index}/{config.shard_count} owns none "
                                  f"of the {config.partitions} partitions: use at most "
                                  f"{config.partitions} shards")
        window_ms, default_reward, reward_rule = config.reward_contract(
            self.serving.model.manifest.defaults)
        self.joiner = RewardJoiner(window_ms=window_ms, default_reward=default_reward,
                                   reward_rule=reward_rule,
                                   reward_limit=config.reward_limit,
                                   sources=tuple(f"{topic}:{p}"
                                                 for topic in (bus.DECISIONS, bus.REWARDS)
                                                 for p in self.partitions))
        self.shards = ShardMerge(config) if config.shard_count > 1 else None
        self.positions: dict[tuple[str, int], int] = {}
        self.examples = 0
        self.since_publish = 0
        self.latest_reward_ms = 0  # event time of the newest reward learned from
        self.published: list[dict] = []
        self.refused = 0  # candidates that failed serving's checks, not published
        self.position_resets = 0  # checkpointed positions past the bus's end (_reset_past_end)
        self.damaged_records = 0  # records the bus passed over as damaged (this run's consumer)
        # With forgetting the gate judges on about as much recent data as the head remembers,
        # so after a drift it compares on the new world, not on the old one.
        horizon = (HOLDOUT_LIMIT if config.gamma >= 1 or not config.holdout_every
                   else int(1 / (1 - config.gamma) / config.holdout_every))
        self._holdout = Holdout(limit=max(100, min(HOLDOUT_LIMIT, horizon)))
        self._last_publish = time.monotonic()
        self._stopping = False
        self._drained_checked, self._was_drained = 0.0, False
        self.topics = (bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS)
        # partitions held per subscribed topic, and existing topics with none (updated by run)
        self.assigned: dict[str, int] = dict.fromkeys(self.topics, 0)
        self.unassigned: set[str] = set()
        if config.checkpoint.exists():
            self._restore()

    def _open_intact(self) -> Serving:
        """The current version, or the newest intact one before it when the current one is
        damaged (the registry's rule, ``open_intact``), said loudly: candidates then build
        on that version, and the first promotion moves ``CURRENT`` past the damage."""
        serving, damage = open_intact(self.registry, self.config.policy, self._open)
        if damage is not None:
            log.error("the registry's current version of %s is damaged (%s); learning on v%d, "
                      "the newest intact version before it", self.config.policy, damage,
                      serving.model.version, extra={"policy": self.config.policy})
        return serving

    def _open(self, version: ModelVersion, expected: LoadedModel | None = None) -> Serving:
        return Serving(load_model(version, providers=self._providers,
                                  expected=None if expected is None else expected.manifest),
                       version.read_model())

    @property
    def model(self) -> LoadedModel:
        """The version serving now (the gate's incumbent)."""
        return self.serving.model

    @property
    def model_bytes(self) -> bytes:
        return self.serving.model_bytes

    # -- the loop -------------------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until stopped; ``on_ready`` is called once the consumer listens (on Kafka,
        after the group's first rebalance), so callers can tell when to send traffic."""
        consumer = bus.open_consumer(self.config.bus, self.config.group, list(self.topics),
                                     path=self.config.bus_path,
                                     bootstrap=self.config.kafka_bootstrap,
                                     partitions=self.config.partitions,
                                     from_latest=self.config.from_latest,
                                     shard=self.shard if self.shard[1] > 1 else None)
        started, listening = time.monotonic(), False
        try:
            drained_since: float | None = None  # the bus has been drained since then
            while not self._done():
                records = consumer.poll(max_records=500, timeout=0.2)
                self.damaged_records = consumer.damaged_records
                self.assigned = _partitions_by_topic(consumer.assignment(), self.topics)
                self.unassigned = consumer.unassigned_topics()
                # The local log assigns topics as they appear and reads them from the start, so
                # it listens at once; a Kafka consumer once the group gave it partitions.
                if not listening:
                    listening = self.config.bus == "local" or any(self.assigned.values())
                    if listening and on_ready is not None:
                        on_ready()
                    if not listening:
                        self._check_never_assigned(time.monotonic() - started)
                if records:
                    self._was_drained = False
                drained = not records and self._drained(consumer)
                if not drained:
                    drained_since = None
                else:  # windows may close on the furthest input's time
                    if drained_since is None:
                        drained_since = time.monotonic()
                    for example in self.joiner.caught_up():
                        self.learn(example)
                for k, record in enumerate(records):
                    self.handle(record)
                    if self._done():
                        break
                    if self._publish_due():  # within a batch too: versions stay fresh
                        self.publish()
                        self._commit(consumer)
                        _read_again(consumer, records[k + 1:])
                        break
                if self._publish_due():
                    self.publish()
                    self._commit(consumer)
                # measured from when the bus was found drained, never across the handling of
                # records: a slow batch on a loaded machine must not end a replay early
                if (self.config.idle_exit_s is not None and drained_since is not None
                        and time.monotonic() - drained_since > self.config.idle_exit_s):
                    break
        finally:
            consumer.close()

    def _check_never_assigned(self, waited_s: float) -> None:
        """A replay (``idle_exit_s``) on Kafka whose consumer was never given a partition
        stops with an error after ``max(idle_exit_s, NEVER_ASSIGNED_S)`` seconds instead of
        waiting for ever: the topics are missing or the group cannot form."""
        limit = self.config.idle_exit_s
        if limit is None or self.config.bus == "local":
            return
        limit = max(limit, NEVER_ASSIGNED_S)
        if waited_s > limit:
            raise Unavailable(
                f"no partition of {', '.join(self.topics)} was assigned to group "
                f"{self.config.group!r} within {limit:.0f} s (do the topics exist? "
                "`policyloop topics` creates them)")

    def close(self) -> None:
        """Release the registry's and the scale-out clients (the bus consumer closes when
        ``run`` returns)."""
        if self.shards is not None:
            self.shards.close()
        self.registry.close()

    def finish(self) -> None:
        """After ``run``: publish what is not published yet (examples, or shard 0 of several:
        snapshots other shards wrote since its last version)."""
        if self.since_publish or self._others_reported():
            self.publish()

    def _drained(self, consumer: bus.Consumer) -> bool:
        """True when every record on the bus has been read. An empty poll alone does not say
        so: a Kafka consumer waiting for a rebalance also polls nothing, and neither does one
        holding no partition of a topic that exists, nor one that was never given any (on
        Kafka). The end offsets are asked for at most every ``DRAINED_CHECK_S`` seconds, not
        at the poll rate; in between, the last answer stands while polls return nothing (the
        caller asks only after an empty poll, and any record read resets it)."""
        if self.unassigned or (self.config.bus != "local" and not any(self.assigned.values())):
            self._was_drained = False
            return False
        now = time.monotonic()
        if now - self._drained_checked < DRAINED_CHECK_S:
            return self._was_drained
        self._drained_checked = now
        ends = {(topic, partition): end for topic in self.topics
                for partition, end in consumer.end_offsets(topic).items()
                if partition % self.shard[1] == self.shard[0]}
        self._reset_past_end(consumer, ends)
        self._was_drained = all(self.positions.get(tp, 0) >= end for tp, end in ends.items()
                                if tp[0] in (bus.DECISIONS, bus.REWARDS))
        return self._was_drained

    def _reset_past_end(self, consumer: bus.Consumer, ends: dict[tuple[str, int], int]) -> None:
        """A position past a partition's end was taken on another log (the bus deleted and
        recreated, or restored from an older copy: neither bus reuses an offset), and keeping
        it would skip every record up to it. The rule, as the buses' own: read the partition
        again from its earliest record, logged and counted (``position_resets``)."""
        for tp, end in sorted(ends.items()):
            position = self.positions.get(tp, 0)
            if position <= end:
                continue
            log.error("%s:%d: position %d is past the end of the bus (%d): it was taken on "
                      "another log; reading the partition from its earliest record", tp[0],
                      tp[1], position, end, extra={"policy": self.config.policy})
            self.positions[tp] = 0
            self.position_resets += 1
            if tp in consumer.assignment():
                consumer.seek(tp, 0)

    def _commit(self, consumer: bus.Consumer) -> None:
        """Commit the group's offsets; the checkpoint is the truth, so a failed commit (e.g.
        during a rebalance) only means some records are re-read and skipped after a restart."""
        try:
            consumer.commit(dict(self.positions))
        except bus.BusUnavailable as exc:
            log.warning("offset commit failed, will retry at the next publish: %s", exc,
                        extra={"policy": self.config.policy})

    def stop(self) -> None:
        """Ask ``run`` to return after the record in hand (safe from a signal handler)."""
        self._stopping = True

    def _done(self) -> bool:
        return self._stopping or (self.config.max_examples is not None
                                  and self.examples >= self.config.max_examples)

    def _publish_due(self) -> bool:
        if self.since_publish >= self._publish_threshold():
            return True
        if time.monotonic() - self._last_publish < self.config.publish_interval_s:
            return False
        if self.since_publish or self._others_reported():
            return True
        self._last_publish = time.monotonic()  # look at the other shards once an interval
        return False

    def _publish_threshold(self) -> int:
        """Examples per version: ``publish_every``; with ``publish_ramp``, while fewer than
        that were learned at the last version, half of those (at least ``PUBLISH_FIRST``):
        versions after 16, 32, 48, 72, 108, ... examples. From nothing, the first versions
        change the most: on the digits stream (bench/bandit_bench.py) a model refreshed every
        10 events averaged 0.85 with UCB, one refreshed every 100 only 0.46."""
        learned = self.algorithm.learned - self.since_publish  # at the last version
        return publish_threshold(self.config.publish_every, self.config.publish_ramp, learned)

    def _others_reported(self) -> bool:
        """Shard 0 of several: has another shard written a snapshot not merged yet?"""
        return self.shards is not None and self.shard[0] == 0 and self.shards.others_reported()

    def _write_stats(self) -> dict:
        """Shards 1..N-1 publish no model: they hand their statistics to shard 0."""
        assert self.shards is not None
        self.shards.write(self.examples, self._heads())
        log.info("learner shard %d/%d: wrote statistics of %d examples", *self.shard,
                 self.examples, extra={"policy": self.config.policy})
        record = {"shard": self.shard[0], "examples": self.examples}
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    @property
    def merged(self) -> dict[int, int]:
        """Shard 0 of several: the examples of each other shard's last merged snapshot."""
        return {} if self.shards is None else self.shards.merged

    def _heads(self) -> LinearHeads:
        assert isinstance(self.algorithm, LinearHeadLearner)  # checked when sharded
        return self.algorithm.heads

    def handle(self, record: bus.Record) -> None:
        """One bus record: join it, learn from whatever examples it completes.

        Records before the checkpointed position were already handled (the group's committed
        offsets can lag the checkpoint by one publish if the process died between the two):
        they are skipped, so nothing is counted twice. Records of other policies (the topics
        are shared) only move the join's clock: another policy's rewards would otherwise wait
        as orphans and crowd its bounded state. A reward or activation that names no policy
        is joined by its event id. A record that is no event (another program's, a damaged
        one) is skipped and counted, and the learner goes on: one bad record must not stop
        every policy's learning behind it.
        """
        tp = (record.topic, record.partition)
        if record.offset < self.positions.get(tp, 0):
            return
        self.positions[tp] = record.offset + 1
        source = f"{record.topic}:{record.partition}"
        try:
            examples = self._join(record, source)
        except InvalidArgument as exc:  # another program's record, or a damaged one
            self.joiner.stats.undecodable_records += 1
            if self.joiner.stats.undecodable_records <= _LOGGED_UNDECODABLE:
                log.warning("skipping %s record at offset %d: %s", source, record.offset, exc,
                            extra={"policy": self.config.policy})
            return
        for example in examples:
            self.learn(example)

    def _join(self, record: bus.Record, source: str) -> list[Example]:
        """Decode one record and hand it to the joiner; InvalidArgument if it is no event."""
        mine = self.config.policy
        if record.topic == bus.DECISIONS:
            event = DecisionEvent.from_bytes(record.value)
            examples = (self.joiner.add_decision(event, source) if event.policy == mine
                        else self.joiner.observe(source, event.timestamp_ms))
        elif record.topic == bus.REWARDS:
            reward = RewardEvent.from_bytes(record.value)
            examples = (self.joiner.add_reward(reward, source) if reward.policy in ("", mine)
                        else self.joiner.observe(source, reward.timestamp_ms))
        else:
            activation = ActivationEvent.from_bytes(record.value)
            examples = (self.joiner.add_activation(activation)
                        if activation.policy in ("", mine) else [])
        return examples

    def learn(self, example: Example) -> None:
        d = example.decision
        if d.baseline_action is not None:
            return  # apprentice mode: the app chose, its propensity is unknown
        self.examples += 1
        every = self.config.holdout_every if self.config.gate else 0  # no gate: learn from all
        held_out = bool(every and zlib.crc32(d.event_id.encode()) % every == 0)
        if held_out:
            model = self.model
            self._holdout.add(model.manifest.policy_kind.logged(d, model.action_positions),
                              d.propensities[0], example.reward)
        before = self.algorithm.learned
        self.algorithm.learn_one(example, train=not held_out)
        if self.algorithm.learned == before:
            return
        self.since_publish += self.algorithm.learned - before
        if example.reward_ms is not None:
            self.latest_reward_ms = max(self.latest_reward_ms, example.reward_ms)

    # -- publishing and the gate ----------------------------------------------------------

    def publish(self) -> dict:
        """Build the learner's candidate, gate it against the serving version, publish it
        (shards other than 0: write this shard's statistics instead)."""
        if self.shard[0] != 0:
            return self._write_stats()
        manifest = self.model.manifest
        examples = self.examples
        try:  # never publish what serving could not load
            if self.shard[1] > 1:
                assert self.shards is not None
                heads, examples = self.shards.merge(self._heads(), self.examples)
                assert isinstance(self.algorithm, LinearHeadLearner)
                candidate = self.algorithm.candidate(heads)
            else:
                candidate = self.algorithm.candidate()
            new_manifest = replace(candidate.manifest or manifest, policy=manifest.policy,
                                   parent_version=manifest.version, version=0, created_at="",
                                   sha256="")
            opened = open_model(candidate.model, new_manifest, providers=self._providers)
        except (InvalidArgument, ModelRejected, ExportParityError) as exc:
            return self._refused(exc)
        evaluation = self._holdout.judge(opened.run, self.model.run, enabled=self.config.gate,
                                         margin=self.config.gate_margin)
        promote = evaluation["promoted"]
        new_manifest = replace(new_manifest, evaluation=evaluation, training={
            "online": True, **candidate.training, "examples": examples,
            "shards": self.shard[1], "latest_reward_ms": self.latest_reward_ms,
            "joiner": vars(self.joiner.stats)})
        version = self.registry.publish(self.config.policy, candidate.model, new_manifest,
                                        candidate.extras, make_current=promote)
        record = {"version": version.version, "examples": examples,
                  "latest_reward_ms": self.latest_reward_ms, **evaluation}
        self.published.append(record)
        log.info("published %s v%d (%s)", self.config.policy, version.version,
                 "promoted" if promote else "rejected by the gate",
                 extra={"policy": self.config.policy, "model_version": version.version})
        if promote:
            self.serving = self._open(version, expected=self.model)
            self.algorithm.adopt(candidate, self.serving)
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    def _refused(self, exc: PolicyloopError) -> dict:
        """A candidate that cannot be built (weights beyond float32, a failed export parity
        check) or fails serving's checks (does not load, scores non-finite values) is not
        published; the learner keeps learning and tries again at the next publish."""
        log.error("not publishing %s: the candidate cannot be built or fails serving's "
                  "checks: %s",
                  self.config.policy, exc, extra={"policy": self.config.policy})
        record = {"version": None, "examples": self.examples, "promoted": False,
                  "refused": str(exc)}
        self.refused += 1
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    # -- checkpoint -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Positions, joiner, the learner's state and counters in one atomically replaced
        file."""
        state = {
            "format": 2,
            "positions": [[t, p, o] for (t, p), o in self.positions.items()],
            "learner": {"type": type(self.algorithm).__name__, **self.algorithm.state()},
            "examples": self.examples, "since_publish": self.since_publish,
            "latest_reward_ms": self.latest_reward_ms, "refused": self.refused,
            "published": self.published, "model_version": self.model.version,
            "joiner": self.joiner.state(), "holdout": self._holdout.state(),
            "shard": list(self.shard), "merged": {str(i): n for i, n in self.merged.items()},
        }
        path = self.config.checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _restore(self) -> None:
        """Resume from the checkpoint; a damaged one (truncated, hand-edited, another
        program's file) stops the learner with one line that names it, never a traceback and
        never a silent fresh start that would re-learn what the old state already holds."""
        path = self.config.checkpoint
        state = _read_checkpoint(path)
        try:
            self._load(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise InvalidArgument(_damaged(path, f"its state does not load ({exc!r})")) from exc

    def _load(self, state: dict) -> None:
        if tuple(state.get("shard", (0, 1))) != self.shard:
            raise InvalidArgument(
                f"checkpoint {self.config.checkpoint} belongs to shard "
                f"{state['shard'][0]}/{state['shard'][1]}, not {self.shard[0]}/{self.shard[1]}:"
                " resharding needs fresh checkpoints and a new consumer group")
        learner_state = _learner_state(state)
        kind = type(self.algorithm).__name__
        if learner_state.get("type", kind) != kind:
            raise InvalidArgument(
                f"checkpoint {self.config.checkpoint} holds the state of "
                f"{learner_state['type']}, not {kind}: give this learner its own checkpoint")
        if self.shards is not None:
            self.shards.merged = {int(i): n for i, n in state.get("merged", {}).items()}
        self.positions = {(t, p): o for t, p, o in state["positions"]}
        self.examples = state["examples"]
        self.since_publish = state["since_publish"]
        self.latest_reward_ms = state["latest_reward_ms"]
        self.refused = int(state.get("refused", 0))
        self.published = state["published"]
        try:
            self.serving = self._open(self.registry.get(self.config.policy,
                                                        state["model_version"]))
        except (NotFound, ModelRejected) as exc:
            # retention removed it (a shard that never publishes keeps an old one), or it is
            # damaged: embed with the version start-up chose (the same body)
            log.warning("checkpointed %s v%d %s; embedding with v%d (the same body)",
                        self.config.policy, state["model_version"],
                        "is gone from the registry" if isinstance(exc, NotFound)
                        else f"is damaged ({exc})", self.serving.model.version,
                        extra={"policy": self.config.policy})
        self.algorithm.load_state(learner_state, self.serving)
        self.joiner.load_state(state["joiner"])
        self._holdout = Holdout.from_state(state["holdout"], warn=lambda message: log.warning(
            message, extra={"policy": self.config.policy}))


_LOGGED_UNDECODABLE = 20  # the first ones are logged; all are counted (join events metric)

def _read_again(consumer: bus.Consumer, rest: list[bus.Record]) -> None:
    """After a publish in the middle of a batch, drop the batch's ``rest`` and read it again:
    each partition in it from its first unhandled record, which is where a learner restarted
    from the checkpoint just written reads on from. The records then come in the same
    interleaving of partitions either way, so a learner whose result depends on the order of
    its examples (the network learner) ends a restart where an uninterrupted run ends. Costs
    re-reading at most one batch per version."""
    first: dict[tuple[str, int], int] = {}
    for record in rest:
        first.setdefault((record.topic, record.partition), record.offset)
    for tp, offset in sorted(first.items()):
        consumer.seek(tp, offset)


_CHECKPOINT_KEYS = ("positions", "examples", "since_publish", "latest_reward_ms", "published",
                    "model_version", "joiner", "holdout")


def _damaged(path: Path, problem: str) -> str:
    return (f"checkpoint {path}: {problem}; move it away (or pass another --checkpoint) to "
            "start this learner fresh")


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's JSON object, or InvalidArgument saying what is wrong with the file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(_damaged(path, f"cannot be read ({exc})")) from exc
    if not text.strip():
        raise InvalidArgument(_damaged(path, "is empty"))
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(_damaged(path, f"is not valid JSON ({exc})")) from exc
    if not isinstance(state, dict):
        raise InvalidArgument(_damaged(path, f"holds a JSON {type(state).__name__}, "
                                             "not a checkpoint object"))
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if "learner" not in state and "heads" not in state:
        missing.append("learner")
    if missing:
        raise InvalidArgument(_damaged(path, f"lacks {', '.join(missing)}"))
    return state


def _learner_state(state: dict) -> dict:
    """The learner's part of a checkpoint; a checkpoint written before learners had a state
    of their own kept the head statistics (and Q-learning's pending step, and the network
    learner's "network") at the top level."""
    if "learner" in state:
        return state["learner"]
    legacy = {"heads": state["heads"], "learned": state.get("examples", 0),
              "q": state.get("q")}
    if "network" in state:
        legacy["network"] = state["network"]
    return legacy
