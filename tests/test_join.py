"""Decisions and rewards join by event id within the window; nothing is counted twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from online.join import RewardJoiner
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent


def decision(event_id: str, t: int, active: bool = True) -> DecisionEvent:
    return DecisionEvent(
        event_id=event_id, policy="p", model_version=1, timestamp_ms=t,
        context=np.zeros(2, np.float32), action_ids=["a", "b"], action_features=None,
        chosen=[1], propensities=[0.5], probabilities=np.array([[0.5, 0.5]]), strategy="s",
        active=active, baseline_action=None, policy_action=None)


def reward(event_id: str, t: int, value: float = 1.0) -> RewardEvent:
    return RewardEvent(event_id=event_id, policy="p", value=value, slot_rewards=[],
                       timestamp_ms=t)


def run(joiner: RewardJoiner, records: list) -> dict[str, float]:
    out = {}
    for r in records:
        if isinstance(r, DecisionEvent):
            examples = joiner.add_decision(r)
        elif isinstance(r, RewardEvent):
            examples = joiner.add_reward(r)
        else:
            examples = joiner.add_activation(r)
        for e in examples:
            assert e.decision.event_id not in out, "an event was emitted twice"
            out[e.decision.event_id] = e.reward
    for e in joiner.flush():
        assert e.decision.event_id not in out
        out[e.decision.event_id] = e.reward
    return out


def test_rewards_join_and_missing_ones_get_the_default() -> None:
    j = RewardJoiner(window_ms=100, default_reward=-1.0)
    got = run(j, [decision("e1", 0), decision("e2", 10), reward("e1", 50, 2.0),
                  decision("e3", 500)])
    assert got == {"e1": 2.0, "e2": -1.0, "e3": -1.0}
    assert j.stats.rewarded == 1 and j.stats.defaulted == 2


def test_first_reward_wins_and_duplicates_are_counted_not_applied() -> None:
    j = RewardJoiner(window_ms=100)
    got = run(j, [decision("e1", 0), reward("e1", 10, 1.0), reward("e1", 20, 5.0)])
    assert got == {"e1": 1.0} and j.stats.duplicate_rewards == 1


def test_sum_rule_adds_rewards_within_the_window() -> None:
    j = RewardJoiner(window_ms=100, reward_rule="sum")
    assert run(j, [decision("e1", 0), reward("e1", 10, 1.0), reward("e1", 20, 2.0)]) == {
        "e1": 3.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e7])
def test_a_reward_the_learner_cannot_use_is_skipped_and_counted(bad: float) -> None:
    j = RewardJoiner(window_ms=100, default_reward=-1.0)
    got = run(j, [decision("e1", 0), reward("e1", 10, bad), reward("e1", 20, 2.0),
                  decision("e2", 30), RewardEvent(event_id="e2", policy="p", value=1.0,
                                                  slot_rewards=[bad], timestamp_ms=40)])
    assert got == {"e1": 2.0, "e2": -1.0}  # the later good reward still joins e1
    assert j.stats.refused_rewards == 2


def test_the_sum_rule_refuses_an_addition_past_the_limit() -> None:
    j = RewardJoiner(window_ms=100, reward_rule="sum", reward_limit=10.0)
    got = run(j, [decision("e1", 0), reward("e1", 10, 6.0), reward("e1", 20, 6.0),
                  reward("e1", 30, 3.0)])
    assert got == {"e1": 9.0} and j.stats.refused_rewards == 1


def test_late_rewards_are_never_applied() -> None:
    j = RewardJoiner(window_ms=100)
    got = run(j, [decision("e1", 0), decision("e2", 150), reward("e1", 160, 9.0),
                  reward("e2", 400, 9.0)])
    assert got == {"e1": 0.0, "e2": 0.0}
    assert j.stats.late_rewards == 2


def test_a_reward_before_its_decision_is_held() -> None:
    j = RewardJoiner(window_ms=100)
    assert run(j, [reward("e1", 5, 3.0), decision("e1", 0)]) == {"e1": 3.0}


def test_duplicate_decisions_are_ignored() -> None:
    j = RewardJoiner(window_ms=100)
    got = run(j, [decision("e1", 0), decision("e1", 1), reward("e1", 2), decision("e2", 300),
                  decision("e1", 301)])
    assert got == {"e1": 1.0, "e2": 0.0} and j.stats.duplicate_decisions == 2


def test_deferred_decisions_count_only_once_activated() -> None:
    j = RewardJoiner(window_ms=100)
    got = run(j, [decision("shown", 0, active=False), decision("hidden", 0, active=False),
                  ActivationEvent(event_id="shown", policy="p", timestamp_ms=30),
                  reward("shown", 40), reward("hidden", 40)])
    assert got == {"shown": 1.0} and j.stats.never_activated == 1


def test_memory_is_bounded() -> None:
    j = RewardJoiner(window_ms=10**9, max_pending=100)
    for i in range(1000):
        j.add_decision(decision(f"e{i}", i))
        assert j.pending <= 100
    assert j.stats.evicted == 900


def test_a_shuffled_stream_gives_the_same_joins_as_an_ordered_one() -> None:
    rng = np.random.default_rng(0)
    records: list[DecisionEvent | RewardEvent] = []
    for i in range(300):
        records.append(decision(f"e{i}", i * 10))
        if i % 3:
            records.append(reward(f"e{i}", i * 10 + int(rng.integers(1, 50)), float(i)))
    ordered = run(RewardJoiner(window_ms=60), list(records))
    # swap neighbours: small out-of-order delivery, as across partitions
    shuffled = list(records)
    for k in range(0, len(shuffled) - 1, 2):
        if rng.random() < 0.5:
            shuffled[k], shuffled[k + 1] = shuffled[k + 1], shuffled[k]
    assert run(RewardJoiner(window_ms=60), shuffled) == ordered
    assert sum(v > 0 for v in ordered.values()) == 200  # every i % 3 != 0 was rewarded


@pytest.mark.parametrize("kwargs", [{"window_ms": -1}, {"reward_rule": "max"},
                                    {"max_pending": 0}])
def test_bad_settings_are_refused(kwargs) -> None:
    with pytest.raises(InvalidArgument):
        RewardJoiner(**kwargs)


def test_reading_one_topic_or_partition_ahead_gives_the_same_joins() -> None:
    decisions: list[DecisionEvent | RewardEvent] = [decision(f"e{i}", i * 10) for i in range(200)]
    rewards: list[DecisionEvent | RewardEvent] = [
        reward(f"e{i}", i * 10 + 5, float(i)) for i in range(0, 200, 2)]
    sources = ("decisions:0", "rewards:0")

    def replay(records: list[DecisionEvent | RewardEvent]) -> dict[str, float]:
        j = RewardJoiner(window_ms=50, sources=sources)
        out: dict[str, float] = {}
        for r in records:
            got = (j.add_decision(r, "decisions:0") if isinstance(r, DecisionEvent)
                   else j.add_reward(r, "rewards:0"))
            out.update((e.decision.event_id, e.reward) for e in got)
        out.update((e.decision.event_id, e.reward) for e in j.caught_up())
        out.update((e.decision.event_id, e.reward) for e in j.flush())
        return out

    interleaved = sorted(decisions + rewards, key=lambda r: r.timestamp_ms)
    expected = replay(interleaved)
    assert replay(decisions + rewards) == expected  # all decisions read first
    assert replay(rewards + decisions) == expected  # all rewards read first
    assert sum(v > 0 for v in expected.values()) == 99


def test_another_policys_records_move_the_clock_without_opening_anything() -> None:
    joiner = RewardJoiner(window_ms=100, sources=("decisions:0", "rewards:0"))
    assert joiner.add_decision(decision("e1", 0), "decisions:0") == []
    assert joiner.observe("decisions:0", 500) == []  # the rewards input has not moved yet
    closed = joiner.observe("rewards:0", 500)
    assert [e.decision.event_id for e in closed] == ["e1"] and closed[0].reward == 0.0
    assert joiner.pending == 0 and joiner.stats.orphan_rewards == 0


@pytest.mark.parametrize(("changes", "message"), [
    ({"reward_limit": 0.0}, "reward_limit"), ({"reward_limit": float("inf")}, "reward_limit"),
    ({"default_reward": float("nan")}, "default_reward"),
    ({"default_reward": 2e6}, "default_reward")])
def test_the_learners_reward_settings_are_checked(changes: dict, message: str) -> None:
    from online.config import LearnConfig

    with pytest.raises(InvalidArgument, match=message):
        LearnConfig(registry=Path("r"), policy="p", **changes)
