"""``policyloop learn``: join decisions with rewards from the bus, refresh the neural-linear
head, gate each candidate with off-policy evaluation, publish versions to the registry.

The body of the network is fixed (trained offline); online learning refreshes the last linear
layer and its posterior (LinUCB / linear Thompson sampling state, ``online/linear.py``). The
embedding of an example is recomputed with the serving model from the logged context and
candidate features, so the learner needs no torch.

One example in ``holdout_every`` (chosen by a hash of its event id, so the choice does not
depend on arrival order) is held out from training for the promotion gate (``online/gate.py``);
a candidate the gate rejects is still published (not current) with its evaluation, for the
audit trail.

State (consumer positions, joiner, head statistics, held-out window, counters) is checkpointed
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

import base64
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from online.config import LearnConfig
from online.gate import HOLDOUT_LIMIT, Holdout
from online.join import Example, RewardJoiner
from online.linear import LinearHeads
from online.qlearning import QTargets
from online.shards import ShardStats, StatsReader, StatsWriter
from policyloop.bus import interface as bus
from policyloop.contract.errors import InvalidArgument, NotFound, Unavailable
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent
from policyloop.registry.interface import Registry, open_registry
from policyloop.registry.onnx_head import read_head, replace_head
from policyloop.registry.onnx_model import LoadedModel, choose_providers, load_model

log = logging.getLogger(__name__)

DRAINED_CHECK_S = 0.5  # the longest the learner goes without asking the bus for end offsets
NEVER_ASSIGNED_S = 20.0  # a replay on Kafka never given a partition stops after this long


def _partitions_by_topic(assignment: set[bus.TopicPartition],
                         topics: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(topics, 0)
    for topic, _ in assignment:
        counts[topic] = counts.get(topic, 0) + 1
    return counts


class Learner:
    def __init__(self, config: LearnConfig) -> None:
        self.config = config
        self.registry: Registry = open_registry(config.registry, kafka=config.registry_kafka,
                                                topic=config.registry_topic)
        self._providers = choose_providers(False)
        self.model = self._load_current()
        weight, bias = read_head(self.model_bytes, self.model.manifest.head)
        self.heads = LinearHeads.from_head(weight, bias, prior=config.prior, gamma=config.gamma)
        self.shard = bus.check_shard((config.shard_index, config.shard_count))
        self.partitions = [p for p in range(config.partitions)
                           if p % config.shard_count == config.shard_index]
        if not self.partitions:
            raise InvalidArgument(f"shard {config.shard_index}/{config.shard_count} owns none "
                                  f"of the {config.partitions} partitions: use at most "
                                  f"{config.partitions} shards")
        self.joiner = RewardJoiner(window_ms=config.window_ms,
                                   default_reward=config.default_reward,
                                   reward_rule=config.reward_rule,
                                   sources=tuple(f"{topic}:{p}"
                                                 for topic in (bus.DECISIONS, bus.REWARDS)
                                                 for p in self.partitions))
        self._stats_writer: StatsWriter | None = None
        self._stats_reader: StatsReader | None = None
        self.merged: dict[int, int] = {}  # shard 0: examples of each shard's merged snapshot
        self.q: QTargets | None = None
        if config.discount:
            if config.shard_count > 1:
                raise InvalidArgument("discount (Q-learning) runs unsharded: its transitions "
                                      "follow the decisions of all partitions in time order")
            if self.model.manifest.kind != "qnet":
                raise InvalidArgument(f"discount {config.discount} (Q-learning) needs a fixed "
                                      f"action set (kind qnet); {config.policy} is "
                                      f"{self.model.manifest.kind}")
            self.q = QTargets(config.discount, weight, bias)
        self.positions: dict[tuple[str, int], int] = {}
        self.examples = 0
        self.since_publish = 0
        self.latest_reward_ms = 0  # event time of the newest reward learned from
        self.published: list[dict] = []
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

    def _load_current(self) -> LoadedModel:
        version = self.registry.current(self.config.policy)
        self.model_bytes = version.read_model()
        return load_model(version, expected=None, providers=self._providers)

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
                for record in records:
                    self.handle(record)
                    if self._done():
                        break
                    if self._publish_due():  # within a batch too: versions stay fresh
                        self.publish()
                        self._commit(consumer)
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
        for client in (self._stats_writer, self._stats_reader):
            if client is not None:
                client.close()
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
        self._was_drained = all(
            self.positions.get((topic, partition), 0) >= end
            for topic in (bus.DECISIONS, bus.REWARDS)
            for partition, end in consumer.end_offsets(topic).items()
            if partition % self.shard[1] == self.shard[0])
        return self._was_drained

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
        if self.since_publish >= self.config.publish_every:
            return True
        if time.monotonic() - self._last_publish < self.config.publish_interval_s:
            return False
        if self.since_publish or self._others_reported():
            return True
        self._last_publish = time.monotonic()  # look at the other shards once an interval
        return False

    def _others_reported(self) -> bool:
        """Shard 0 of several: has another shard written a snapshot not merged yet?"""
        reader = self._reader()
        if reader is None:
            return False
        reader.refresh()
        return any(self.merged.get(i, -1) < stats.examples
                   for i, stats in reader.latest.items())

    def _reader(self) -> StatsReader | None:
        if self.shard[1] == 1 or self.shard[0] != 0:
            return None
        if self._stats_reader is None:
            self._stats_reader = StatsReader(
                self.config.bus, self.config.policy, self.config.group, self.shard,
                path=self.config.bus_path,
                bootstrap=self.config.kafka_bootstrap, partitions=self.config.partitions)
        return self._stats_reader

    def _write_stats(self) -> dict:
        """Shards 1..N-1 publish no model: they hand their statistics to shard 0."""
        if self._stats_writer is None:
            self._stats_writer = StatsWriter(bus.open_producer(
                self.config.bus, path=self.config.bus_path,
                bootstrap=self.config.kafka_bootstrap, partitions=self.config.partitions,
                client_id=f"policyloop-learner-{self.shard[0]}"))
        self._stats_writer.write(self.config.policy, self.config.group, ShardStats(
            self.shard[0], self.shard[1], self.examples, self.heads))
        log.info("learner shard %d/%d: wrote statistics of %d examples", *self.shard,
                 self.examples, extra={"policy": self.config.policy})
        record = {"shard": self.shard[0], "examples": self.examples}
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    def _all_heads(self) -> tuple[LinearHeads, int]:
        """This shard's statistics merged with every other shard's latest snapshot, and the
        examples they cover."""
        heads, examples = self.heads, self.examples
        reader = self._reader()
        if reader is not None:
            reader.refresh()
            for index, stats in sorted(reader.latest.items()):
                try:
                    heads = heads.merge(stats.heads)
                except InvalidArgument as exc:  # e.g. another body's width, another prior
                    log.error("not merging shard %d's statistics: %s", index, exc,
                              extra={"policy": self.config.policy})
                    continue
                examples += stats.examples
                self.merged[index] = stats.examples
            missing = set(range(1, self.shard[1])) - set(reader.latest)
            if missing:
                log.warning("publishing without statistics of shards %s (none written yet)",
                            sorted(missing), extra={"policy": self.config.policy})
        return heads, examples

    def handle(self, record: bus.Record) -> None:
        """One bus record: join it, learn from whatever examples it completes.

        Records before the checkpointed position were already handled (the group's committed
        offsets can lag the checkpoint by one publish if the process died between the two):
        they are skipped, so nothing is counted twice. Records of other policies (the topics
        are shared) only move the join's clock: another policy's rewards would otherwise wait
        as orphans and crowd its bounded state. A reward or activation that names no policy
        is joined by its event id.
        """
        tp = (record.topic, record.partition)
        if record.offset < self.positions.get(tp, 0):
            return
        self.positions[tp] = record.offset + 1
        source = f"{record.topic}:{record.partition}"
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
        for example in examples:
            self.learn(example)

    def learn(self, example: Example) -> None:
        d = example.decision
        if d.baseline_action is not None:
            return  # apprentice mode: the app chose, its propensity is unknown
        embeddings, head, allowed = self._embed(d)
        self.examples += 1
        held_out = bool(self.config.holdout_every and zlib.crc32(d.event_id.encode())
                        % self.config.holdout_every == 0)
        if held_out:
            self._holdout.add(embeddings, allowed, d.chosen[0], d.propensities[0],
                              example.reward)
        if self.q is not None:
            assert allowed is not None
            done = self.q.step(embeddings, head, example.reward, allowed, train=not held_out)
            if done is None:
                return
            self.heads.update(done[0], done[2], head=done[1])
        elif held_out:
            return
        else:
            x = embeddings[d.chosen[0]] if allowed is None else embeddings
            self.heads.update(x, example.reward, head=head)
        self.since_publish += 1
        if example.reward_ms is not None:
            self.latest_reward_ms = max(self.latest_reward_ms, example.reward_ms)

    def _embed(self, d: DecisionEvent) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Embeddings of the decision's candidates [K, H] (scoring) or of its context [H]
        (qnet); the head that scored the chosen action; the allowed action indices (qnet)."""
        manifest = self.model.manifest
        context = np.asarray(d.context, np.float32)[None]
        if manifest.kind == "scoring":
            _, emb = self.model.run(context, np.asarray(d.action_features, np.float32)[None])
            return emb[0].astype(np.float64), 0, None
        _, emb = self.model.run(context)
        allowed = np.array([self.model.action_positions[a] for a in d.action_ids])
        return emb[0].astype(np.float64), int(allowed[d.chosen[0]]), allowed

    # -- publishing and the gate ----------------------------------------------------------

    def publish(self) -> dict:
        """Build the candidate head, gate it against the serving one, publish it (shards
        other than 0: write this shard's statistics instead)."""
        if self.shard[0] != 0:
            return self._write_stats()
        manifest = self.model.manifest
        heads, examples = self._all_heads()
        weight, bias = heads.head()
        evaluation = self._holdout.judge((weight, bias), read_head(self.model_bytes, manifest.head),
                                         enabled=self.config.gate,
                                         margin=self.config.gate_margin)
        promote = evaluation["promoted"]
        new_bytes = replace_head(self.model_bytes, manifest.head, weight, bias)
        new_manifest = replace(manifest, parent_version=manifest.version, version=0,
                               created_at="", sha256="", evaluation=evaluation,
                               training={"online": True, "examples": examples,
                                         "shards": self.shard[1],
                                         "latest_reward_ms": self.latest_reward_ms,
                                         "joiner": vars(self.joiner.stats)})
        version = self.registry.publish(
            self.config.policy, new_bytes, new_manifest,
            {"head.npz": heads.posterior().to_npz_bytes()}, make_current=promote)
        record = {"version": version.version, "examples": examples,
                  "latest_reward_ms": self.latest_reward_ms, **evaluation}
        self.published.append(record)
        log.info("published %s v%d (%s)", self.config.policy, version.version,
                 "promoted" if promote else "rejected by the gate",
                 extra={"policy": self.config.policy, "model_version": version.version})
        if promote:
            self.model = load_model(version, expected=manifest, providers=self._providers)
            self.model_bytes = new_bytes
            if self.q is not None:
                self.q.sync(weight, bias)
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    # -- checkpoint -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Positions, joiner, statistics and counters in one atomically replaced file."""
        buffer = io.BytesIO()
        np.savez(buffer, **self.heads.to_npz_arrays())
        state = {
            "positions": [[t, p, o] for (t, p), o in self.positions.items()],
            "heads": base64.b64encode(buffer.getvalue()).decode(),
            "examples": self.examples, "since_publish": self.since_publish,
            "latest_reward_ms": self.latest_reward_ms,
            "published": self.published, "model_version": self.model.version,
            "joiner": self.joiner.state(), "holdout": self._holdout.state(),
            "shard": list(self.shard), "merged": {str(i): n for i, n in self.merged.items()},
            "q": None if self.q is None else self.q.state(),
            **self._extra_state(),
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
        state = json.loads(self.config.checkpoint.read_text())
        if tuple(state.get("shard", (0, 1))) != self.shard:
            raise InvalidArgument(
                f"checkpoint {self.config.checkpoint} belongs to shard "
                f"{state['shard'][0]}/{state['shard'][1]}, not {self.shard[0]}/{self.shard[1]}:"
                " resharding needs fresh checkpoints and a new consumer group")
        self.merged = {int(i): n for i, n in state.get("merged", {}).items()}
        self.positions = {(t, p): o for t, p, o in state["positions"]}
        with np.load(io.BytesIO(base64.b64decode(state["heads"]))) as arrays:
            self.heads = LinearHeads.from_npz_arrays({k: arrays[k] for k in arrays.files})
        self.examples = state["examples"]
        self.since_publish = state["since_publish"]
        self.latest_reward_ms = state["latest_reward_ms"]
        self.published = state["published"]
        try:
            version = self.registry.get(self.config.policy, state["model_version"])
        except NotFound:  # retention removed it: a shard that never publishes keeps an old one
            version = self.registry.current(self.config.policy)
            log.warning("checkpointed %s v%d is gone from the registry; embedding with the "
                        "current v%d (the same body)", self.config.policy,
                        state["model_version"], version.version,
                        extra={"policy": self.config.policy})
        self.model_bytes = version.read_model()
        self.model = load_model(version, expected=None, providers=self._providers)
        if self.q is not None:
            self.q.sync(*read_head(self.model_bytes, self.model.manifest.head))
            self.q.load_state(state.get("q") or {})
        self.joiner.load_state(state["joiner"])
        self._holdout = Holdout.from_state(state["holdout"])
        self._restore_extra(state)

    def _extra_state(self) -> dict:
        """More checkpoint entries, for a learner that keeps more state (the torch network
        learner, ``models/network_learner.py``); written in the same atomic file."""
        return {}

    def _restore_extra(self, state: dict) -> None:
        """Read back what ``_extra_state`` wrote."""
