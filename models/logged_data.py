"""Logged bandit feedback from a simulator, with the logging policy's exact propensities.

This is the offline training set: what an app running its old rule would have logged.
Numpy only. The simulator's true expected rewards are kept alongside, for evaluation only
(training never reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.recsys_env import RecsysEnv
from models.routing_env import RoutingEnv

Env = RecsysEnv | RoutingEnv


@dataclass(frozen=True)
class LoggedBandit:
    context: np.ndarray  # float32[N, Dc]
    action_features: np.ndarray | None  # float32[N, K, Da] (recsys) or None (routing)
    action: np.ndarray  # int64[N]
    propensity: np.ndarray  # float64[N]: P(action | context) under the logging policy
    reward: np.ndarray  # float64[N]
    expected_rewards: np.ndarray  # float64[N, K]: the simulator's truth, evaluation only

    def __len__(self) -> int:
        return len(self.action)

    def split(self, fraction: float) -> tuple[LoggedBandit, LoggedBandit]:
        """First ``fraction`` of rows and the rest (rows are i.i.d., so no shuffle needed)."""
        cut = int(len(self) * fraction)

        def take(s: slice) -> LoggedBandit:
            return LoggedBandit(
                self.context[s], None if self.action_features is None
                else self.action_features[s], self.action[s], self.propensity[s],
                self.reward[s], self.expected_rewards[s])

        return take(slice(0, cut)), take(slice(cut, None))


def heuristic_scores(env: Env, context: np.ndarray,
                     action_features: np.ndarray | None) -> np.ndarray:
    """A plausible hand-written rule an app might log under: [N, K] scores.

    recsys: item popularity (the last item feature); routing: the least loaded queue.
    """
    if action_features is not None:
        return action_features[:, :, -1].astype(np.float64)
    return -context[:, -env.action_space.n:].astype(np.float64)


def logging_probabilities(env: Env, context: np.ndarray, action_features: np.ndarray | None,
                          *, temperature: float = 0.5, epsilon: float = 0.1) -> np.ndarray:
    """[N, K]: softmax of the heuristic mixed with epsilon-uniform, so every action has
    probability >= epsilon / K (logged data that can evaluate any policy)."""
    s = heuristic_scores(env, context, action_features) / temperature
    z = np.exp(s - s.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return (1 - epsilon) * probs + epsilon / probs.shape[1]


def collect_logs(env: Env, n: int, *, seed: int, uniform: bool = False) -> LoggedBandit:
    """n logged events: contexts from the simulator, actions from the logging policy (or
    uniform), rewards drawn from the true expected rewards."""
    rng = np.random.default_rng(seed)
    context, action_features, expected = env.sample_contexts(n, rng)
    probs = (np.full(expected.shape, 1.0 / expected.shape[1]) if uniform
             else logging_probabilities(env, context, action_features))
    cdf = probs.cumsum(axis=1)
    action = np.minimum((cdf < rng.random((n, 1)) * cdf[:, -1:]).sum(axis=1),
                        probs.shape[1] - 1).astype(np.int64)
    rows = np.arange(n)
    reward = (rng.random(n) < expected[rows, action]).astype(np.float64)
    return LoggedBandit(context, action_features, action, probs[rows, action], reward, expected)


def true_policy_value(probs: np.ndarray, expected_rewards: np.ndarray) -> float:
    """Expected reward of a (stochastic) policy with probabilities [N, K]."""
    return float((probs * expected_rewards).sum(axis=1).mean())
