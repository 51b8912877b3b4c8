"""A customer-service routing simulator with a known resolution model (Gymnasium Env API).

Tickets arrive with a topic, a language and an urgency; the action sends the ticket to one of
``n_queues`` queues. Each queue has a skill per topic and per language and a current load. The
ticket is resolved within its SLA with probability

    sigmoid(skill_topic + skill_language - LOAD_PENALTY * load/capacity - URGENCY * urgency
            + OFFSET)

and routing it raises that queue's load, which decays a little every step (agents finish
work). Later tickets therefore depend on earlier routing: the problem is sequential, and a
policy that always picks the most skilled queue overloads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from policyloop.contract.signature import FeatureSchema
from policyloop.simulators.arrivals import Arrivals

LOAD_PENALTY = 2.5
URGENCY = 1.0
OFFSET = -0.3
LOAD_PER_TICKET = 1.0
DECAY = 0.9


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RoutingEnv(gym.Env):
    scenario = "routing"
    metadata: dict[str, Any] = {"render_modes": []}
    action_space: spaces.Discrete

    def __init__(self, *, n_queues: int = 8,
                 topics: Sequence[str] = ("billing", "technical", "account", "shipping",
                                          "returns"),
                 languages: Sequence[str] = ("en", "es", "de"), drift_at: int | None = None,
                 episode_length: int = 1000, seed: int = 0) -> None:
        self.topics, self.languages = tuple(topics), tuple(languages)
        self.n_queues, self.drift_at, self.episode_length = n_queues, drift_at, episode_length
        world = np.random.default_rng(seed)
        self._topic_skill = world.normal(-0.8, 0.8, (n_queues, len(topics)))
        self._lang_skill = world.normal(-0.5, 0.6, (n_queues, len(languages)))
        for q in range(n_queues):  # each queue specialises in one topic and one language
            self._topic_skill[q, q % len(topics)] += 2.5
            self._lang_skill[q, (q // len(topics) + q) % len(languages)] += 1.5
        self._capacity = world.uniform(2.0, 5.0, n_queues)
        self.action_names = tuple(
            f"q{q}-{topics[int(self._topic_skill[q].argmax())]}-"
            f"{languages[int(self._lang_skill[q].argmax())]}" for q in range(n_queues))
        self._dim = len(topics) + len(languages) + 1 + n_queues
        self.feature_schema = FeatureSchema(context=(
            *(f"topic_{t}" for t in topics), *(f"lang_{g}" for g in languages), "urgency",
            *(f"load_{q}" for q in range(n_queues))))
        self.observation_space = spaces.Dict({
            "context": spaces.Box(-np.inf, np.inf, (self._dim,), np.float32)})
        self.action_space = spaces.Discrete(n_queues)
        self._load = np.zeros(n_queues)
        self._ticket = (0, 0, 0.0)
        self._steps = 0
        self._drifted = False

    @property
    def drifted(self) -> bool:
        return self._drifted

    def drift(self) -> None:
        """Queues retrain: topic skills rotate by one topic, so the best queue changes."""
        self._topic_skill = np.roll(self._topic_skill, 1, axis=1)
        self._drifted = True

    def _features(self, topic: np.ndarray, lang: np.ndarray, urgency: np.ndarray,
                  load: np.ndarray) -> np.ndarray:
        n = len(topic)
        x = np.zeros((n, self._dim), np.float32)
        x[np.arange(n), topic] = 1.0
        x[np.arange(n), len(self.topics) + lang] = 1.0
        x[:, len(self.topics) + len(self.languages)] = urgency
        x[:, -self.n_queues:] = load / self._capacity
        return x

    def _resolve_probability(self, topic: np.ndarray, lang: np.ndarray, urgency: np.ndarray,
                             load: np.ndarray) -> np.ndarray:
        """float64[n, A] for tickets (topic, lang, urgency) [n] under queue loads [n, A]."""
        logit = (self._topic_skill[:, topic].T + self._lang_skill[:, lang].T
                 - LOAD_PENALTY * load / self._capacity - URGENCY * urgency[:, None] + OFFSET)
        return _sigmoid(logit)

    def _ticket_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        topic, lang, urgency = self._ticket
        return (np.array([topic]), np.array([lang]), np.array([urgency]), self._load[None, :])

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs = {"context": self._features(*self._ticket_arrays())[0]}
        info = {"action_ids": list(self.action_names),
                "expected_rewards": self.expected_rewards()}
        return obs, info

    def _arrive(self) -> None:
        rng = self.np_random
        self._ticket = (int(rng.integers(len(self.topics))), int(rng.integers(len(self.languages))),
                        float(rng.beta(2.0, 3.0)))

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray],
                                                               dict[str, Any]]:
        super().reset(seed=seed)
        self._steps = 0
        self._load = np.zeros(self.n_queues)
        self._arrive()
        return self._observe()

    def expected_rewards(self) -> np.ndarray:
        """float64[A]: probability the current ticket is resolved within SLA, per queue."""
        return self._resolve_probability(*self._ticket_arrays())[0]

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool,
                                         dict[str, Any]]:
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action!r} is not in 0..{self.n_queues - 1}")
        probs = self.expected_rewards()
        reward = float(self.np_random.random() < probs[int(action)])
        self._load *= DECAY
        self._load[int(action)] += LOAD_PER_TICKET
        self._steps += 1
        if self.drift_at is not None and self._steps == self.drift_at:
            self.drift()
        self._arrive()
        obs, info = self._observe()
        info.update(expected_reward=float(probs[int(action)]),
                    optimal_expected_reward=float(probs.max()))
        return obs, reward, False, self._steps >= self.episode_length, info

    def sample_contexts(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, None,
                                                                         np.ndarray]:
        """n tickets with plausible queue loads, vectorised: context [n, Dc] float32, None,
        expected_rewards [n, A] float64. The env's state is untouched."""
        arrivals = self.sample_arrivals(n, rng)
        return arrivals.context, None, arrivals.expected

    def sample_arrivals(self, n: int, rng: np.random.Generator) -> Arrivals:
        """``sample_contexts`` with the queue names, for a client sending requests."""
        topic = rng.integers(len(self.topics), size=n)
        lang = rng.integers(len(self.languages), size=n)
        urgency = rng.beta(2.0, 3.0, size=n)
        load = rng.gamma(1.5, 0.6, size=(n, self.n_queues)) * self._capacity / 3.0
        names = list(self.action_names)
        return Arrivals(self._features(topic, lang, urgency, load), None,
                        self._resolve_probability(topic, lang, urgency, load),
                        [names] * n)
