"""The promotion gate under epsilon-greedy logging (online/gate.py): held-out windows drawn
with a known truth, so what the gate should conclude is known.

Ten actions, one best per event; the serving policy (the incumbent) picks the best on a share
of events and logs its choice with propensity 0.955 and every other action with 0.005. A
candidate that disagrees with it is valued on the few exploratory events that took its action
(about five in a window of 1,000), each of weight 200: the case where the gate's interval used
to collapse and refuse better models.
"""

from __future__ import annotations

import numpy as np

from online.gate import HOLDOUT_LIMIT, judge_targets, snips_difference_stderr

ACTIONS = 10


def _window(rng: np.random.Generator, *, epsilon: float, incumbent: float, candidate: float,
            best_reward: float, other_reward: float) -> dict[str, np.ndarray]:
    """One held-out window: each policy's 0/1 target (its greedy action is the logged one),
    the logged rewards and propensities; ``incumbent`` and ``candidate`` are how often each
    picks the best action; the sabotaged policy never does, nor the incumbent's action."""
    n = HOLDOUT_LIMIT
    best = rng.integers(ACTIONS, size=n)

    def policy(accuracy: float) -> np.ndarray:
        wrong = (best + rng.integers(1, ACTIONS, size=n)) % ACTIONS
        return np.where(rng.random(n) < accuracy, best, wrong)

    serving, better = policy(incumbent), policy(candidate)
    sabotaged = (serving + 1) % ACTIONS
    sabotaged = np.where(sabotaged == best, (sabotaged + 1) % ACTIONS, sabotaged)
    logged = np.where(rng.random(n) < epsilon, rng.integers(ACTIONS, size=n), serving)
    propensity = np.where(logged == serving, 1 - epsilon + epsilon / ACTIONS, epsilon / ACTIONS)
    reward = (rng.random(n) < np.where(logged == best, best_reward, other_reward)).astype(float)
    return {"incumbent": (serving == logged).astype(float),
            "better": (better == logged).astype(float),
            "sabotaged": (sabotaged == logged).astype(float),
            "reward": reward, "propensity": propensity}


def _judge(w: dict[str, np.ndarray], name: str) -> dict:
    return judge_targets(w[name], w["incumbent"], w["reward"], w["propensity"],
                         enabled=True, margin=0.01)


def test_a_better_candidate_is_promoted_however_few_events_value_it() -> None:
    # incumbent 0.8 -> value 0.68, candidate 0.95 -> 0.77, rewards noisy (0.8 / 0.2); the
    # interval of the paired per-event difference refused it in 28 of these 200 windows
    rng = np.random.default_rng(1)
    verdicts = [_judge(_window(rng, epsilon=0.05, incumbent=0.8, candidate=0.95,
                               best_reward=0.8, other_reward=0.2), "better")
                for _ in range(200)]
    refused = [v for v in verdicts if not v["promoted"]]
    assert refused == []


def test_a_sabotaged_candidate_is_refused_once_a_few_events_show_it() -> None:
    # rewards 1 for the best action, else 0 (a supervised stream); the sabotaged policy's
    # action is logged on about five events a window, all unrewarded
    rng = np.random.default_rng(2)
    windows = [_window(rng, epsilon=0.05, incumbent=0.7, candidate=0.95,
                       best_reward=1.0, other_reward=0.0) for _ in range(200)]
    shown = [int(w["sabotaged"].sum()) for w in windows]
    verdicts = [_judge(w, "sabotaged") for w in windows]
    assert all(not v["promoted"] for v, k in zip(verdicts, shown, strict=True) if k >= 2)
    assert sum(not v["promoted"] for v in verdicts) >= 180  # once in a while it is seen once
    assert all(v["promoted"] for v in (_judge(w, "better") for w in windows))
    # with twice the exploration it is seen about ten times a window: always refused
    assert not any(_judge(_window(rng, epsilon=0.1, incumbent=0.7, candidate=0.95,
                                  best_reward=1.0, other_reward=0.0), "sabotaged")["promoted"]
                   for _ in range(100))


def test_a_policy_no_logged_action_agrees_with_is_not_judged() -> None:
    rng = np.random.default_rng(3)
    w = _window(rng, epsilon=0.05, incumbent=0.7, candidate=0.95, best_reward=1.0,
                other_reward=0.0)
    verdict = judge_targets(np.zeros_like(w["reward"]), w["incumbent"], w["reward"],
                            w["propensity"], enabled=True, margin=0.01)
    assert verdict["promoted"] and verdict["difference_stderr"] is None


def test_the_interval_does_not_collapse_on_a_few_heavy_events_that_agree() -> None:
    # 98 events both policies took (reward 1), two exploratory ones only the candidate took,
    # both unrewarded: their rewards agree, yet two events are two events
    n = 100
    incumbent = np.r_[np.ones(98), 0.0, 0.0]
    candidate = np.ones(n)
    propensity = np.r_[np.full(98, 0.955), 0.005, 0.005]
    reward = np.r_[np.ones(98), 0.0, 0.0]
    stderr = snips_difference_stderr(candidate, incumbent, reward, propensity)
    # the candidate's value rests on an effective ~3 events: its share of the worst-case
    # variance (0.25) over them is about 0.25, so the standard error is well above 0.1
    assert stderr > 0.2
    same = snips_difference_stderr(incumbent, incumbent, reward, propensity)
    assert same == 0.0
