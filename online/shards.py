"""Learner scale-out: N learner shards over the event topics' partitions, one model.

Shard i of N reads the partitions p with p % N == i of ``decisions``, ``rewards`` and
``activations`` (a static assignment, so a shard's partitions never move and its checkpoint
stays valid). An event's decision and reward share a key, hence a partition number, so each
shard joins its events completely on its own.

The head's sufficient statistics are sums over examples (``online/linear.py``), so the model
of all the data is the prior plus the sum of the shards' data terms. Every shard other than 0
writes a snapshot of its statistics to the ``learner-stats`` topic (key
``<policy>/<group>/<index>/<count>``, compacted on Kafka: a new consumer group or another
shard count starts afresh) whenever it would publish; shard 0 merges
the latest snapshot of every other shard into its own before each publish, and publishes
again when another shard has reported since. Snapshots are cumulative, so merging the latest
one is idempotent and a restarted shard that writes the same snapshot again changes nothing.

Exact for gamma = 1 (stationary): N shards publish the head one learner would, up to float
rounding. With forgetting, each shard discounts by its own example count, an approximation of
one learner's discounting by global arrival order.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from online.config import LearnConfig
from online.linear import LinearHeads
from policyloop.bus import interface as bus
from policyloop.contract.errors import InvalidArgument

log = logging.getLogger(__name__)


def parse_shard(text: str) -> bus.Shard:
    """``"I/N"`` (e.g. ``"1/2"``) as (index, count)."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None:
        raise InvalidArgument(f"shard must be INDEX/COUNT like 0/2, got {text!r}")
    return bus.check_shard(shard)


@dataclass(frozen=True)
class ShardStats:
    """One shard's cumulative statistics: what it learned from ``examples`` examples."""

    index: int
    count: int
    examples: int
    heads: LinearHeads

    def to_bytes(self) -> bytes:
        # values typed Any: numpy's stub would have a ** of arrays fill its allow_pickle: bool
        arrays: dict[str, Any] = {"shard_index": np.array(self.index),
                                  "shard_count": np.array(self.count),
                                  "shard_examples": np.array(self.examples),
                                  **self.heads.to_npz_arrays()}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardStats:
        try:
            with np.load(io.BytesIO(data)) as arrays:
                values = {k: arrays[k] for k in arrays.files}
            return cls(int(values.pop("shard_index")), int(values.pop("shard_count")),
                       int(values.pop("shard_examples")), LinearHeads.from_npz_arrays(values))
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"learner stats record is malformed: {exc}") from exc


def _key(policy: str, group: str, index: int, count: int) -> bytes:
    return f"{policy}/{group}/{index}/{count}".encode()


class StatsWriter:
    """What shards 1..N-1 do instead of publishing: write their snapshot, durably."""

    def __init__(self, producer: bus.Producer) -> None:
        self._producer = producer

    def write(self, policy: str, group: str, stats: ShardStats) -> None:
        self._producer.send(bus.LEARNER_STATS, stats.to_bytes(),
                            _key(policy, group, stats.index, stats.count))
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()


