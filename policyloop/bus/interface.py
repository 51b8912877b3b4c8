"""The event bus seen by serving and the learner: topics of keyed byte records.

Two implementations share this contract: the embedded local durable log
(``policyloop/bus/local_log.py``, the default, no broker needed) and Apache Kafka
(``policyloop/bus/kafka.py``). Callers never see either library's types.

Delivery contract: ``send`` either accepts the record into the producer's buffer or raises
``BusUnavailable``; ``flush`` returns only when every accepted record is durably stored, and
raises ``BusUnavailable`` otherwise (the caller keeps what it could not deliver). Consumers
read at-least-once and commit the offset of the next record to read, per partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from policyloop.contract.errors import InvalidArgument, PolicyloopError

DECISIONS = "decisions"
REWARDS = "rewards"
ACTIVATIONS = "activations"
EXAMPLES = "examples"
MODELS = "models"
LEARNER_STATS = "learner-stats"  # each learner shard's sufficient statistics (online/shards.py)


class BusUnavailable(PolicyloopError):
    """The bus cannot take or confirm records now; retry later, never drop silently."""


class RecordsRejected(InvalidArgument):
    """``flush`` delivered every record but these, which the producer refused as malformed
    (a producer that only checks records at flush, such as serving's log writer process).
    ``reasons``: one message per refused record, each naming its topic."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(f"{len(reasons)} records refused; first: {reasons[0]}")
        self.reasons = reasons


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


TopicPartition = tuple[str, int]
# (index, count): a consumer that reads only partitions p with p % count == index, assigned
# statically instead of by the group (the learner's scale-out, online/shards.py)
Shard = tuple[int, int]


def check_shard(shard: object) -> Shard:
    """``shard`` when it is (index, count) with 0 <= index < count."""
    if (not isinstance(shard, tuple) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise InvalidArgument(f"shard must be (index, count) with 0 <= index < count, "
                              f"got {shard!r}")
    return shard


def check_topic_partition(tp: object) -> TopicPartition:
    """``tp`` when it is (topic: str, partition: int >= 0); every consumer checks the keys of
    ``commit`` and the argument of ``committed`` and ``seek`` with this one rule."""
    if (not isinstance(tp, tuple) or len(tp) != 2 or not isinstance(tp[0], str)
            or isinstance(tp[1], bool) or not isinstance(tp[1], int) or tp[1] < 0):
        raise InvalidArgument(f"topic partition must be (topic: str, partition >= 0), got {tp!r}")
    return tp[0], tp[1]


def check_offset(what: str, tp: TopicPartition, offset: object) -> int:
    """``offset`` when it is an int >= 0 (``what``: the call, for the message)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidArgument(f"{what} offset for {tp} must be an int >= 0, got {offset!r}")
    return offset


def check_record(value: object, key: object) -> None:
    """The types every producer accepts: value bytes, key bytes or None."""
    if not isinstance(value, bytes | bytearray):
        raise InvalidArgument(f"value must be bytes, got {type(value).__name__}")
    if key is not None and not isinstance(key, bytes | bytearray):
        raise InvalidArgument(f"key must be bytes or None, got {type(key).__name__}")


class Producer(Protocol):
    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Accept one record for delivery; raises BusUnavailable when it cannot."""

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every accepted record is durable; raises BusUnavailable on failure."""

    def close(self) -> None: ...


class Consumer(Protocol):
    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Next records of the subscribed topics, in offset order per partition."""

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Store, per partition, the offset of the next record to read."""

    def committed(self, tp: TopicPartition) -> int | None: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def unassigned_topics(self) -> set[str]:
        """Subscribed topics that exist but of which this consumer holds no partition (a
        group member left out of a rebalance); such a consumer is not caught up."""

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record will get (for lag and 'caught up')."""

    @property
    def damaged_records(self) -> int:
        """Records passed over because they are damaged where the bus stores them (the bus
        logs each); counted so that silent loss shows in a metric."""

    def close(self) -> None: ...


def open_producer(kind: str, *, path: str | Path, bootstrap: str = "", partitions: int = 4,
                  client_id: str = "policyloop") -> Producer:
    """The producer for a configured bus: ``local`` (folder ``path``) or ``kafka``."""
    if kind == "local":
        from policyloop.bus.local_log import LocalLog

        return LocalLog(Path(path), partitions=partitions).producer()
    if kind == "kafka":
        from policyloop.bus.kafka import KafkaProducerAdapter

        return KafkaProducerAdapter(bootstrap, client_id=client_id)
    raise InvalidArgument(f"bus must be 'local' or 'kafka', got {kind!r}")


def open_consumer(kind: str, group: str, topics: list[str], *, path: str | Path,
                  bootstrap: str = "", partitions: int = 4, from_latest: bool = False,
                  shard: Shard | None = None) -> Consumer:
    """A consumer-group member of the configured bus. ``from_latest``: on Kafka, a group
    without committed offsets starts at the end of each partition, not the beginning.
    ``shard``: read only that shard's partitions (static assignment; offsets are still
    committed to ``group``)."""
    if kind == "local":
        from policyloop.bus.local_log import LocalLog

        return LocalLog(Path(path), partitions=partitions).consumer(group, topics, shard=shard)
    if kind == "kafka":
        from policyloop.bus.kafka import KafkaConsumerAdapter

        return KafkaConsumerAdapter(bootstrap, group, topics,
                                    auto_offset_reset="latest" if from_latest else "earliest",
                                    shard=shard)
    raise InvalidArgument(f"bus must be 'local' or 'kafka', got {kind!r}")
