"""Kafka consumers that join a group before their topics' metadata is known, or that the group
leaves without partitions: they recover, say so, and never spin or wait for ever.

Each test runs on a broker of its own (the ``private_broker`` fixture: no topics), so that
topics can be missing and partition counts chosen freely, without touching the session's.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import online.learner as learner_module
from online.config import LearnConfig
from online.learner import Learner
from online.metrics import serve_metrics
from policyloop.bus import interface as bus
from policyloop.bus.kafka import KafkaConsumerAdapter, KafkaProducerAdapter
from policyloop.bus.local_log import LocalLog
from policyloop.bus.topics import DEFAULT_TOPICS, TopicSpec, create_topics
from policyloop.contract.errors import Unavailable
from policyloop.registry.local import LocalRegistry
from tests.bandit_stream import register_untrained_routing, routing_events, write
from tests.conftest import PrivateBroker

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 400
HOUR_MS = 3600 * 1000


@pytest.fixture(scope="module")
def registry_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("assign")
    register_untrained_routing(LocalRegistry(root / "registry"))
    return root


def _learn(root: Path, bootstrap: str, group: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", "learn",
         "--registry", str(root / "registry"), "--policy", "routing", "--bus", "kafka",
         "--kafka", bootstrap, "--group", group, "--checkpoint", str(root / "ckpt.json"),
         "--window-ms", "1000", "--publish-every", "10000", "--idle-exit", "3", "--no-gate"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.kafka
@pytest.mark.slow
def test_learners_started_before_and_right_after_the_topics_exist_consume_the_stream(
        registry_base: Path, tmp_path: Path, private_broker: PrivateBroker) -> None:
    """One learner starts while the broker has no topics, another the moment they are
    created; both read the whole stream and exit 0 once it is drained."""
    before_root = shutil.copytree(registry_base, tmp_path / "before")
    after_root = shutil.copytree(registry_base, tmp_path / "after")
    before = _learn(before_root, private_broker.bootstrap, "before")
    time.sleep(2)  # it has subscribed to topics that do not exist
    create_topics(private_broker.bootstrap, DEFAULT_TOPICS)
    after = _learn(after_root, private_broker.bootstrap, "after")
    producer = KafkaProducerAdapter(private_broker.bootstrap)
    start_ms = int(time.time() * 1000)
    # the stream goes on 10 s after the last event, so every window of the first EVENTS closes
    write(producer, routing_events(EVENTS, seed=1, start_ms=start_ms)
          + routing_events(5, seed=2, start_ms=start_ms + 10 * EVENTS + 10_000))
    producer.close()
    for name, proc in (("before", before), ("after", after)):
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, f"{name}: {err}"
        report = json.loads(out.strip().splitlines()[-1])
        assert report["examples"] >= EVENTS, (name, report)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_learner_left_without_partitions_reports_it_rejoins_and_recovers(
        registry_base: Path, tmp_path: Path, private_broker: PrivateBroker,
        caplog: pytest.LogCaptureFixture) -> None:
    """Topics of one partition and a second member in the learner's group whose member id
    sorts first: the range assignor gives it every partition. The learner's metric shows 0
    partitions, /healthz answers 503, it logs one line and rejoins; once the other member
    leaves it holds the partitions and is ready again."""
    create_topics(private_broker.bootstrap, [TopicSpec(t, 1, HOUR_MS)
                                     for t in (bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS)])
    root = shutil.copytree(registry_base, tmp_path / "starved")
    group = f"starved-{uuid.uuid4().hex[:6]}"
    # joins first and holds the group; "aaaa-..." sorts before the learner's "policyloop-..."
    other = KafkaConsumerAdapter(private_broker.bootstrap, group,
                                 [bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS],
                                 client_id="aaaa", rejoin_after_s=600)
    _wait(lambda: (other.poll(timeout=0.2), len(other.assignment()) == 3)[1], 30,
          "the other member's assignment")
    learner = Learner(LearnConfig(registry=root / "registry", policy="routing", bus="kafka",
                                  kafka_bootstrap=private_broker.bootstrap, partitions=1,
                                  group=group,
                                  checkpoint=root / "ckpt.json", gate=False))
    server = serve_metrics(learner, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}"
    keep_polling = threading.Event()

    def poll_other() -> None:  # a member that stops polling is dropped from the group
        while not keep_polling.is_set():
            other.poll(timeout=0.2)

    poller = threading.Thread(target=poll_other, daemon=True)
    poller.start()
    runner = threading.Thread(target=learner.run, daemon=True)
    caplog.set_level(logging.WARNING, logger="policyloop.bus.kafka")
    runner.start()
    try:
        _wait(lambda: learner.unassigned == {bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS}, 60,
              "the learner to see it holds no partition")
        status, body = _get(f"{url}/metrics")
        assert status == 200
        for topic in (bus.DECISIONS, bus.REWARDS, bus.ACTIVATIONS):
            assert (f'policyloop_learner_assigned_partitions{{policy="routing",topic="{topic}"}}'
                    " 0.0") in body
        status, body = _get(f"{url}/healthz")
        assert status == 503 and "no partition of activations, decisions, rewards" in body
        _wait(lambda: any("rejoining the group" in r.getMessage() for r in caplog.records),
              30, "the rejoin log line")
        line = next(r.getMessage() for r in caplog.records
                    if "rejoining the group" in r.getMessage())
        assert group in line and "'rewards'" in line and "although the topics exist" in line
        keep_polling.set()
        poller.join(10)
        other.close()  # leaves the group: its partitions move to the learner
        _wait(lambda: sum(learner.assigned.values()) == 3, 60, "the learner's partitions")
        status, body = _get(f"{url}/healthz")
        assert status == 200, body
        assert ('policyloop_learner_assigned_partitions{policy="routing",topic="rewards"} 1.0'
                in _get(f"{url}/metrics")[1])
    finally:
        keep_polling.set()
        learner.stop()
        runner.join(30)
        server.shutdown()
        learner.close()


@pytest.mark.kafka
def test_a_replay_never_given_a_partition_stops_with_an_error(
        registry_base: Path, tmp_path: Path, private_broker: PrivateBroker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With --idle-exit and no topics on the broker, the learner is neither 'drained' nor
    waiting for ever: it raises Unavailable (the CLI exits 2) after the bounded wait."""
    monkeypatch.setattr(learner_module, "NEVER_ASSIGNED_S", 4.0)
    root = shutil.copytree(registry_base, tmp_path / "none")
    learner = Learner(LearnConfig(registry=root / "registry", policy="routing", bus="kafka",
                                  kafka_bootstrap=private_broker.bootstrap, group="nobody",
                                  checkpoint=root / "ckpt.json", idle_exit_s=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="no partition of decisions, rewards, activations"
                           " was assigned to group 'nobody' within 4 s"):
            learner.run()
    finally:
        learner.close()
    assert 4 < time.monotonic() - started < 30


def test_an_idle_learner_asks_for_end_offsets_at_most_twice_a_second(
        registry_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drained check is rate-limited, not done at the poll rate (5 polls a second)."""
    root = shutil.copytree(registry_base, tmp_path / "idle")
    producer = LocalLog(root / "bus", partitions=4).producer()
    # a later event after the 50, so their reward windows close once the bus is drained
    write(producer, routing_events(50, seed=3) + routing_events(1, seed=4, start_ms=1_100_000))
    producer.close()
    calls: list[float] = []
    real_open = bus.open_consumer

    class Counting:
        def __init__(self, inner: bus.Consumer) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        def end_offsets(self, topic: str) -> dict[int, int]:
            if topic == bus.DECISIONS:  # once per check, whatever topics a check asks about
                calls.append(time.monotonic())
            return self._inner.end_offsets(topic)

    monkeypatch.setattr(learner_module.bus, "open_consumer",
                        lambda *a, **k: Counting(real_open(*a, **k)))
    learner = Learner(LearnConfig(registry=root / "registry", policy="routing",
                                  bus_path=root / "bus", checkpoint=root / "ckpt.json",
                                  window_ms=1000, publish_every=10_000, gate=False,
                                  idle_exit_s=3.0))
    try:
        learner.run()
    finally:
        learner.close()
    assert learner.examples == 50
    span = calls[-1] - calls[0]
    checks = len(calls)
    assert span > 2.5 and checks <= span / learner_module.DRAINED_CHECK_S + 2, (checks, span)