class StatsReader:
    """Shard 0's view of the other shards: the latest snapshot of each, read incrementally.

    Reads the whole topic from its start (a consumer group of its own that never commits), so
    a restarted shard 0 sees every shard's latest snapshot again.
    """

    def __init__(self, kind: str, policy: str, group: str, shard: bus.Shard, *,
                 path: str | Path, bootstrap: str = "", partitions: int = 4) -> None:
        self._policy = policy
        self._group = group
        self._shard = shard
        self._consumer = bus.open_consumer(kind, f"learner-stats-{uuid.uuid4().hex}",
                                           [bus.LEARNER_STATS], path=path,
                                           bootstrap=bootstrap, partitions=partitions)
        self._positions: dict[int, int] = {}
        self.latest: dict[int, ShardStats] = {}

    def refresh(self, timeout: float = 10.0) -> None:
        """Read up to the topic's end as it is now (bounded by ``timeout``; what could not be
        read in time is merged at a later publish)."""
        ends = self._consumer.end_offsets(bus.LEARNER_STATS)
        deadline = time.monotonic() + timeout
        while any(self._positions.get(p, 0) < end for p, end in ends.items()):
            records = self._consumer.poll(max_records=100, timeout=0.2)
            for record in records:
                self._positions[record.partition] = record.offset + 1
                self._apply(record)
            if not records and time.monotonic() > deadline:
                log.warning("learner stats: could not read up to %s within %.0fs", ends,
                            timeout)
                return

    def _apply(self, record: bus.Record) -> None:
        index, count = self._shard
        prefix = f"{self._policy}/{self._group}/"
        key = (record.key or b"").decode(errors="replace")
        if not key.startswith(prefix):
            return
        try:
            stats = ShardStats.from_bytes(record.value)
        except InvalidArgument as exc:
            log.error("learner stats: skipping record %r: %s", key, exc,
                      extra={"policy": self._policy})
            return
        if key != _key(self._policy, self._group, stats.index, stats.count).decode():
            log.error("learner stats: record %r holds shard %d/%d", key, stats.index,
                      stats.count)
            return
        if stats.count != count or stats.index == index:
            return  # another sharding (before a reshard) or this shard's own
        seen = self.latest.get(stats.index)
        if seen is None or stats.examples >= seen.examples:
            self.latest[stats.index] = stats

    def close(self) -> None:
        self._consumer.close()


class ShardMerge:
    """One shard's part in scale-out (module docstring): shards 1..N-1 write snapshots of
    their statistics, shard 0 reads the others' latest and merges them into its own before it
    publishes. Clients open on first use."""

    def __init__(self, config: LearnConfig) -> None:
        self._config = config
        self.shard = bus.check_shard((config.shard_index, config.shard_count))
        self.merged: dict[int, int] = {}  # shard 0: examples of each shard's merged snapshot
        self._writer: StatsWriter | None = None
        self._reader: StatsReader | None = None

    def write(self, examples: int, heads: LinearHeads) -> None:
        """Shards 1..N-1: hand this shard's cumulative statistics to shard 0, durably."""
        c = self._config
        if self._writer is None:
            self._writer = StatsWriter(bus.open_producer(
                c.bus, path=c.bus_path, bootstrap=c.kafka_bootstrap, partitions=c.partitions,
                client_id=f"policyloop-learner-{self.shard[0]}"))
        self._writer.write(c.policy, c.group, ShardStats(*self.shard, examples, heads))

    def others_reported(self) -> bool:
        """Shard 0: has another shard written a snapshot not merged yet?"""
        reader = self._read()
        return any(self.merged.get(i, -1) < stats.examples for i, stats in reader.latest.items())

    def merge(self, heads: LinearHeads, examples: int) -> tuple[LinearHeads, int]:
        """Shard 0: its own statistics merged with every other shard's latest snapshot, and
        the examples they cover."""
        reader = self._read()
        for index, stats in sorted(reader.latest.items()):
            try:
                heads = heads.merge(stats.heads)
            except InvalidArgument as exc:  # e.g. another body's width, another prior
                log.error("not merging shard %d's statistics: %s", index, exc,
                          extra={"policy": self._config.policy})
                continue
            examples += stats.examples
            self.merged[index] = stats.examples
        missing = set(range(1, self.shard[1])) - set(reader.latest)
        if missing:
            log.warning("publishing without statistics of shards %s (none written yet)",
                        sorted(missing), extra={"policy": self._config.policy})
        return heads, examples

    def _read(self) -> StatsReader:
        c = self._config
        if self._reader is None:
            self._reader = StatsReader(c.bus, c.policy, c.group, self.shard, path=c.bus_path,
                                       bootstrap=c.kafka_bootstrap, partitions=c.partitions)
        self._reader.refresh()
        return self._reader

    def close(self) -> None:
        for client in (self._writer, self._reader):
            if client is not None:
                client.close()
