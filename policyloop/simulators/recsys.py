"""A recommendation simulator with a known click model (Gymnasium Env API).

Users have latent tastes u and items latent traits v (both ``latent_dim``); the policy sees only
noisy linear projections of them (the user context and each candidate's item features). A user
clicks item i with probability ``sigmoid(scale * <u, v_i> + bias_i + offset)``: a known model,
so tests can compute every action's true expected reward, the oracle and regret.

Each step one user arrives with ``n_candidates`` items drawn from the catalogue; the action is the
index of the item shown. ``drift()`` (or ``drift_at`` steps) flips the sign of half of the latent
taste dimensions in the click model while the context (built from what the app knew of the user)
stays as it was: the same features now call for other items, so a policy must relearn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from policyloop.contract.signature import FeatureSchema
from policyloop.simulators.arrivals import Arrivals

SCALE = 1.6
OFFSET = -2.6
POSITION_WEIGHTS_NOTE = "slot j counts 1 / log2(j + 2)"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RecsysEnv(gym.Env):
    scenario = "recsys"
    metadata: dict[str, Any] = {"render_modes": []}
    action_space: spaces.Discrete

    def __init__(self, *, n_users: int = 1000, n_items: int = 500, context_dim: int = 16,
                 item_dim: int = 16, latent_dim: int = 8, n_candidates: int = 20,
                 drift_at: int | None = None, episode_length: int = 1_000_000,
                 seed: int = 0) -> None:
        if n_candidates > n_items:
            raise ValueError(f"n_candidates {n_candidates} exceeds n_items {n_items}")
        self.n_users, self.n_items, self.n_candidates = n_users, n_items, n_candidates
        self.context_dim, self.item_dim, self.latent_dim = context_dim, item_dim, latent_dim
        self.drift_at, self.episode_length, self.seed = drift_at, episode_length, seed
        world = np.random.default_rng(seed)
        self._users = world.standard_normal((n_users, latent_dim)) / np.sqrt(latent_dim) * 1.4
        self._items = world.standard_normal((n_items, latent_dim)) / np.sqrt(latent_dim) * 1.4
        self._item_bias = world.normal(0.0, 0.3, n_items)
        self._user_map = world.standard_normal((latent_dim, context_dim)) / np.sqrt(latent_dim)
        self._item_map = world.standard_normal((latent_dim, item_dim)) / np.sqrt(latent_dim)
        self._user_noise = world.normal(0.0, 0.1, (n_users, context_dim))
        self._item_noise = world.normal(0.0, 0.1, (n_items, item_dim))
        self._item_features = (self._items @ self._item_map + self._item_noise).astype(np.float32)
        self._item_features[:, -1] = self._item_bias  # popularity is observable
        self._flip = np.ones(latent_dim)
        self.feature_schema = FeatureSchema(
            context=tuple(f"user_{i}" for i in range(context_dim)),
            action=tuple(f"item_{i}" for i in range(item_dim)))
        self.observation_space = spaces.Dict({
            "context": spaces.Box(-np.inf, np.inf, (context_dim,), np.float32),
            "action_features": spaces.Box(-np.inf, np.inf, (n_candidates, item_dim), np.float32),
        })
        self.action_space = spaces.Discrete(n_candidates)
        self._steps = 0
        self._user = 0
        self._candidates = np.arange(n_candidates)

    @property
    def drifted(self) -> bool:
        return bool((self._flip < 0).any())

    def drift(self) -> None:
        """Flip half of the taste dimensions: most users now prefer other items."""
        self._flip = np.where(np.arange(self.latent_dim) % 2 == 0, -1.0, 1.0)

    def _context(self, users: np.ndarray) -> np.ndarray:
        return (self._users[users] @ self._user_map + self._user_noise[users]).astype(np.float32)

    def _click_probability(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """users int[n], items int[n, K] -> float64[n, K]."""
        u = self._users[users] * self._flip
        affinity = np.einsum("nd,nkd->nk", u, self._items[items])
        return _sigmoid(SCALE * affinity + self._item_bias[items] + OFFSET)

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs = {"context": self._context(np.array([self._user]))[0],
               "action_features": self._item_features[self._candidates]}
        info = {"action_ids": [f"item-{i}" for i in self._candidates],
                "expected_rewards": self.expected_rewards()}
        return obs, info

    def _arrive(self) -> None:
        self._user = int(self.np_random.integers(self.n_users))
        self._candidates = self.np_random.choice(self.n_items, self.n_candidates, replace=False)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray],
                                                               dict[str, Any]]:
        super().reset(seed=seed)
        self._steps = 0
        self._arrive()
        return self._observe()

    def expected_rewards(self) -> np.ndarray:
        """float64[K]: true click probability of each current candidate."""
        return self._click_probability(np.array([self._user]), self._candidates[None, :])[0]

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool,
                                         dict[str, Any]]:
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action!r} is not in 0..{self.n_candidates - 1}")
        probs = self.expected_rewards()
        reward = float(self.np_random.random() < probs[int(action)])
        self._steps += 1
        if self.drift_at is not None and self._steps == self.drift_at:
            self.drift()
        self._arrive()
        obs, info = self._observe()
        info.update(expected_reward=float(probs[int(action)]),
                    optimal_expected_reward=float(probs.max()))
        return obs, reward, False, self._steps >= self.episode_length, info

    def slate_expected_reward(self, indices: Sequence[int]) -> float:
        """Expected clicks of a top-k slate of current candidates (position-based model:
        slot j's click probability is scaled by 1 / log2(j + 2))."""
        probs = self.expected_rewards()
        weights = 1.0 / np.log2(np.arange(len(indices)) + 2.0)
        return float((probs[list(indices)] * weights).sum())

    def sample_contexts(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                         np.ndarray]:
        """n fresh arrivals, vectorised: context [n, Dc] float32, action_features
        [n, K, Da] float32, expected_rewards [n, K] float64. The env's state is untouched."""
        arrivals = self.sample_arrivals(n, rng)
        assert arrivals.action_features is not None
        return arrivals.context, arrivals.action_features, arrivals.expected

    def sample_arrivals(self, n: int, rng: np.random.Generator) -> Arrivals:
        """``sample_contexts`` with the candidates' item ids, for a client sending requests."""
        users = rng.integers(self.n_users, size=n)
        items = np.argpartition(rng.random((n, self.n_items)), self.n_candidates,
                                axis=1)[:, :self.n_candidates]
        return Arrivals(self._context(users), self._item_features[items],
                        self._click_probability(users, items),
                        [[f"item-{i}" for i in row] for row in items])
