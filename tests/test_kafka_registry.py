"""The Kafka-backed registry: no shared volume, and every serving replica converges.

What it shares with the registry folder (numbering, current, refusals, retention) is pinned for
both in test_registry_conformance.py; this file keeps what only the topic does."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from policyloop.bus.kafka import KafkaProducerAdapter
from policyloop.bus.topics import TopicSpec, create_topics
from policyloop.registry.kafka import KafkaRegistry
from protos import decision_pb2_grpc as pb_grpc
from tests.onnx_models import qnet_model, scoring_model
from tests.server_harness import ServerThread, channel, serve_config
from tests.test_server import recsys_request

pytestmark = pytest.mark.kafka


def kafka_io_threads() -> set[threading.Thread]:
    """kafka-python's network threads alive now (one per open client)."""
    return {t for t in threading.enumerate() if t.name.startswith("kafka-io")}


@pytest.fixture()
def topic(kafka_bootstrap: str) -> str:
    name = f"models-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [TopicSpec(name, 1, -1, compact=True)])
    return name


def test_a_bad_record_on_the_topic_is_skipped_and_later_versions_still_arrive(
        kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    writer = KafkaRegistry(kafka_bootstrap, tmp_path / "writer", topic=topic)
    writer.publish("recsys", *scoring_model(seed=1))
    producer = KafkaProducerAdapter(kafka_bootstrap)
    model, manifest = scoring_model(seed=2)
    tampered = dataclasses.replace(manifest, version=2, sha256="0" * 64).to_json()
    for value in (b"not json", json.dumps({"manifest": tampered, "files": {},
                                           "model": base64.b64encode(model).decode()}).encode()):
        producer.send(topic, value, b"recsys/00000002")
    producer.send(topic, b"not a number", b"recsys/CURRENT")
    producer.send(topic, b"1", b"\xff\xfe")  # a key that is not UTF-8
    producer.flush()
    producer.close()
    good = writer.publish("recsys", *scoring_model(seed=3))
    # the next version reuses the bad records' key, so compaction drops them eventually
    assert good.version == 2
    reader = KafkaRegistry(kafka_bootstrap, tmp_path / "reader", topic=topic)
    assert reader.versions("recsys") == [1, 2]
    assert reader.current("recsys").read_model() == good.read_model() == scoring_model(seed=3)[0]
    writer.close()
    reader.close()


def test_train_publishes_a_first_version_to_the_kafka_registry(kafka_bootstrap: str,
                                                               tmp_path: Path) -> None:
    from policyloop.bus.topics import DEFAULT_TOPICS, create_topics
    from policyloop.cli import main

    create_topics(kafka_bootstrap, DEFAULT_TOPICS)  # the default "models" topic
    policy = f"routing-{uuid.uuid4().hex[:8]}"
    assert main(["--log-level", "WARNING", "train", "--scenario", "routing", "--policy", policy,
                 "--n-logged", "300", "--epochs", "1", "--registry", str(tmp_path / "cache"),
                 "--registry-kafka", kafka_bootstrap]) == 0
    reader = KafkaRegistry(kafka_bootstrap, tmp_path / "reader")
    try:
        current = reader.current(policy)
        assert current.version == 1 and current.read_file("head.npz")
        assert current.manifest.training["parity_max_abs_diff"] < 1e-5
    finally:
        reader.close()


def test_every_serving_replica_converges_to_the_published_version(
        kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    publisher = KafkaRegistry(kafka_bootstrap, tmp_path / "publisher", topic=topic)
    publisher.publish("recsys", *scoring_model(seed=1))
    publisher.publish("routing", *qnet_model())
    before = kafka_io_threads()
    replicas = [ServerThread(serve_config(tmp_path / f"r{i}", registry=tmp_path / f"cache{i}",
                                          registry_kafka=kafka_bootstrap,
                                          registry_topic=topic))
                for i in range(2)]
    try:
        new = publisher.publish("recsys", *scoring_model(seed=5)).version
        for replica in replicas:
            with channel(replica.target) as ch:
                stub = pb_grpc.DecisionServiceStub(ch)
                deadline = time.monotonic() + 20
                while stub.Decide(recsys_request(), timeout=5).model_version != new:
                    assert time.monotonic() < deadline, "a replica never converged"
                    time.sleep(0.05)
    finally:
        for replica in replicas:
            replica.stop()
        publisher.close()
    # a stopped server closes its registry's Kafka clients
    deadline = time.monotonic() + 10
    while (left := kafka_io_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"Kafka client threads left running: {sorted(t.name for t in left)}"


def test_the_learner_publishes_through_the_kafka_registry(kafka_bootstrap: str, topic: str,
                                                          tmp_path: Path) -> None:
    import numpy as np
    import torch

    from models.export import export_and_register
    from models.policies import QNetwork
    from online.config import LearnConfig
    from online.learner import Learner
    from policyloop.bus.local_log import LocalLog
    from policyloop.simulators.routing import RoutingEnv
    from tests.bandit_stream import routing_events, write

    torch.manual_seed(0)
    env = RoutingEnv()
    publisher = KafkaRegistry(kafka_bootstrap, tmp_path / "publisher", topic=topic)
    export_and_register(QNetwork(len(env.feature_schema.context), 8), env, publisher,
                        policy="routing", training={})
    producer = LocalLog(tmp_path / "bus", partitions=2).producer()
    write(producer, routing_events(1200, seed=3))
    producer.close()
    learner = Learner(LearnConfig(
        registry=tmp_path / "learner-cache", policy="routing", registry_kafka=kafka_bootstrap,
        registry_topic=topic, bus_path=tmp_path / "bus", partitions=2,
        checkpoint=tmp_path / "ckpt.json", window_ms=1000, publish_every=400, idle_exit_s=1.0,
        gate=False))
    reader = KafkaRegistry(kafka_bootstrap, tmp_path / "reader", topic=topic)
    try:
        learner.run()
        learner.publish()
        current = reader.current("routing")
        assert current.version == learner.published[-1]["version"] > 1
        assert current.manifest.training["online"] is True
        assert np.isfinite(current.manifest.evaluation.get("holdout_events", 0))
    finally:
        learner.close()
        reader.close()
        publisher.close()


def test_retention_tombstones_old_versions_and_replicas_drop_them(
        kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    """keep_last 3: six publishes leave tombstones for versions 1-3 on the topic (compaction
    removes those keys); a replica that was following deletes them from its cache, and a new
    replica ends with 4-6 only. A version made current again stays whatever its age."""
    from kafka import KafkaConsumer, TopicPartition

    writer = KafkaRegistry(kafka_bootstrap, tmp_path / "writer", topic=topic, keep_last=3)
    follower = KafkaRegistry(kafka_bootstrap, tmp_path / "follower", topic=topic, keep_last=3)
    writer.publish("recsys", *scoring_model(seed=1))
    assert follower.versions("recsys") == [1]
    for seed in range(2, 7):
        writer.publish("recsys", *scoring_model(seed=seed))
    assert writer.versions("recsys") == [4, 5, 6]
    assert follower.versions("recsys") == [4, 5, 6]
    fresh = KafkaRegistry(kafka_bootstrap, tmp_path / "fresh", topic=topic, keep_last=3)
    assert fresh.versions("recsys") == [4, 5, 6] and fresh.current("recsys").version == 6

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    end = consumer.end_offsets([partition])[partition]
    records: list[Any] = []  # kafka-python's ConsumerRecord, untyped
    while len(records) < end:
        for batch in consumer.poll(timeout_ms=1000).values():
            records.extend(batch)
    consumer.close()
    tombstones = sorted(r.key for r in records if r.value is None)
    assert tombstones == [f"recsys/{v:08d}".encode() for v in (1, 2, 3)]

    writer.set_current("recsys", 4)  # roll back: v4 is current now
    writer.publish("recsys", *scoring_model(seed=7), make_current=False)
    assert writer.versions("recsys") == [4, 5, 6, 7]  # v4 kept as the current one
    assert fresh.versions("recsys") == [4, 5, 6, 7] and fresh.current("recsys").version == 4
    for registry in (writer, follower, fresh):
        registry.close()
