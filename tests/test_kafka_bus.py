"""The Kafka bus and topic creation against a real broker (scripts/kafka.sh), never a mock.

What the Kafka adapters share with the local log (keys and partitions, offsets, commits, seek,
refused records, shards) is pinned for both in test_bus_conformance.py; this file keeps what
only Kafka does: topic creation, a missing broker or topic, settings, a broker restart."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from policyloop.bus.interface import BusUnavailable, Record
from policyloop.bus.kafka import KafkaConsumerAdapter, KafkaProducerAdapter
from policyloop.bus.topics import DEFAULT_TOPICS, TopicSpec, create_topics
from policyloop.contract.errors import InvalidArgument
from tests.conftest import PrivateBroker, free_ports

HOUR_MS = 3600 * 1000
KAFKA_SH = Path(__file__).resolve().parent.parent / "scripts" / "kafka.sh"


def _free_port() -> int:
    return free_ports(1)[0]


def _drain(consumer: KafkaConsumerAdapter, n: int, timeout: float = 30.0) -> list[Record]:
    """Poll until ``n`` records came (the first poll also joins the group)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        records.extend(consumer.poll(max_records=500, timeout=0.5))
    return records


def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducerAdapter(bootstrap, client_id="test")
    try:
        for key, value in items:
            producer.send(topic, value, key)
        producer.flush(10.0)
    finally:
        producer.close()


@pytest.mark.kafka
def test_a_record_the_broker_refuses_fails_its_flush_and_the_producer_goes_on(
        kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
    """Over the topic's max.message.bytes but under the producer's max_request_size: the
    broker refuses it at flush. kafka-python's idempotent producer then fails every later
    record, so the adapter must start a fresh one."""
    topic = unique_topic("small-records")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "4096"})])
    finally:
        admin.close()
    producer = KafkaProducerAdapter(kafka_bootstrap, max_request_size=1 << 20)
    try:
        producer.send(topic, b"x" * 20_000, b"k")
        with pytest.raises(BusUnavailable, match="1 of 1 records failed.*MessageSizeTooLarge"):
            producer.flush(10.0)
        for i in range(2):
            producer.send(topic, b"small %d" % i, b"k")
            producer.flush(10.0)
    finally:
        producer.close()
    consumer = KafkaConsumerAdapter(kafka_bootstrap, "g-" + topic, [topic])
    try:
        assert [r.value for r in _drain(consumer, 2)] == [b"small 0", b"small 1"]
    finally:
        consumer.close()


