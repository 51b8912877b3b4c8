"""The event bus on Apache Kafka: ``policyloop.bus.interface``'s Producer and Consumer over
kafka-python.

kafka-python types stay inside this module: callers get ``policyloop.bus.interface.Record`` and the
project's errors. A producer connects lazily, so a process can start while the broker is down; until
it answers, ``send`` raises ``BusUnavailable`` after at most ``max_block_ms``. Keyed records go to
``murmur2(key) % partitions`` (Kafka's default partitioner), so one key always lands on the same
partition of a topic. Topics are never created implicitly (see ``policyloop/bus/topics.py``):
sending to a missing topic raises ``BusUnavailable`` once ``max_block_ms`` has passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as _KafkaTP

from policyloop.bus.interface import (
    BusUnavailable,
    Record,
    Shard,
    TopicPartition,
    check_offset,
    check_record,
    check_shard,
    check_topic_partition,
)
from policyloop.contract.errors import InvalidArgument

log = logging.getLogger(__name__)

# kafka-python backs off reconnects exponentially up to 30 s by default; a broker that comes
# back should be in use again within about a second.
_RECONNECT_BACKOFF_MAX_MS = 1000
_CLOSE_TIMEOUT_S = 5.0
# kafka-python refreshes metadata every 5 min by default; a consumer whose group was formed
# before its topics' metadata arrived should notice them within seconds.
_METADATA_MAX_AGE_MS = 5000
_REJOIN_MAX_S = 300.0  # the longest wait between two rejoins of a member holding nothing


def _check_tp(tp: object) -> _KafkaTP:
    return _KafkaTP(*check_topic_partition(tp))


class KafkaProducerAdapter:
    """A ``Producer`` on Kafka; safe to share between threads.

    ``send`` hands the record to kafka-python's buffer and remembers its future; ``flush``
    waits up to ``timeout`` seconds and raises ``BusUnavailable`` unless every record sent
    since the previous flush was acknowledged (``acks="all"``: by every in-sync replica). After
    a failed flush the caller owns those records again; the client may still deliver some of
    them later, so consumers see at-least-once. Call ``flush`` regularly: the futures of
    unflushed records are kept until then.
    """

    def __init__(self, bootstrap: str, *, client_id: str = "policyloop", acks: int | str = "all",
                 linger_ms: int = 5, max_block_ms: int = 2000,
                 request_timeout_ms: int = 10_000, delivery_timeout_ms: int = 30_000,
                 max_request_size: int = 1 << 20) -> None:
        if not isinstance(bootstrap, str) or not bootstrap:
            raise InvalidArgument(f"bootstrap must be 'host:port[,host:port]', got {bootstrap!r}")
        if acks not in ("all", 0, 1, -1):
            raise InvalidArgument(f"acks must be 'all', -1, 0 or 1, got {acks!r}")
        for name, value in (("linger_ms", linger_ms), ("max_block_ms", max_block_ms),
                            ("request_timeout_ms", request_timeout_ms),
                            ("delivery_timeout_ms", delivery_timeout_ms),
                            ("max_request_size", max_request_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be an int >= 0, got {value!r}")
        if delivery_timeout_ms < request_timeout_ms + linger_ms:
            raise InvalidArgument(
                f"delivery_timeout_ms ({delivery_timeout_ms}) must be >= request_timeout_ms "
                f"+ linger_ms ({request_timeout_ms + linger_ms})")
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.acks = acks
        self.linger_ms = linger_ms
        self.max_block_ms = max_block_ms
        self.request_timeout_ms = request_timeout_ms
        self.delivery_timeout_ms = delivery_timeout_ms
        self.max_request_size = max_request_size
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._pending: list[Any] = []  # kafka-python futures of records not yet flushed
        self._closed = False

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        check_record(value, key)
        producer = self._connected()
        try:
            future = producer.send(topic, value=bytes(value),
                                   key=None if key is None else bytes(key))
        except MessageSizeTooLargeError as e:
            raise InvalidArgument(f"record for topic {topic!r} is too large: {e}") from e
        except ValueError as e:  # an invalid topic name
            raise InvalidArgument(f"cannot send to topic {topic!r}: {e}") from e
        except KafkaError as e:  # metadata not available within max_block_ms, or closed
            raise BusUnavailable(
                f"kafka at {self.bootstrap!r}: cannot send to {topic!r} within "
                f"{self.max_block_ms} ms (broker down or topic missing?): {e}") from e
        if future.is_done and future.failed():
            raise BusUnavailable(
                f"kafka at {self.bootstrap!r}: send to {topic!r} failed: {future.exception}")
        with self._lock:
            self._pending.append(future)

    def delete(self, topic: str, key: bytes) -> None:
        """A tombstone for ``key`` (a record without a value): on a compacted topic, the key
        and its earlier records go away at the next compaction. Delivered like ``send``."""
        producer = self._connected()
        try:
            future = producer.send(topic, value=None, key=bytes(key))
        except KafkaError as e:
            raise BusUnavailable(f"kafka at {self.bootstrap!r}: cannot send a tombstone to "
                                 f"{topic!r}: {e}") from e
        with self._lock:
            self._pending.append(future)

    def flush(self, timeout: float = 10.0) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            producer = self._producer
        if not pending or producer is None:
            return
        try:
            producer.flush(timeout=max(timeout, 0.0))
        except KafkaError as e:
            log.debug("kafka flush failed: %s", e)
        failed = [f for f in pending if f.is_done and f.failed()]
        waiting = sum(not f.is_done for f in pending)
        if failed or waiting:
            # The caller keeps (spools) what was not acknowledged. Left alone, the client
            # would still deliver its buffered copy once the broker is back, and every record
            # would arrive twice; and after a record the broker refused (one over its
            # message.max.bytes), kafka-python's idempotent producer fails every later record
            # too. So this producer is dropped with its buffer, and the next send connects
            # afresh. (A request already at the broker may still land: Kafka's delivery stays
            # at-least-once, which the reward join tolerates.)
            with self._lock:
                if self._producer is producer:
                    self._producer = None
                    self._pending = []
            _discard(producer)
        if failed or waiting:
            cause = f"; first error: {failed[0].exception}" if failed else ""
            raise BusUnavailable(
                f"kafka at {self.bootstrap!r}: {len(failed)} of {len(pending)} records failed "
                f"and {waiting} were not acknowledged within {timeout}s{cause}")

    def close(self) -> None:
        """Deliver what is buffered (up to 5 s; what is left is dropped and logged) and
        disconnect."""
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
            self._pending = []
        if producer is None:
            return
        try:
            producer.close(timeout=_CLOSE_TIMEOUT_S)
        except KafkaError as e:
            log.warning("closing the kafka producer for %s: unacknowledged records dropped: %s",
                        self.bootstrap, e)
            _discard(producer)

    def _connected(self) -> KafkaProducer:
        """The kafka-python producer, created on first use (and again after a failed try)."""
        with self._lock:
            if self._closed:
                raise BusUnavailable("kafka producer is closed")
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.bootstrap, client_id=self.client_id,
                        acks=self.acks, linger_ms=self.linger_ms,
                        max_block_ms=self.max_block_ms, bootstrap_timeout_ms=self.max_block_ms,
                        request_timeout_ms=self.request_timeout_ms,
                        delivery_timeout_ms=self.delivery_timeout_ms,
                        max_request_size=self.max_request_size, allow_auto_create_topics=False,
                        reconnect_backoff_max_ms=_RECONNECT_BACKOFF_MAX_MS)
                except KafkaError as e:
                    raise BusUnavailable(
                        f"kafka at {self.bootstrap!r} is unreachable: {e}") from e
            return self._producer


def _discard(producer: KafkaProducer) -> None:
    """Close a producer now, dropping what it buffers. kafka-python's close() stops at a flush
    timeout and leaves its sender thread (not a daemon) retrying until delivery_timeout_ms,
    which would deliver stale records and delay process exit; the sender is stopped first."""
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(_CLOSE_TIMEOUT_S)
    try:
        producer.close(timeout=0)
    except KafkaError:
        pass


class KafkaConsumerAdapter:
    """A ``Consumer`` on Kafka: a member of consumer group ``group`` subscribed to ``topics``.

    Offsets are committed only by ``commit`` (auto-commit is off), so processing is
    at-least-once. Partitions are assigned by the group on ``poll``: ``assignment()`` is empty
    until the first poll has joined the group, and changes when members join or leave. With
    ``shard`` = (index, count) the consumer assigns itself partitions p with p % count == index
    instead (no group rebalancing; offsets are still committed to ``group``). A partition
    without a committed offset starts at ``auto_offset_reset`` ("earliest" or "latest").
    Not thread-safe: use one consumer per thread.

    Assignment watch: a member can come out of a rebalance holding no partition of a topic it
    subscribes to, when the group was formed before the topic's metadata reached the client
    (a topic created just before, or a broker restart); kafka-python then waits for a metadata
    change that may already have happened. Metadata is refreshed every ``metadata_max_age_ms``
    (5 s here, not 5 min), and a subscribed topic that exists but of which this member has held
    no partition for ``rejoin_after_s`` seconds makes it log one warning and rejoin the group
    (unsubscribe, subscribe), with the wait doubling after each rejoin up to
    ``_REJOIN_MAX_S``, so a member that legitimately holds nothing (a group with more members
    than partitions) only rejoins rarely. ``unassigned_topics()`` names such topics;
    ``rejoins`` counts the rejoins.
    """

    def __init__(self, bootstrap: str, group: str, topics: Iterable[str], *,
                 auto_offset_reset: str = "earliest", client_id: str = "policyloop",
                 session_timeout_ms: int = 10_000, timeout: float = 10.0,
                 shard: Shard | None = None, rejoin_after_s: float = 5.0) -> None:
        if isinstance(topics, str) or not (topics := list(dict.fromkeys(topics))):
            raise InvalidArgument(f"topics must be a non-empty list of names, got {topics!r}")
        if not isinstance(group, str) or not group:
            raise InvalidArgument(f"group must be a non-empty string, got {group!r}")
        if auto_offset_reset not in ("earliest", "latest"):
            raise InvalidArgument(
                f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        self.bootstrap = bootstrap
        self.group = group
        self.topics = topics
        self.timeout = timeout
        self._timeout_ms = max(int(timeout * 1000), 1)
        self._shard = None if shard is None else check_shard(shard)
        self._unassigned = set(topics) if shard is not None else set()
        self._assign_checked = 0.0
        if not rejoin_after_s > 0:
            raise InvalidArgument(f"rejoin_after_s must be > 0, got {rejoin_after_s!r}")
        self._rejoin_wait = rejoin_after_s
        self._starved_since: float | None = None  # since then a subscribed topic had none
        self._starved: set[str] = set()
        self.rejoins = 0
        try:
            self._consumer = KafkaConsumer(
                *([] if shard is not None else topics),
                bootstrap_servers=bootstrap, group_id=group, client_id=client_id,
                enable_auto_commit=False, auto_offset_reset=auto_offset_reset,
                allow_auto_create_topics=False, session_timeout_ms=session_timeout_ms,
                bootstrap_timeout_ms=self._timeout_ms,
                reconnect_backoff_max_ms=_RECONNECT_BACKOFF_MAX_MS,
                metadata_max_age_ms=_METADATA_MAX_AGE_MS)
        except KafkaError as e:
            raise BusUnavailable(f"kafka at {bootstrap!r} is unreachable: {e}") from e
        self._assign_shard()

    def _assign_shard(self) -> None:
        """Static assignment (``shard``): this shard's partitions of every subscribed topic
        that exists; topics that do not exist yet are looked for again about once a second."""
        if not self._unassigned or time.monotonic() - self._assign_checked < 1.0:
            return
        self._assign_checked = time.monotonic()
        assert self._shard is not None
        index, count = self._shard
        try:
            found = {t: self._consumer.partitions_for_topic(t) for t in self._unassigned}
        except KafkaError as e:
            raise BusUnavailable(f"kafka at {self.bootstrap!r}: metadata failed: {e}") from e
        found = {t: ps for t, ps in found.items() if ps}
        if not found:
            return
        mine = [_KafkaTP(t, p) for t, ps in found.items() for p in sorted(ps)
                if p % count == index]
        self._consumer.assign(sorted(set(self._consumer.assignment()) | set(mine)))
        self._unassigned -= set(found)

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records, in offset order per partition; [] after ``timeout``
        seconds without any."""
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise InvalidArgument(f"max_records must be an int >= 1, got {max_records!r}")
        self._assign_shard()
        started = time.monotonic()
        try:
            batches = self._consumer.poll(timeout_ms=max(int(timeout * 1000), 0),
                                          max_records=max_records)
        except KafkaError as e:
            raise BusUnavailable(f"kafka at {self.bootstrap!r}: poll failed: {e}") from e
        if self._shard is None:
            self._watch_assignment()
        if not batches and not self._consumer.assignment():
            # nothing to fetch from: wait out the timeout here rather than let a caller that
            # polls in a loop spin (kafka-python may return at once while it has no partitions)
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))
        # A tombstone (value None) reads as b"" (the registry's deletions; events never are).
        return [Record(r.topic, r.partition, r.offset, r.key,
                       b"" if r.value is None else r.value, r.timestamp)
                for tp in sorted(batches) for r in batches[tp]]

    @property
    def damaged_records(self) -> int:
        """Always 0: the broker and kafka-python check each batch's CRC themselves, and a
        corrupt one is an error, never skipped here."""
        return 0

    def unassigned_topics(self) -> set[str]:
        """Subscribed topics that exist (their partitions are in this client's metadata) of
        which this consumer holds no partition; with ``shard``, those the next ``poll`` has yet
        to assign itself. A topic that does not exist is not named, as on the local log. Reads
        cached metadata only: no request to the broker."""
        cluster = self._consumer._client.cluster  # kafka-python's metadata cache
        if self._shard is not None:
            return {t for t in self._unassigned if cluster.partitions_for_topic(t)}
        held = {tp.topic for tp in self._consumer.assignment()}
        return {t for t in self.topics if t not in held and cluster.partitions_for_topic(t)}

    def _watch_assignment(self) -> None:
        """Rejoin the group when a subscribed, existing topic has had no partition here for
        ``self._rejoin_wait`` seconds (see the class docstring)."""
        starved = self.unassigned_topics()
        now = time.monotonic()
        if not starved:
            held = {tp.topic for tp in self._consumer.assignment()}
            if self._starved and self._starved <= held:  # not just metadata gone after a rejoin
                log.info("kafka group %r: partitions of %s assigned", self.group,
                         sorted(self._starved))
                self._starved_since, self._starved = None, set()
            return
        if self._starved_since is None:
            self._starved_since = now
        self._starved = starved
        waited = now - self._starved_since
        if waited < self._rejoin_wait:
            return
        log.warning("kafka group %r: no partition of %s assigned for %.1f s although the "
                    "topics exist; rejoining the group (rejoin %d)", self.group,
                    sorted(starved), waited, self.rejoins + 1)
        try:
            self._consumer.unsubscribe()
            self._consumer.subscribe(self.topics)
        except KafkaError as e:
            raise BusUnavailable(f"kafka group {self.group!r}: rejoin failed: {e}") from e
        self.rejoins += 1
        self._starved_since = now
        self._rejoin_wait = min(self._rejoin_wait * 2, _REJOIN_MAX_S)

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Store, per partition, the offset of the next record to read (synchronously)."""
        request = {}
        for tp, offset in offsets.items():
            request[_check_tp(tp)] = OffsetAndMetadata(check_offset("commit", tp, offset), "",
                                                       -1)
        if not request:
            return
        try:
            self._consumer.commit(offsets=request, timeout_ms=self._timeout_ms)
        except CommitFailedError as e:
            raise BusUnavailable(f"kafka group {self.group!r}: commit rejected after a "
                                 f"rebalance (records will be redelivered): {e}") from e
        except KafkaError as e:
            raise BusUnavailable(f"kafka group {self.group!r}: commit failed: {e}") from e

    def committed(self, tp: TopicPartition) -> int | None:
        try:
            return self._consumer.committed(_check_tp(tp), timeout_ms=self._timeout_ms)
        except KafkaError as e:
            raise BusUnavailable(f"kafka group {self.group!r}: reading the committed offset of "
                                 f"{tp} failed: {e}") from e

    def seek(self, tp: TopicPartition, offset: int) -> None:
        ktp = _check_tp(tp)
        check_offset("seek", tp, offset)
        if ktp not in self._consumer.assignment():
            raise InvalidArgument(f"seek: {tp} is not assigned to this consumer "
                                  f"(assigned {sorted(self.assignment())})")
        self._consumer.seek(ktp, offset)

    def position(self, tp: TopicPartition) -> int:
        """The offset the next poll reads from in ``tp`` (an assigned partition)."""
        ktp = _check_tp(tp)
        if ktp not in self._consumer.assignment():
            raise InvalidArgument(f"position: {tp} is not assigned to this consumer")
        try:
            return int(self._consumer.position(ktp, timeout_ms=self._timeout_ms))
        except KafkaError as e:
            raise BusUnavailable(f"kafka: position of {tp} unknown: {e}") from e

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, the offset the next record will get; {} for an unknown
        topic. With ``committed`` this gives a group's lag."""
        try:
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                return {}
            ends = self._consumer.end_offsets([_KafkaTP(topic, p) for p in sorted(partitions)],
                                              timeout_ms=self._timeout_ms)
        except KafkaError as e:
            raise BusUnavailable(f"kafka at {self.bootstrap!r}: end offsets of {topic!r} "
                                 f"unavailable: {e}") from e
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    def close(self) -> None:
        """Leave the group (its partitions move to the other members at once)."""
        try:
            self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
        except KafkaError as e:
            log.warning("closing the kafka consumer of group %r: %s", self.group, e)
