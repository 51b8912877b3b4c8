"""The online learner on the local bus: it learns, gates, checkpoints and survives kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from online.config import LearnConfig
from online.learner import Learner
from online.learners import LinearHeadLearner
from online.linear import LinearHeads
from online.metrics import LearnerCollector
from policyloop.bus import interface as bus
from policyloop.bus import local_log
from policyloop.bus.local_log import LocalLog
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_head import read_head
from policyloop.simulators.routing import RoutingEnv
from tests.bandit_stream import (
    kafka_start_ms,
    register_untrained_routing,
    routing_events,
    start_groups_at_end,
    write,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with an untrained routing QNetwork and a bus with 4,000 logged events."""
    root = tmp_path_factory.mktemp("learner")
    register_untrained_routing(LocalRegistry(root / "registry"))
    producer = LocalLog(root / "bus", partitions=2).producer()
    write(producer, routing_events(4000, seed=1))
    producer.close()
    return root


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def _config(root: Path, **changes: object) -> LearnConfig:
    settings: dict = {"registry": root / "registry", "policy": "routing",
                      "bus_path": root / "bus", "partitions": 2, "checkpoint": root / "ckpt.json",
                      "window_ms": 1000, "publish_every": 600, "idle_exit_s": 1.0,
                      "gate": False, "publish_ramp": False}  # every 600 (test_publish_ramp)
    return LearnConfig(**{**settings, **changes})


def _heads(learner: Learner) -> LinearHeads:
    assert isinstance(learner.algorithm, LinearHeadLearner), learner.algorithm
    return learner.algorithm.heads


def _greedy_value(registry: Path, version: int | None = None) -> float:
    from policyloop.registry.onnx_model import choose_providers, load_model

    reg = LocalRegistry(registry)
    mv = reg.get("routing", version) if version else reg.current("routing")
    model = load_model(mv, expected=None, providers=choose_providers(False))
    ctx, _, expected = RoutingEnv().sample_contexts(3000, np.random.default_rng(9))
    scores, _ = model.run(ctx)
    return float(expected[np.arange(len(ctx)), scores.argmax(axis=1)].mean())


def test_the_learner_joins_learns_and_publishes(base: Path, tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "run")
    learner = Learner(_config(root))
    learner.run()
    learner.publish()
    stats = learner.joiner.stats
    assert stats.rewarded > 3000 and stats.defaulted > 200  # ~10% of rewards never sent
    assert learner.examples == stats.emitted
    versions = LocalRegistry(root / "registry").versions("routing")
    assert len(versions) >= 5, (versions, learner.examples, learner.published)
    before, after = _greedy_value(root / "registry", 1), _greedy_value(root / "registry")
    assert after > before + 0.1, (before, after)


def test_another_policys_events_on_the_shared_topics_are_ignored(base: Path,
                                                                  tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "shared")
    producer = LocalLog(root / "bus", partitions=2).producer()
    write(producer, routing_events(500, seed=4, policy="recsys", reward_rate=1.0))
    producer.close()
    alone = Learner(_config(_copy(base, tmp_path / "alone")))
    alone.run()
    shared = Learner(_config(root))
    shared.run()
    assert vars(shared.joiner.stats) == vars(alone.joiner.stats)  # no orphans, no evictions
    assert shared.examples == alone.examples
    np.testing.assert_array_equal(_heads(shared).data_b, _heads(alone).data_b)


def test_without_the_gate_no_event_is_held_out(base: Path, tmp_path: Path) -> None:
    """Holding out costs learning: with --no-gate every joined example is trained on; with
    the gate, one in holdout_every (by its event id) is kept for it instead."""
    free = Learner(_config(_copy(base, tmp_path / "free"), max_examples=1000))
    free.run()
    assert free.algorithm.learned == free.examples == 1000 and len(free._holdout) == 0
    gated = Learner(_config(_copy(base, tmp_path / "gated"), max_examples=1000, gate=True))
    gated.run()
    held = len(gated._holdout)
    assert 150 < held < 250 and gated.algorithm.learned == gated.examples - held


def test_a_publish_in_the_middle_of_a_batch_loses_and_repeats_no_record(
        base: Path, tmp_path: Path) -> None:
    """After a publish mid-batch the learner reads the batch's rest again (so a restart and an
    uninterrupted run see the same interleaving): every record is still handled once, the
    partitions it had not reached yet included."""
    often = Learner(_config(_copy(base, tmp_path / "often"), publish_every=37))
    often.run()
    once = Learner(_config(_copy(base, tmp_path / "once"), publish_every=10**9))
    once.run()
    assert len(often.published) > 50
    assert vars(often.joiner.stats) == vars(once.joiner.stats)
    assert often.examples == once.examples and often.positions == once.positions
    np.testing.assert_allclose(_heads(often).data_b, _heads(once).data_b)


