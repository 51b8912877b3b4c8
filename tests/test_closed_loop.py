"""The closed loop end to end: serving and the learner (with its reward join) run as their own
processes, this test process is the app (the simulator), and the policy's true expected reward
must rise significantly above the start policy's and recover after a drift.

Significance is a paired test on the same fresh arrivals: the mean of (final - start) true
expected reward must exceed ``Z`` standard errors. Seeds are fixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policyloop.demo import DemoConfig, run_demo

Z = 3.0
RECOVERY_EVENTS = 6000  # decisions after the drift within which the loop must recover


def _assert_learned(summary: dict[str, Any]) -> None:
    traffic = summary["traffic"]
    assert traffic["errors"] == {}, traffic["errors"]
    assert traffic["decisions"] == summary["config"]["events"]
    scores = summary["scores"]
    assert scores["uniform"] < scores["oracle"]
    paired = scores["paired"]
    assert paired["z"] > Z, paired
    assert scores["final"] > scores["start"]
    assert summary["versions_promoted"] >= 2


def _assert_recovers(summary: dict[str, Any]) -> None:
    """Before the drift the loop beat its start; after it, a served version gets back at least
    half of the way from the drifted start policy to the best value learned before the drift,
    within RECOVERY_EVENTS decisions."""
    scores = summary["scores"]
    before = scores["before_drift"]
    assert before["paired"]["z"] > Z, before
    drift_index = summary["config"]["events"] // 2
    target = scores["start"] + 0.5 * (before["value"] - scores["start"])
    recovered = [c for c in scores["versions"]
                 if drift_index < c["first_decision"] <= drift_index + RECOVERY_EVENTS
                 and c["value"] >= target]
    assert recovered, (target, scores["versions"])
    assert scores["paired"]["z"] > Z  # and the final policy beats the start after the drift


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(data[16:24], ">u4")
    assert width >= 800 and height >= 500


@pytest.mark.slow
def test_the_embedded_loop_learns_routing_and_recovers_from_drift(tmp_path: Path) -> None:
    config = DemoConfig(scenario="routing", drift=True, events=12_000, workdir=tmp_path,
                        live=False)
    summary = run_demo(config)
    _assert_learned(summary)
    _assert_recovers(summary)
    _assert_png(Path(summary["png"]))
    written = json.loads((tmp_path / "routing" / "summary.json").read_text())
    assert written["scores"]["final"] == summary["scores"]["final"]


@pytest.mark.slow
def test_the_embedded_loop_learns_recsys(tmp_path: Path) -> None:
    summary = run_demo(DemoConfig(scenario="recsys", events=12_000, workdir=tmp_path,
                                  live=False))
    _assert_learned(summary)
    _assert_png(Path(summary["png"]))


@pytest.mark.slow
@pytest.mark.kafka
def test_the_loop_on_kafka_learns_routing_and_recovers_from_drift(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    # Broker, server, learner and this client share two cores here: a steady rate leaves the
    # learner its share, as separate machines would.
    config = DemoConfig(scenario="routing", drift=True, events=12_000, workdir=tmp_path,
                        kafka=kafka_bootstrap, rate=400, live=False)
    summary = run_demo(config)
    assert summary["policy"].startswith("routing-")  # this run's own decisions only
    _assert_learned(summary)
    _assert_recovers(summary)
