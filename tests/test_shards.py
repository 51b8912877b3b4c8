"""Learner scale-out: shards over the partitions, merged by sufficient statistics, equal one
learner (on the local bus in-process, and as processes on the real broker)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from online.config import LearnConfig
from online.learner import Learner
from online.linear import LinearHeads
from online.shards import ShardStats, StatsReader, StatsWriter, parse_shard
from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.contract.errors import InvalidArgument
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_head import read_head
from tests.bandit_stream import (
    kafka_start_ms,
    register_untrained_routing,
    routing_events,
    start_groups_at_end,
    write,
)

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 3000


def _stream(seed: int, policy: str = "routing",
            start_ms: int = 1_000_000) -> list[tuple[str, bytes, bytes]]:
    """EVENTS events 10 ms apart, then 40 ten seconds after the last: the stream goes on, so
    every shard's reward windows close on all of the first EVENTS (at a stream's very end a
    shard would close fewer windows than one learner, whose clock is the furthest of all
    partitions)."""
    tail = start_ms + 10 * EVENTS + 10_000
    return (routing_events(EVENTS, seed=seed, policy=policy, start_ms=start_ms)
            + routing_events(40, seed=seed + 100, policy=policy, start_ms=tail))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with an untrained routing QNetwork; a 4-partition local bus with events."""
    root = tmp_path_factory.mktemp("shards")
    register_untrained_routing(LocalRegistry(root / "registry"))
    producer = LocalLog(root / "bus", partitions=4).producer()
    write(producer, _stream(3))
    producer.close()
    return root


def _head(registry: Path, policy: str = "routing") -> np.ndarray:
    version = LocalRegistry(registry).current(policy)
    weight, bias = read_head(version.read_model(), version.manifest.head)
    return np.hstack([weight, bias[:, None]])


def _run(root: Path, shard: tuple[int, int], **changes: object) -> Learner:
    settings: dict = {"registry": root / "registry", "policy": "routing",
                      "bus_path": root / "bus", "partitions": 4,
                      "checkpoint": root / f"ckpt-{shard[0]}.json", "window_ms": 1000,
                      "publish_every": 400, "idle_exit_s": 0.5, "gate": False,
                      "shard_index": shard[0], "shard_count": shard[1]}
    learner = Learner(LearnConfig(**{**settings, **changes}))
    learner.run()
    learner.finish()
    learner.close()
    return learner


def test_two_shards_on_the_local_bus_publish_the_model_of_one_learner(
        base: Path, tmp_path: Path) -> None:
    single = shutil.copytree(base, tmp_path / "single")
    one = _run(single, (0, 1))
    sharded = shutil.copytree(base, tmp_path / "sharded")
    second = _run(sharded, (1, 2))  # writes its statistics; publishes no model
    assert LocalRegistry(sharded / "registry").versions("routing") == [1]
    first = _run(sharded, (0, 2))
    assert 0 < first.examples < one.examples and 0 < second.examples < one.examples
    assert first.examples + second.examples == one.examples
    assert first.merged == {1: second.examples}
    manifest = LocalRegistry(sharded / "registry").current("routing").manifest
    assert manifest.training["examples"] == one.examples
    np.testing.assert_allclose(_head(sharded / "registry"), _head(single / "registry"),
                               rtol=1e-7, atol=1e-9)
    # and the one-learner head is not simply the offline head (the check has teeth)
    assert not np.allclose(_head(single / "registry"), _head(base / "registry"), atol=1e-3)


def test_shard_0_publishes_again_when_another_shard_reports_later(base: Path,
                                                                  tmp_path: Path) -> None:
    root = shutil.copytree(base, tmp_path / "late")
    _run(root, (0, 2))  # nothing from shard 1 yet: a model of half the data
    alone = _head(root / "registry")
    _run(root, (1, 2))
    restarted = _run(root, (0, 2))  # nothing new to read, but shard 1 reported since
    assert set(restarted.merged) == {1} and restarted.merged[1] > 0
    assert not np.allclose(_head(root / "registry"), alone)


def test_a_shard_whose_version_left_the_registry_restarts_on_the_current_one(
        base: Path, tmp_path: Path) -> None:
    root = shutil.copytree(base, tmp_path / "retention")
    _run(root, (1, 2), max_examples=500)  # checkpoints on v1 (shards 1..N-1 never promote)
    registry = LocalRegistry(root / "registry")  # shard 0 promotes on: retention drops v1
    first = registry.current("routing")
    model = first.read_model()
    for _ in range(11):
        registry.publish("routing", model, first.manifest)
    assert 1 not in registry.versions("routing")
    restarted = _run(root, (1, 2))
    assert restarted.model.version == 12 and restarted.examples > 500


def test_each_shard_reads_only_its_partitions(base: Path) -> None:
    consumer = LocalLog(base / "bus", partitions=4).consumer(
        f"g-{uuid.uuid4().hex}", [bus.DECISIONS, bus.REWARDS], shard=(1, 2))
    records = consumer.poll(max_records=10_000, timeout=0.5)
    consumer.close()
    assert records and {r.partition for r in records} == {1, 3}
    assert consumer.assignment() == {(t, p) for t in (bus.DECISIONS, bus.REWARDS)
                                     for p in (1, 3)}


