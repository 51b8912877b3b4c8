"""One contract, two buses: every case here runs on the embedded local log and on a real Kafka
broker (``policyloop/bus/interface.py`` is the contract; each backend's own behaviour, such as
repairing a torn segment or a Kafka rebalance, is tested in test_local_log.py and
test_kafka_bus.py).

Every case gets fresh topics of ``PARTITIONS`` partitions and opens its clients through the
interface's ``open_producer`` / ``open_consumer``, as serving and the learner do. A local topic
comes into being with its first record, a Kafka one is created up front (``create_topics``),
so cases that need a topic to exist send to it first.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policyloop.bus import interface as bus
from policyloop.bus.interface import BusUnavailable, Consumer, Producer, Record, Shard
from policyloop.bus.topics import TopicSpec, create_topics
from policyloop.contract.errors import InvalidArgument

PARTITIONS = 4
HOUR_MS = 3600 * 1000
# The largest key + value each producer takes, as documented: the local log's segment records,
# and KafkaProducerAdapter's default max_request_size (the broker's limit is about the same).
LOCAL_MAX_RECORD_BYTES = 64 << 20
KAFKA_MAX_RECORD_BYTES = 1 << 20


@dataclass
class Bus:
    """One backend under test; the clients it opened are closed after the case."""

    kind: str
    path: Path
    bootstrap: str = ""
    unique_topic: Callable[[str], str] | None = None
    opened: list[Producer | Consumer] = field(default_factory=list)

    @property
    def max_record_bytes(self) -> int:
        """The largest key + value a producer takes (the backends' limits differ)."""
        return LOCAL_MAX_RECORD_BYTES if self.kind == "local" else KAFKA_MAX_RECORD_BYTES

    def name(self, base: str = "t") -> str:
        """A topic name no other case uses; the topic does not exist yet."""
        if self.unique_topic is None:
            return f"{base}-{uuid.uuid4().hex[:8]}"
        return self.unique_topic(base)

    def create(self, topic: str) -> None:
        """Make ``topic`` exist on Kafka; a local topic appears with its first record."""
        if self.kind == "kafka":
            create_topics(self.bootstrap, [TopicSpec(topic, PARTITIONS, HOUR_MS)])

    def topic(self, base: str = "t") -> str:
        name = self.name(base)
        self.create(name)
        return name

    def producer(self) -> Producer:
        producer = bus.open_producer(self.kind, path=self.path, bootstrap=self.bootstrap,
                                     partitions=PARTITIONS)
        self.opened.append(producer)
        return producer

    def consumer(self, topics: list[str], group: str | None = None, *,
                 shard: Shard | None = None) -> Consumer:
        consumer = bus.open_consumer(self.kind, group or f"g-{uuid.uuid4().hex[:8]}", topics,
                                     path=self.path, bootstrap=self.bootstrap,
                                     partitions=PARTITIONS, shard=shard)
        self.opened.append(consumer)
        return consumer

    def send(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        producer = self.producer()
        for key, value in items:
            producer.send(topic, value, key)
        producer.flush()


@pytest.fixture(params=["local", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    if request.param == "local":
        backend = Bus("local", tmp_path / "bus")
    else:
        backend = Bus("kafka", tmp_path, request.getfixturevalue("kafka_bootstrap"),
                      request.getfixturevalue("unique_topic"))
    yield backend
    for client in reversed(backend.opened):
        client.close()


def local_xfail(reason: str) -> pytest.MarkDecorator:
    """Run a case on both backends, expecting it to fail on the local log (a known drift)."""
    return pytest.mark.parametrize("bus_backend", [
        pytest.param("local", marks=pytest.mark.xfail(strict=True, reason=reason)),
        pytest.param("kafka", marks=pytest.mark.kafka)], indirect=True)


def drain(consumer: Consumer, n: int, timeout: float = 30.0) -> list[Record]:
    """Poll until ``n`` records came (on Kafka the first poll also joins the group)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        records.extend(consumer.poll(max_records=500, timeout=0.2))
    assert len(records) == n, f"read {len(records)} records, expected {n}"
    return records


def by_partition(records: list[Record]) -> dict[int, list[Record]]:
    found: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        found[r.partition].append(r)
    return found


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- where records land, and in what order


def test_records_with_one_key_land_on_one_partition_in_send_order(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    keys = [f"event-{k}".encode() for k in range(16)]
    before = now_ms()
    bus_backend.send(topic, [(k, b"%d" % i) for i in range(5) for k in keys])
    after = now_ms()
    consumer = bus_backend.consumer([topic])
    records = drain(consumer, 80)
    assert consumer.poll(timeout=0.2) == []

    partitions: dict[bytes | None, set[int]] = defaultdict(set)
    for r in records:
        partitions[r.key].add(r.partition)
        assert r.topic == topic and 0 <= r.partition < PARTITIONS
        assert before - 1 <= r.timestamp_ms <= after + 1  # milliseconds since the epoch
    assert set(partitions) == set(keys)
    assert all(len(ps) == 1 for ps in partitions.values())
    assert len(set().union(*partitions.values())) > 1  # the keys do spread over partitions
    for key in keys:  # per key, the values come in the order they were sent
        assert [r.value for r in records if r.key == key] == [b"0", b"1", b"2", b"3", b"4"]
    for mine in by_partition(records).values():  # offsets dense from 0, read in order
        assert [r.offset for r in mine] == list(range(len(mine)))
    counts = Counter(r.partition for r in records)
    assert consumer.end_offsets(topic) == {p: counts[p] for p in range(PARTITIONS)}
    assert consumer.assignment() == {(topic, p) for p in range(PARTITIONS)}
    assert consumer.unassigned_topics() == set()


def test_a_key_maps_to_the_same_partition_number_on_every_topic(bus_backend: Bus) -> None:
    """Co-partitioning: the join reads a decision and its reward from one partition number."""
    decisions, rewards = bus_backend.topic("decisions"), bus_backend.topic("rewards")
    producer = bus_backend.producer()
    for i in range(40):
        key = f"event-{i}".encode()
        producer.send(decisions, b"d", key)
        producer.send(rewards, b"r", key)
    for i in range(8):
        producer.send(rewards, b"no key %d" % i)
    producer.flush()
    records = drain(bus_backend.consumer([decisions, rewards, decisions]), 88)
    keyed = {t: {r.key: r.partition for r in records if r.topic == t and r.key is not None}
             for t in (decisions, rewards)}
    assert len(keyed[decisions]) == len(keyed[rewards]) == 40
    assert keyed[decisions] == keyed[rewards]
    keyless = [r for r in records if r.key is None]  # somewhere, each exactly once
    assert sorted(r.value for r in keyless) == [b"no key %d" % i for i in range(8)]
    assert all(r.topic == rewards and 0 <= r.partition < PARTITIONS for r in keyless)


def test_empty_keys_and_values_and_bytearrays_round_trip_as_bytes(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    producer = bus_backend.producer()
    producer.send(topic, b"", b"")
    producer.send(topic, bytearray(b"value"), bytearray(b"key"))  # type: ignore[arg-type]
    producer.send(topic, b"keyless")
    producer.flush()
    records = drain(bus_backend.consumer([topic]), 3)
    got = sorted(((r.key, r.value) for r in records), key=repr)
    assert got == sorted([(b"", b""), (b"key", b"value"), (None, b"keyless")], key=repr)
    assert all(type(r.value) is bytes and type(r.key) in (bytes, type(None)) for r in records)


def test_end_offsets_of_a_topic_that_does_not_exist_are_empty(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"v")])
    consumer = bus_backend.consumer([topic])
    assert consumer.end_offsets(bus_backend.name("missing")) == {}


# ---- polling


def test_poll_returns_at_most_max_records_and_waits_out_its_timeout(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"%d" % i) for i in range(10)])
    consumer = bus_backend.consumer([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < 10 and time.monotonic() < deadline:
        batch = consumer.poll(max_records=3, timeout=0.2)
        assert len(batch) <= 3
        values += [r.value for r in batch]
    assert values == [b"%d" % i for i in range(10)]  # one key: one partition, in order
    start = time.monotonic()
    assert consumer.poll(timeout=0.4) == []
    assert 0.2 <= time.monotonic() - start < 5.0


@pytest.mark.parametrize("max_records", [0, -1, True, 1.5])
def test_poll_refuses_a_bad_max_records(bus_backend: Bus, max_records: object) -> None:
    consumer = bus_backend.consumer([bus_backend.topic()])
    with pytest.raises(InvalidArgument, match="max_records"):
        consumer.poll(max_records=max_records, timeout=0.1)  # type: ignore[arg-type]


def test_a_topic_created_after_the_consumer_started_is_read_from_its_start(
        bus_backend: Bus) -> None:
    topic = bus_backend.name()
    consumer = bus_backend.consumer([topic])
    assert consumer.poll(timeout=0.2) == []
    assert consumer.assignment() == set()
    assert consumer.unassigned_topics() == set()  # it does not exist: nothing to hold
    bus_backend.create(topic)
    bus_backend.send(topic, [(f"k{i}".encode(), b"%d" % i) for i in range(20)])
    records = drain(consumer, 20)
    assert sorted(int(r.value) for r in records) == list(range(20))
    assert consumer.assignment() == {(topic, p) for p in range(PARTITIONS)}


# ---- committed offsets


def test_a_group_resumes_from_its_committed_offsets_and_another_starts_at_the_earliest(
        bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    items = [(f"user-{i % 25}".encode(), f"v{i}".encode()) for i in range(200)]
    bus_backend.send(topic, items)
    group = f"g-{uuid.uuid4().hex[:8]}"

    first = bus_backend.consumer([topic], group)
    assert all(first.committed((topic, p)) is None for p in range(PARTITIONS))
    records = drain(first, 200)
    assert sorted(r.value for r in records) == sorted(v for _, v in items)
    half = {(topic, p): len(mine) // 2 for p, mine in by_partition(records).items()}
    first.commit(half)
    first.commit({})
    assert {tp: first.committed(tp) for tp in half} == half
    first.close()

    second = bus_backend.consumer([topic], group)
    assert {tp: second.committed(tp) for tp in half} == half
    resumed = drain(second, 200 - sum(half.values()))
    assert all(r.offset >= half[(topic, r.partition)] for r in resumed)
    assert {(r.partition, r.offset) for r in resumed}.isdisjoint(
        {(r.partition, r.offset) for r in records if r.offset < half[(topic, r.partition)]})
    assert second.poll(timeout=0.2) == []

    other = bus_backend.consumer([topic])
    assert other.committed((topic, 0)) is None
    assert len(drain(other, 200)) == 200


def test_commits_of_some_partitions_leave_the_others_committed(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(f"k{i}".encode(), b"v") for i in range(40)])
    consumer = bus_backend.consumer([topic])
    drain(consumer, 40)
    consumer.commit({(topic, 0): 1, (topic, 1): 2})
    consumer.commit({(topic, 1): 3})
    assert [consumer.committed((topic, p)) for p in range(3)] == [1, 3, None]


BAD_COMMITS = {
    "negative offset": lambda t: {(t, 0): -1},
    "bool offset": lambda t: {(t, 0): True},
    "float offset": lambda t: {(t, 0): 1.5},
    "string offset": lambda t: {(t, 0): "3"},
    "negative partition": lambda t: {(t, -1): 0},
    "string partition": lambda t: {(t, "0"): 0},
    "topic not a string": lambda t: {(5, 0): 0},
}


@pytest.mark.parametrize("offsets", BAD_COMMITS.values(), ids=BAD_COMMITS.keys())
def test_commit_refuses_malformed_offsets_and_stores_nothing(
        bus_backend: Bus, offsets: Callable[[str], dict]) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"v")])
    consumer = bus_backend.consumer([topic])
    drain(consumer, 1)
    with pytest.raises(InvalidArgument):
        consumer.commit(offsets(topic))
    assert consumer.committed((topic, 0)) is None


DRIFTING_COMMITS = {
    # Both backends check keys with interface.check_topic_partition. The local log once took a
    # partition of True (its group file then held "t:True" and every later committed() raised
    # BusUnavailable) and unpacked keys itself (ValueError, not InvalidArgument).
    "bool partition": lambda t: {(t, True): 0},
    "key not a pair": lambda t: {t: 0},
    "key of three": lambda t: {(t, 0, 1): 0},
}


@pytest.mark.parametrize("offsets", DRIFTING_COMMITS.values(), ids=DRIFTING_COMMITS.keys())
def test_commit_refuses_malformed_partitions_and_stores_nothing(
        bus_backend: Bus, offsets: Callable[[str], dict]) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"v")])
    consumer = bus_backend.consumer([topic])
    drain(consumer, 1)
    with pytest.raises(InvalidArgument):
        consumer.commit(offsets(topic))
    assert consumer.committed((topic, 0)) is None


@pytest.mark.parametrize("tp", ["t", ("t", -1), ("t", True), (5, 0)], ids=repr)
def test_committed_refuses_a_malformed_topic_partition(bus_backend: Bus, tp: object) -> None:
    consumer = bus_backend.consumer([bus_backend.topic()])
    with pytest.raises(InvalidArgument):
        consumer.committed(tp)  # type: ignore[arg-type]


# ---- seek


def test_seek_rereads_from_the_given_offset_and_seeking_to_the_end_skips_history(
        bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"%d" % i) for i in range(10)])
    consumer = bus_backend.consumer([topic])
    records = drain(consumer, 10)
    (partition,) = {r.partition for r in records}
    tp = (topic, partition)
    assert [r.offset for r in records] == list(range(10))
    assert consumer.position(tp) == 10  # type: ignore[attr-defined]  # not in the Protocol
    consumer.seek(tp, 7)
    assert consumer.position(tp) == 7  # type: ignore[attr-defined]
    assert [r.value for r in drain(consumer, 3)] == [b"7", b"8", b"9"]

    consumer.seek(tp, 0)
    consumer.seek(tp, consumer.end_offsets(topic)[partition])
    assert consumer.poll(timeout=0.2) == []
    bus_backend.send(topic, [(b"k", b"new")])
    assert [(r.offset, r.value) for r in drain(consumer, 1)] == [(10, b"new")]


def test_seek_refuses_unassigned_partitions_and_bad_offsets(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(b"k", b"v")])
    consumer = bus_backend.consumer([topic])
    (record,) = drain(consumer, 1)
    for tp in [(topic, PARTITIONS), (bus_backend.name("other"), 0)]:
        with pytest.raises(InvalidArgument, match="not assigned"):
            consumer.seek(tp, 0)
    for offset in (-1, True, 0.5):
        with pytest.raises(InvalidArgument, match="offset"):
            consumer.seek((topic, record.partition), offset)  # type: ignore[arg-type]


# ---- refused records and closing


REFUSED = {
    "value str": ("text", None),
    "value None": (None, None),
    "value memoryview": (memoryview(b"x"), None),
    "key int": (b"x", 7),
    "key str": (b"x", "k"),
}


@pytest.mark.parametrize(("value", "key"), REFUSED.values(), ids=REFUSED.keys())
def test_records_of_the_wrong_types_are_refused_and_the_producer_goes_on(
        bus_backend: Bus, value: object, key: object) -> None:
    topic = bus_backend.topic()
    producer = bus_backend.producer()
    with pytest.raises(InvalidArgument, match="must be bytes"):
        producer.send(topic, value, key)  # type: ignore[arg-type]
    producer.send(topic, b"good", b"k")
    producer.flush()
    assert [r.value for r in drain(bus_backend.consumer([topic]), 1)] == [b"good"]


def test_an_oversized_record_is_refused_and_the_producer_goes_on(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    producer = bus_backend.producer()
    with pytest.raises(InvalidArgument, match="too large|more than"):
        producer.send(topic, b"x" * (bus_backend.max_record_bytes + 1), b"k")
    producer.send(topic, b"good", b"k")
    producer.flush()
    consumer = bus_backend.consumer([topic])
    assert [r.value for r in drain(consumer, 1)] == [b"good"]
    assert consumer.poll(timeout=0.2) == []


@pytest.mark.parametrize("name", ["", "a/b", "../escape", "..", "has space"])
def test_topic_names_no_backend_allows_are_refused(bus_backend: Bus, name: str) -> None:
    with pytest.raises(InvalidArgument, match="topic"):
        bus_backend.producer().send(name, b"x")


@pytest.mark.parametrize(("topics", "group", "field"), [
    ("decisions", None, "topics"), ([], None, "topics"), (["decisions"], "", "group")])
def test_consumers_refuse_bad_topics_and_groups(bus_backend: Bus, topics: object,
                                                group: str | None, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        bus.open_consumer(bus_backend.kind, "g" if group is None else group,
                          topics,  # type: ignore[arg-type]
                          path=bus_backend.path, bootstrap=bus_backend.bootstrap)


def test_close_delivers_what_was_sent_and_is_idempotent(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    producer = bus_backend.producer()
    producer.send(topic, b"unflushed", b"k")
    producer.close()
    producer.close()
    with pytest.raises(BusUnavailable, match="closed"):
        producer.send(topic, b"late", b"k")
    producer.flush()  # nothing accepted since: nothing to fail
    consumer = bus_backend.consumer([topic])
    assert [r.value for r in drain(consumer, 1)] == [b"unflushed"]
    consumer.close()
    consumer.close()


# ---- shards


def test_shards_split_the_partitions_by_index_modulo_count(bus_backend: Bus) -> None:
    topic = bus_backend.topic()
    bus_backend.send(topic, [(f"k{i}".encode(), b"%d" % i) for i in range(60)])
    counts = Counter(r.partition for r in drain(bus_backend.consumer([topic]), 60))
    assert set(counts) == set(range(PARTITIONS))
    group = f"g-{uuid.uuid4().hex[:8]}"
    seen: list[Record] = []
    for index in range(3):
        shard = bus_backend.consumer([topic], group, shard=(index, 3))
        mine = {p for p in range(PARTITIONS) if p % 3 == index}
        records = drain(shard, sum(counts[p] for p in mine))
        assert shard.poll(timeout=0.2) == []
        assert {r.partition for r in records} == mine
        assert shard.assignment() == {(topic, p) for p in mine}
        assert shard.unassigned_topics() == set()
        shard.commit({(topic, p): counts[p] for p in mine})  # to the group, as any member
        seen += records
    assert sorted(int(r.value) for r in seen) == list(range(60))
    resumed = bus_backend.consumer([topic], group, shard=(0, 3))
    assert resumed.committed((topic, 0)) == counts[0]
    assert resumed.poll(timeout=0.3) == []


def test_a_shard_of_a_topic_that_does_not_exist_yet_holds_nothing_then_its_partitions(
        bus_backend: Bus) -> None:
    topic = bus_backend.name()
    shard = bus_backend.consumer([topic], shard=(1, 2))
    assert shard.poll(timeout=0.2) == []
    assert shard.assignment() == set()
    assert shard.unassigned_topics() == set()  # it does not exist: nothing to hold
    bus_backend.create(topic)
    bus_backend.send(topic, [(f"k{i}".encode(), b"%d" % i) for i in range(40)])
    everything = drain(bus_backend.consumer([topic]), 40)
    records = drain(shard, sum(r.partition % 2 == 1 for r in everything))
    assert {r.partition for r in records} == {1, 3}
    assert shard.assignment() == {(topic, 1), (topic, 3)}


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), "0/2", (True, 2), (0, 1.0),
                                   (0, 1, 2)], ids=repr)
def test_bad_shards_are_refused(bus_backend: Bus, shard: object) -> None:
    with pytest.raises(InvalidArgument, match="shard"):
        bus_backend.consumer(["decisions"], shard=shard)  # type: ignore[arg-type]


def test_an_unknown_bus_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bus must be 'local' or 'kafka', got 'redis'"):
        bus.open_producer("redis", path=tmp_path)
    with pytest.raises(InvalidArgument, match="bus must be 'local' or 'kafka', got 'redis'"):
        bus.open_consumer("redis", "g", ["t"], path=tmp_path)