@pytest.mark.kafka
def test_send_to_a_missing_topic_raises_bus_unavailable(
        kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
    producer = KafkaProducerAdapter(kafka_bootstrap, max_block_ms=500)
    try:
        start = time.monotonic()
        with pytest.raises(BusUnavailable, match="topic missing"):
            producer.send(unique_topic("never-created"), b"x")
        assert time.monotonic() - start < 5.0
        producer.flush(1.0)  # nothing was accepted, so nothing can fail
    finally:
        producer.close()


def test_producer_without_a_broker_raises_bus_unavailable_quickly() -> None:
    producer = KafkaProducerAdapter(f"127.0.0.1:{_free_port()}", max_block_ms=500)
    start = time.monotonic()
    for _ in range(2):  # the failed connection is retried by the next send
        with pytest.raises(BusUnavailable, match="unreachable"):
            producer.send("decisions", b"x", b"k")
    assert time.monotonic() - start < 5.0
    producer.close()
    with pytest.raises(BusUnavailable, match="closed"):
        producer.send("decisions", b"x")


def test_consumer_without_a_broker_raises_bus_unavailable_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(BusUnavailable, match="unreachable"):
        KafkaConsumerAdapter(f"127.0.0.1:{_free_port()}", "g", ["decisions"], timeout=0.5)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"acks": 2}, "acks"),
    ({"linger_ms": -1}, "linger_ms"),
    ({"delivery_timeout_ms": 1000, "request_timeout_ms": 5000}, "delivery_timeout_ms"),
])
def test_producer_rejects_bad_settings(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        KafkaProducerAdapter("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_producer_rejects_non_bytes_before_connecting() -> None:
    producer = KafkaProducerAdapter(f"127.0.0.1:{_free_port()}")
    with pytest.raises(InvalidArgument, match="value must be bytes"):
        producer.send("decisions", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="key must be bytes"):
        producer.send("decisions", b"x", key=7)  # type: ignore[arg-type]


@pytest.mark.kafka
def test_create_topics_is_idempotent_and_compacts_the_latest_state_topics(
        kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
    specs = [dataclasses.replace(s, name=unique_topic(s.name)) for s in DEFAULT_TOPICS]
    names = [s.name for s in specs]
    assert create_topics(kafka_bootstrap, specs, timeout=30) == names
    assert create_topics(kafka_bootstrap, specs, timeout=30) == []

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
        assert described == {s.name: s.partitions for s in specs}
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names],
            config_filter="all")["topic"]
    finally:
        admin.close()
    for spec, default in zip(specs, DEFAULT_TOPICS, strict=True):
        policy = configs[spec.name]["cleanup.policy"]["value"]
        assert policy == ("compact" if default.name in ("models", "learner-stats") else "delete")
        assert configs[spec.name]["retention.ms"]["value"] == str(spec.retention_ms)


@pytest.mark.kafka
def test_create_topics_rejects_an_existing_topic_with_other_partitions(
        kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
    name = unique_topic("decisions")
    assert create_topics(kafka_bootstrap, [TopicSpec(name, 2, HOUR_MS)]) == [name]
    with pytest.raises(InvalidArgument, match="2 partitions, the spec says 4"):
        create_topics(kafka_bootstrap, [TopicSpec(name, 4, HOUR_MS)])
    with pytest.raises(InvalidArgument, match="cleanup.policy=delete"):
        create_topics(kafka_bootstrap, [TopicSpec(name, 2, HOUR_MS, compact=True)])


def test_create_topics_without_a_broker_raises_bus_unavailable() -> None:
    with pytest.raises(BusUnavailable, match="unreachable"):
        create_topics(f"127.0.0.1:{_free_port()}", DEFAULT_TOPICS, timeout=0.5)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "has space", "partitions": 1, "retention_ms": 1}, "topic name"),
    ({"name": "", "partitions": 1, "retention_ms": 1}, "topic name"),
    ({"name": "t", "partitions": 0, "retention_ms": 1}, "partitions"),
    ({"name": "t", "partitions": True, "retention_ms": 1}, "partitions"),
    ({"name": "t", "partitions": 1, "retention_ms": 0}, "retention_ms"),
    ({"name": "t", "partitions": 1, "retention_ms": -2}, "retention_ms"),
])
def test_topic_spec_rejects_bad_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        TopicSpec(**kwargs)  # type: ignore[arg-type]


def test_default_topics_cover_the_bus_and_compact_only_the_latest_state_topics() -> None:
    assert [s.name for s in DEFAULT_TOPICS] == [
        "decisions", "rewards", "activations", "examples", "models", "learner-stats"]
    assert [s.name for s in DEFAULT_TOPICS if s.compact] == ["models", "learner-stats"]
    event_partitions = {s.partitions for s in DEFAULT_TOPICS if not s.compact}
    assert len(event_partitions) == 1  # decisions and rewards are co-partitioned


@pytest.mark.kafka
@pytest.mark.slow
def test_flush_fails_while_the_broker_is_down_and_recovers_after(
        private_broker: PrivateBroker) -> None:
    bootstrap = private_broker.bootstrap
    create_topics(bootstrap, [TopicSpec("fault", partitions=2, retention_ms=HOUR_MS)])
    producer = KafkaProducerAdapter(bootstrap, max_block_ms=500)
    try:
        producer.send("fault", b"before", b"k")
        producer.flush(10.0)
        private_broker.run("stop")
        producer.send("fault", b"during", b"k")  # metadata is known: the buffer takes it
        start = time.monotonic()
        with pytest.raises(BusUnavailable, match="not acknowledged"):
            producer.flush(1.0)
        assert time.monotonic() - start < 3.0
        private_broker.run("start")  # the data folder survives: the topic is still there
        producer.send("fault", b"after", b"k")
        producer.flush(15.0)
    finally:
        producer.close()
    consumer = KafkaConsumerAdapter(bootstrap, "g-fault", ["fault"])
    try:
        values = [r.value for r in _drain(consumer, 3)]
    finally:
        consumer.close()
    # "during" was not confirmed, yet the client may deliver it later: at-least-once.
    assert values[0] == b"before" and values[-1] == b"after"
    assert set(values) <= {b"before", b"during", b"after"}
