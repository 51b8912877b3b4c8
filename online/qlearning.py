"""Q-learning targets for sequential decisions over a fixed action set (routing), DQN-style.

Routing one ticket changes the load the next tickets meet, so the value of an action is its
reward now plus what it leaves for later. From logged transitions the learner regresses each
action's head on the target

    y_t = r_t + discount * max_{a' allowed at t+1} Q_target(s_{t+1}, a')

where s_{t+1} is the next decision's context in event time (the joiner emits examples in
event-time order, whatever the interleaving of partitions) and Q_target is the head of the
version serving when the learner last published: DQN's target network, synced at every
promotion. Q-learning is off-policy, so the logging propensities are not needed for the
targets. ``discount = 0`` gives back the contextual bandit exactly.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from online.join import Example
from online.learners import Candidate, LinearHeadLearner, Serving
from policyloop.contract.errors import InvalidArgument


def _encode(x: np.ndarray) -> str:
    return base64.b64encode(np.asarray(x, "<f8").tobytes()).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f8").copy()


@dataclass
class QTargets:
    """The one-step delay of a transition: an example is trained on once the next one shows
    where it led. ``weight`` [A, H] and ``bias`` [A] are the target network."""

    discount: float
    weight: np.ndarray
    bias: np.ndarray
    pending: tuple[np.ndarray, int, float] | None = None  # (embedding [H], head, reward)

    def __post_init__(self) -> None:
        if not 0 <= self.discount < 1:
            raise InvalidArgument(f"discount must be in [0, 1), got {self.discount!r}")

    def sync(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """A new serving head becomes the target network."""
        self.weight = np.asarray(weight, np.float64)
        self.bias = np.asarray(bias, np.float64)

    def step(self, embedding: np.ndarray, head: int, reward: float, allowed: np.ndarray,
             train: bool) -> tuple[np.ndarray, int, float] | None:
        """The next example in event time: returns the previous one's (embedding, head,
        target) to train on, if there is one; this one waits for its successor when
        ``train`` (a held-out example is a next state but is never trained on)."""
        done = None
        if self.pending is not None:
            x, h, r = self.pending
            q_next = float(np.max(self.weight[allowed] @ embedding + self.bias[allowed]))
            done = (x, h, r + self.discount * q_next)
        self.pending = (np.asarray(embedding, np.float64), head, float(reward)) if train else None
        return done

    def state(self) -> dict:
        pending = None
        if self.pending is not None:
            x, h, r = self.pending
            pending = [_encode(x), h, r]
        return {"pending": pending}

    def load_state(self, state: dict) -> None:
        pending = state.get("pending")
        self.pending = None if pending is None else (_decode(pending[0]), int(pending[1]),
                                                     float(pending[2]))


class QLearner(LinearHeadLearner):
    """Q-learning on the neural-linear head of a fixed action set: the head learner's
    regression, on the targets ``QTargets`` makes one step late; the serving head is the target
    network, synced at every promotion."""

    def __init__(self, serving: Serving, *, discount: float, prior: float = 1.0,
                 gamma: float = 1.0) -> None:
        if serving.model.manifest.policy_kind.per_action_features:
            raise InvalidArgument(f"discount {discount} (Q-learning) needs a fixed action set; "
                                  f"{serving.model.manifest.policy} ranks the candidates it is "
                                  "sent")
        super().__init__(serving, prior=prior, gamma=gamma)
        self.discount = discount
        self.q = QTargets(discount, *serving.head)

    def __repr__(self) -> str:
        return f"QLearner(discount={self.discount}, prior={self.prior}, gamma={self.gamma})"

    def learn_one(self, example: Example, *, train: bool = True) -> None:
        embedding, logged = self.serving.example(example)
        assert logged.allowed is not None
        done = self.q.step(embedding, logged.head, example.reward, logged.allowed, train=train)
        if done is not None:
            self.heads.update(done[0], done[2], head=done[1])
            self.learned += 1

    def adopt(self, candidate: Candidate, serving: Serving) -> None:
        super().adopt(candidate, serving)
        self.q.sync(*serving.head)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "q": self.q.state()}

    def load_state(self, state: dict[str, Any], serving: Serving) -> None:
        super().load_state(state, serving)
        self.q.sync(*serving.head)
        self.q.load_state(state.get("q") or {})