def _on_fresh_bus(base: Path, dest: Path, records: list[tuple[str, bytes, bytes]]) -> Path:
    root = _copy(base, dest)
    shutil.rmtree(root / "bus")
    producer = LocalLog(root / "bus", partitions=2).producer()
    write(producer, records)
    producer.close()
    return root


def test_a_young_learner_publishes_sooner_until_it_reaches_publish_every(
        base: Path, tmp_path: Path) -> None:
    """publish_ramp (the default): versions after about 16, 32, 48, 72, 108, ... examples
    learned (a batch of closed windows may carry it past one), then every publish_every, so a
    policy started from nothing is served what it learned at once."""
    learner = Learner(_config(_copy(base, tmp_path / "run"), publish_ramp=True,
                              publish_interval_s=1e9))
    learner.run()
    seen = [p["examples"] for p in learner.published]  # held-out ones included
    assert seen[0] < 60 and len([n for n in seen if n < 600]) >= 5, seen
    assert (np.diff(seen) > 0).all() and (np.diff(seen)[-3:] >= 600).all(), seen
    steady = Learner(_config(_copy(base, tmp_path / "off"), publish_interval_s=1e9))
    steady.run()
    assert steady.published[0]["examples"] >= 600


def test_a_checkpoint_past_the_end_of_a_recreated_bus_reads_it_from_the_start(
        base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bus was deleted and recreated under a learner's checkpoint: its positions (about
    2,000 per partition) lie past the new ends (about 400). Kept, they would skip every new
    record; by the rule they are reported and reset to the earliest record (finding 4)."""
    root = _copy(base, tmp_path / "run")
    first = Learner(_config(root))
    first.run()
    first.finish()  # publishes the rest and checkpoints
    later = routing_events(800, seed=5, start_ms=1_000_000 + 10 * 4000 + 60_000)
    shutil.rmtree(root / "bus")
    producer = LocalLog(root / "bus", partitions=2).producer()
    write(producer, later)
    producer.close()
    fresh = Learner(_config(_on_fresh_bus(base, tmp_path / "fresh", later)))
    fresh.run()
    restarted = Learner(_config(root))
    assert restarted.examples == first.examples
    restarted.run()
    assert restarted.position_resets == 4  # decisions and rewards, two partitions each
    gained = restarted.examples - first.examples  # one example per decision at most
    assert 800 >= gained >= fresh.examples > 700, (gained, fresh.examples)
    assert caplog.text.count("past the end of the bus") == 4
    metrics = LearnerCollector(restarted)
    (resets,) = [m for m in metrics.collect() if m.name == "policyloop_learner_position_resets"]
    assert resets.samples[0].value == 4


def test_records_the_bus_passes_over_as_damaged_are_counted_in_a_metric(
        base: Path, tmp_path: Path) -> None:
    """A byte flipped inside one decision on disk: the local log skips it (logged), and the
    learner shows it in ``policyloop_learner_damaged_records`` instead of losing it silently."""
    root = _copy(base, tmp_path / "run")
    partition = root / "bus" / "topics" / bus.DECISIONS / "0"
    (segment,) = partition.glob("*.log")
    positions = [p for (p,) in local_log._POS.iter_unpack(segment.with_suffix(".idx").read_bytes())]
    data = bytearray(segment.read_bytes())
    data[positions[100] + 30] ^= 0xFF
    segment.write_bytes(bytes(data))
    learner = Learner(_config(root))
    learner.run()
    assert learner.damaged_records == 1
    (damaged,) = [m for m in LearnerCollector(learner).collect()
                  if m.name == "policyloop_learner_damaged_records"]
    assert damaged.samples[0].value == 1


@pytest.mark.parametrize(("bad", "counter"), [
    ("1e300", "refused_rewards"), ("-2e6", "refused_rewards"),
    ("1e999", "undecodable_records"), ('"lots"', "undecodable_records"),
    ("0, ]} not json", "undecodable_records")])
def test_rewards_the_learner_cannot_use_are_skipped_and_counted(base: Path, tmp_path: Path,
                                                                bad: str, counter: str) -> None:
    """Another producer on the bus wrote unusable rewards (absurd, so large JSON reads them
    as infinity, of the wrong type, or no JSON at all) ahead of the real ones: the learner
    ends exactly where it ends without them, and counts them."""
    clean = routing_events(1500, seed=7, reward_rate=1.0)
    poisoned: list[tuple[str, bytes, bytes]] = []
    for topic, key, value in clean:
        if topic == bus.REWARDS:
            body = {**json.loads(value), "value": 12345.5}
            body["timestamp_ms"] -= 50
            poisoned.append((topic, key, json.dumps(body).replace("12345.5", bad).encode()))
        poisoned.append((topic, key, value))
    alone = Learner(_config(_on_fresh_bus(base, tmp_path / "clean", clean)))
    alone.run()
    hit = Learner(_config(_on_fresh_bus(base, tmp_path / "poisoned", poisoned)))
    hit.run()
    assert getattr(hit.joiner.stats, counter) == 1500
    assert vars(hit.joiner.stats) == {**vars(alone.joiner.stats), counter: 1500}
    np.testing.assert_array_equal(_heads(hit).data_b, _heads(alone).data_b)
    assert np.isfinite(_heads(hit).data_b).all()


def test_a_candidate_worse_by_ope_is_not_promoted(base: Path, tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "gate")
    learner = Learner(_config(root, gate=True, max_examples=2000))
    learner.run()
    learner.publish()  # a good candidate: promoted
    current = LocalRegistry(root / "registry").current("routing").version
    good_w, good_b = read_head(learner.model_bytes, learner.model.manifest.head)
    heads = _heads(learner)
    heads.prior_mean[:] = -np.hstack([good_w, good_b[:, None]])  # a sabotaged head
    heads.data_a[:] = 0
    heads.data_b[:] = 0
    learner.since_publish = 1
    record = learner.publish()
    assert record["promoted"] is False
    assert record["candidate_snips"] < record["incumbent_snips"]
    registry = LocalRegistry(root / "registry")
    assert registry.current("routing").version == current
    assert registry.get("routing", record["version"]).manifest.evaluation["promoted"] is False


def _learn_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", "learn",
            "--registry", str(root / "registry"), "--policy", "routing", "--bus-path",
            str(root / "bus"), "--partitions", "2", "--checkpoint", str(root / "ckpt.json"),
            "--window-ms", "1000", "--publish-every", "300", "--idle-exit", "1.5", "--no-gate"]


def _final_head(root: Path, policy: str = "routing") -> np.ndarray:
    version = LocalRegistry(root / "registry").current(policy)
    weight, bias = read_head(version.read_model(), version.manifest.head)
    return np.hstack([weight, bias[:, None]])


def test_kill_9_and_restart_gives_the_same_model(base: Path, tmp_path: Path) -> None:
    clean = _copy(base, tmp_path / "clean")
    assert subprocess.run(_learn_cmd(clean), cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0
    killed = _copy(base, tmp_path / "killed")
    total = json.loads((clean / "ckpt.json").read_text())["examples"]
    resumed_from = _kill_at_random_points(_learn_cmd(killed), killed / "ckpt.json", 3,
                                          np.random.default_rng(0))
    assert any(0 < n < total for n in resumed_from), resumed_from
    finished = subprocess.run(_learn_cmd(killed), cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report["examples"] == total, (report["joiner"], resumed_from)
    np.testing.assert_allclose(_final_head(killed), _final_head(clean), rtol=1e-9, atol=1e-12)


def _kill_at_random_points(cmd: list[str], checkpoint: Path, kills: int,
                           rng: np.random.Generator, timeout: float = 90) -> list[int]:
    """Start the learner ``kills`` times; each time, once it has checkpointed something new,
    wait a random moment and SIGKILL it. Returns the examples each checkpoint held."""
    resumed_from = []
    for _ in range(kills):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = json.loads(checkpoint.read_text())["examples"] if checkpoint.exists() else 0
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoint.exists() and json.loads(checkpoint.read_text())["examples"] > start:
                break
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed_from.append(json.loads(checkpoint.read_text())["examples"]
                            if checkpoint.exists() else 0)
    return resumed_from


@pytest.mark.kafka
@pytest.mark.slow
def test_the_learner_on_kafka_killed_five_times_ends_with_the_uninterrupted_model(
        base: Path, tmp_path: Path, kafka_bootstrap: str) -> None:
    """On the real broker: one learner runs through the events undisturbed; another, in its
    own consumer group, is SIGKILLed at five random points and restarted each time. Both end
    with the same head, and nothing was lost or counted twice."""
    import uuid

    from policyloop.bus.kafka import KafkaProducerAdapter
    from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

    create_topics(kafka_bootstrap, DEFAULT_TOPICS)
    policy = f"routing-{uuid.uuid4().hex[:8]}"  # other tests' events on the topics are ignored
    records = routing_events(3000, seed=7, policy=policy,
                             start_ms=kafka_start_ms(kafka_bootstrap))
    start_groups_at_end(kafka_bootstrap, [f"g-clean-{policy}", f"g-killed-{policy}"])
    producer = KafkaProducerAdapter(kafka_bootstrap)
    write(producer, records)
    producer.close()
    rewards_sent = sum(1 for topic, _, _ in records if topic == "rewards")

    def prepare(name: str) -> tuple[Path, list[str]]:
        root = _copy(base, tmp_path / name)
        registry = LocalRegistry(root / "registry")
        first = registry.current("routing")
        registry.publish(policy, first.read_model(), replace(first.manifest, policy=policy))
        return root, [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING",
                      "learn", "--registry", str(root / "registry"), "--policy", policy,
                      "--bus", "kafka", "--kafka", kafka_bootstrap, "--group",
                      f"g-{name}-{policy}", "--checkpoint", str(root / "ckpt.json"),
                      "--window-ms", "1000", "--publish-every", "150", "--idle-exit", "3",
                      "--no-gate"]

    clean, clean_cmd = prepare("clean")
    done = subprocess.run(clean_cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout.strip().splitlines()[-1])

    killed, killed_cmd = prepare("killed")
    resumed_from = _kill_at_random_points(killed_cmd, killed / "ckpt.json", 5,
                                          np.random.default_rng(1))
    finished = subprocess.run(killed_cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=180)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert sum(0 < n < expected["examples"] for n in resumed_from) >= 3, resumed_from
    assert report["examples"] == expected["examples"], (resumed_from, report["joiner"])
    assert report["joiner"] == expected["joiner"]
    joiner = report["joiner"]
    # (the producer may have written a record twice under load: Kafka is at-least-once, and
    # duplicates are counted by the join, the same in both runs, never learned twice)
    assert joiner["late_rewards"] == 0
    assert joiner["emitted"] == report["examples"] <= 3000
    assert 0.85 * joiner["emitted"] <= joiner["rewarded"] <= rewards_sent
    np.testing.assert_allclose(_final_head(killed, policy), _final_head(clean, policy),
                               rtol=1e-9, atol=1e-12)


def test_learner_metrics_report_the_join_and_the_gate(base: Path, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from online.metrics import LearnerCollector

    root = _copy(base, tmp_path / "metrics")
    learner = Learner(_config(root, gate=True))
    registry = CollectorRegistry()
    registry.register(LearnerCollector(learner))
    learner.run()
    learner.publish()
    stats = learner.joiner.stats
    value = registry.get_sample_value
    assert value("policyloop_join_events_total",
                 {"policy": "routing", "outcome": "rewarded"}) == stats.rewarded > 0
    assert value("policyloop_join_pending", {"policy": "routing"}) == learner.joiner.pending
    assert value("policyloop_learner_examples_total", {"policy": "routing"}) == learner.examples
    promoted = value("policyloop_learner_versions_total",
                     {"policy": "routing", "outcome": "promoted"}) or 0.0
    rejected = value("policyloop_learner_versions_total",
                     {"policy": "routing", "outcome": "rejected"}) or 0.0
    assert promoted + rejected == len(learner.published) > 0
    assert value("policyloop_learner_gate_value",
                 {"policy": "routing", "model": "candidate"}) is not None


def test_a_checkpoint_of_the_learner_before_learners_had_their_own_state_still_restores(
        base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The layout written before the learner interface: head statistics at the top level and a
    gate window of embeddings. The statistics and positions come back; the window, which holds
    what the gate can no longer use, is dropped with a warning and refills."""
    root = _copy(base, tmp_path / "old")
    first = Learner(_config(root, max_examples=1500))
    first.run()
    first.publish()
    state = json.loads((root / "ckpt.json").read_text())
    learner_state = state.pop("learner")
    state.pop("format")
    state["heads"], state["q"] = learner_state["heads"], None
    state["holdout"] = {"limit": 1000, "embeddings": [], "heads": [None, None],
                        "action": [0, 1], "propensity": [0.125, 0.125], "reward": [1.0, 0.0]}
    (root / "ckpt.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        restored = Learner(_config(root))
    np.testing.assert_array_equal(_heads(restored).data_b, _heads(first).data_b)
    assert restored.positions == first.positions and restored.examples == first.examples
    assert len(restored._holdout) == 0
    assert "dropping the 2 held-out events of an older checkpoint format" in caplog.text


def test_a_candidate_that_fails_servings_checks_is_not_published(base: Path,
                                                                 tmp_path: Path) -> None:
    """Weights beyond float32 (what one absurd reward can cause) cannot make a model serving
    would load, so the learner publishes nothing, counts it, keeps the version it serves and
    keeps running, instead of exiting at every publish."""
    root = _copy(base, tmp_path / "inf")
    learner = Learner(_config(root, max_examples=500))
    learner.run()
    versions = LocalRegistry(root / "registry").versions("routing")
    _heads(learner).prior_mean[:] = 1e39
    learner.since_publish = 1
    record = learner.publish()
    assert record["version"] is None and record["promoted"] is False
    assert "must be finite in float32" in record["refused"]
    assert learner.refused == 1
    assert LocalRegistry(root / "registry").versions("routing") == versions
    assert json.loads((root / "ckpt.json").read_text())["refused"] == 1