def test_a_checkpoint_of_another_sharding_is_refused(base: Path, tmp_path: Path) -> None:
    root = shutil.copytree(base, tmp_path / "reshard")
    _run(root, (0, 2), max_examples=200)
    with pytest.raises(InvalidArgument, match="belongs to shard 0/2, not 0/3"):
        Learner(LearnConfig(registry=root / "registry", policy="routing",
                            bus_path=root / "bus", partitions=4,
                            checkpoint=root / "ckpt-0.json", shard_index=0, shard_count=3))


@pytest.mark.parametrize("text", ["", "1", "2/2", "-1/2", "a/b", "1/0", "0/1/2"])
def test_bad_shard_specs_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="shard"):
        parse_shard(text)


def test_more_shards_than_partitions_is_refused(base: Path) -> None:
    with pytest.raises(InvalidArgument, match="owns none of the 4 partitions"):
        Learner(LearnConfig(registry=base / "registry", policy="routing",
                            bus_path=base / "bus", partitions=4, shard_index=4,
                            shard_count=5))


def test_the_stats_reader_keeps_each_shards_newest_snapshot_and_skips_bad_records(
        tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "bus", partitions=1)
    heads = LinearHeads.from_head(np.zeros((1, 3)), np.zeros(1))
    writer = StatsWriter(log.producer())
    for shard, examples in [((1, 3), 10), ((2, 3), 5), ((1, 3), 30), ((1, 3), 20),
                            ((1, 2), 99)]:  # the last one: another sharding
        writer.write("routing", "g", ShardStats(*shard, examples, heads))
    writer.write("routing", "another-group", ShardStats(2, 3, 500, heads))
    producer = log.producer()
    producer.send(bus.LEARNER_STATS, b"garbage", b"routing/g/2/3")
    producer.flush()
    writer.write("other", "g", ShardStats(1, 3, 7, heads))
    reader = StatsReader("local", "routing", "g", (0, 3), path=tmp_path / "bus", partitions=1)
    reader.refresh(timeout=2)
    assert {i: s.examples for i, s in reader.latest.items()} == {1: 30, 2: 5}
    writer.write("routing", "g", ShardStats(2, 3, 6, heads))
    reader.refresh(timeout=2)
    assert reader.latest[2].examples == 6
    reader.close()
    writer.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_two_learner_processes_on_kafka_equal_one_learner(base: Path, tmp_path: Path,
                                                          kafka_bootstrap: str) -> None:
    """Four partitions on the real broker; one learner alone, and two shards as concurrent
    processes in one group. After shard 0 has merged shard 1's final statistics, both
    registries serve the same head."""
    from policyloop.bus.kafka import KafkaProducerAdapter
    from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

    create_topics(kafka_bootstrap, DEFAULT_TOPICS)
    policy = f"routing-{uuid.uuid4().hex[:8]}"
    start_ms = kafka_start_ms(kafka_bootstrap)
    start_groups_at_end(kafka_bootstrap, [f"one-{policy}", f"two-{policy}"])
    producer = KafkaProducerAdapter(kafka_bootstrap)
    write(producer, _stream(5, policy, start_ms=start_ms))
    producer.close()

    def prepare(name: str) -> Path:
        root = shutil.copytree(base, tmp_path / name)
        registry = LocalRegistry(root / "registry")
        first = registry.current("routing")
        registry.publish(policy, first.read_model(), replace(first.manifest, policy=policy))
        return root

    def command(root: Path, shard: str, group: str) -> list[str]:
        return [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", "learn",
                "--registry", str(root / "registry"), "--policy", policy, "--bus", "kafka",
                "--kafka", kafka_bootstrap, "--group", group, "--shard", shard,
                "--checkpoint", str(root / f"ckpt-{shard.replace('/', '-')}.json"),
                "--window-ms", "1000", "--publish-every", "300", "--publish-interval", "1",
                "--idle-exit", "3", "--no-gate"]

    single = prepare("single")
    done = subprocess.run(command(single, "0/1", f"one-{policy}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout.strip().splitlines()[-1])

    sharded = prepare("sharded")
    group = f"two-{policy}"
    procs = [subprocess.Popen(command(sharded, f"{i}/2", group), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert reports[0]["examples"] + reports[1]["examples"] == expected["examples"] > 2000
    assert min(r["examples"] for r in reports) > 0.3 * expected["examples"]
    # shard 0 may have stopped before shard 1's last snapshot: run it again to merge it
    again = subprocess.run(command(sharded, "0/2", group), cwd=ROOT, capture_output=True,
                           text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    current = LocalRegistry(sharded / "registry").current(policy)
    assert current.manifest.training["examples"] == expected["examples"]
    np.testing.assert_allclose(_head(sharded / "registry", policy),
                               _head(single / "registry", policy), rtol=1e-7, atol=1e-9)
