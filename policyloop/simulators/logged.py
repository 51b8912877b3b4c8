"""Logged bandit feedback, with the logging policy's exact propensities.

This is the offline training set: what an app running its old rule logged, drawn here from a
simulator (``collect_logs``) or read from the app's own file (``policyloop/simulators/
logfile.py``). Numpy only. A simulator's true expected rewards are kept alongside, for
evaluation only (training never reads them; NaN for an app's logs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.signature import FeatureSchema
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

Env = RecsysEnv | RoutingEnv

LOGGING_POLICIES = ("heuristic", "uniform")
HEURISTIC_TEMPERATURE = 0.5
HEURISTIC_EPSILON = 0.1
HEURISTIC_DESCRIPTION = (f"softmax(popularity or low load, T={HEURISTIC_TEMPERATURE}) mixed with "
                         f"{HEURISTIC_EPSILON:.0%} uniform")


@dataclass(frozen=True)
class LoggedBandit:
    """N logged decisions; row i is one (context, candidates, action, propensity, reward)."""

    context: np.ndarray  # float32[N, Dc]
    action_features: np.ndarray | None  # float32[N, K, Da] (recsys) or None (routing)
    action: np.ndarray  # int64[N]
    propensity: np.ndarray  # float64[N]: P(action | context) under the logging policy
    reward: np.ndarray  # float64[N]
    expected_rewards: np.ndarray  # float64[N, K]: the simulator's truth, evaluation only
    features: FeatureSchema | None = None  # the feature names of context and action_features
    actions: tuple[str, ...] = ()  # a fixed action set's ids, column k of the scores
    action_ids: list[list[str]] | None = None  # ranking: each row's candidate ids
    mask: np.ndarray | None = None  # bool[N, K]: real candidates; False where a row with
    # fewer than K candidates was padded (None: every row has K)

    def __len__(self) -> int:
        return len(self.action)


def heuristic_scores(env: Env, context: np.ndarray,
                     action_features: np.ndarray | None) -> np.ndarray:
    """A plausible hand-written rule an app might log under: [N, K] scores.

    recsys: item popularity (the last item feature); routing: the least loaded queue. Both are
    weak on purpose: neither looks at who the user is or what the ticket is about.
    """
    if action_features is not None:
        return action_features[:, :, -1].astype(np.float64)
    return -context[:, -env.action_space.n:].astype(np.float64)


def logging_probabilities(env: Env, context: np.ndarray, action_features: np.ndarray | None,
                          *, policy: str = "heuristic") -> np.ndarray:
    """[N, K] action probabilities of a logging policy.

    ``heuristic`` (the default, what an app running its old rule logs): softmax of the heuristic
    at temperature T mixed with epsilon-uniform, p = (1 - eps) softmax(s / T) + eps / K, so every
    action has probability >= eps / K and the logs can evaluate any policy. ``uniform``: 1 / K.
    """
    if policy not in LOGGING_POLICIES:
        raise InvalidArgument(f"logging_policy must be one of {LOGGING_POLICIES}, got {policy!r}")
    n, k = len(context), (action_features.shape[1] if action_features is not None
                          else int(env.action_space.n))
    if policy == "uniform":
        return np.full((n, k), 1.0 / k)
    s = heuristic_scores(env, context, action_features) / HEURISTIC_TEMPERATURE
    z = np.exp(s - s.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return (1 - HEURISTIC_EPSILON) * probs + HEURISTIC_EPSILON / k


def collect_logs(env: Env, n: int, *, seed: int,
                 logging_policy: str = "heuristic") -> LoggedBandit:
    """n logged events: contexts from the simulator, actions drawn from ``logging_policy``
    (see ``logging_probabilities``) with their exact propensities, rewards drawn as
    Bernoulli(expected_rewards[action])."""
    if n < 1:
        raise InvalidArgument(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    context, action_features, expected, ids = env.sample_arrivals(n, rng)
    probs = logging_probabilities(env, context, action_features, policy=logging_policy)
    cdf = probs.cumsum(axis=1)
    action = np.minimum((cdf < rng.random((n, 1)) * cdf[:, -1:]).sum(axis=1),
                        probs.shape[1] - 1).astype(np.int64)
    rows = np.arange(n)
    reward = (rng.random(n) < expected[rows, action]).astype(np.float64)
    return LoggedBandit(context, action_features, action, probs[rows, action], reward, expected,
                        features=env.feature_schema,
                        actions=tuple(getattr(env, "action_names", ())),
                        action_ids=ids if action_features is not None else None)


def true_policy_value(probs: np.ndarray, expected_rewards: np.ndarray) -> float:
    """Expected reward of a (stochastic) policy with probabilities [N, K] under the simulator's
    true expected rewards [N, K]: mean_i sum_a probs[i, a] * expected_rewards[i, a]."""
    if probs.shape != expected_rewards.shape:
        raise InvalidArgument(f"probs {probs.shape} and expected_rewards "
                              f"{expected_rewards.shape} differ in shape")
    return float((probs * expected_rewards).sum(axis=1).mean())
