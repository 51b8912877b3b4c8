"""The promotion gate: a candidate head is judged against the serving one by off-policy
evaluation on held-out logged events, before it may become current.

The learner holds out one event in ``holdout_every`` (by a hash of its id) and keeps the most
recent ``limit`` of them here. Both heads act greedily on their own scores (the way a reward
model is judged); each is valued by SNIPS on the logged rewards and propensities. The
candidate is promoted unless it is worse than the incumbent by more than the margin plus
``GATE_Z`` standard errors of the paired per-event difference, so a noisy window alone does
not block a refresh while a clearly worse head is refused.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from online import ope

GATE_Z = 2.0  # standard errors of the difference the gate allows beyond its margin
HOLDOUT_LIMIT = 1000  # held-out events the gate evaluates on (fewer with forgetting)

Head = tuple[np.ndarray, np.ndarray]  # weight [A, H], bias [A] (A = 1: a shared head)


@dataclass
class Holdout:
    """The gate's evaluation window: the most recent held-out examples."""

    limit: int = 1000
    embeddings: list[np.ndarray] = field(default_factory=list)  # [K, H] or [H] each
    heads: list[np.ndarray | None] = field(default_factory=list)  # allowed actions (qnet)
    action: list[int] = field(default_factory=list)
    propensity: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)

    def add(self, embeddings: np.ndarray, allowed: np.ndarray | None, action: int,
            propensity: float, reward: float) -> None:
        self.embeddings.append(embeddings)
        self.heads.append(allowed)
        self.action.append(action)
        self.propensity.append(propensity)
        self.reward.append(reward)
        if len(self.action) > self.limit:
            for items in (self.embeddings, self.heads, self.action, self.propensity,
                          self.reward):
                del items[0]

    def greedy_targets(self, head: Head) -> np.ndarray:
        """Per held-out event: 1 if the head's greedy action is the logged one, else 0."""
        weight, bias = head
        target = np.empty(len(self.action))
        for i, (emb, allowed) in enumerate(zip(self.embeddings, self.heads, strict=True)):
            if allowed is None:
                scores = emb @ weight[0] + bias[0]
            else:
                scores = weight[allowed] @ emb + bias[allowed]
            target[i] = float(int(np.argmax(scores)) == self.action[i])
        return target

    def judge(self, candidate_head: Head, incumbent_head: Head, *, enabled: bool,
              margin: float) -> dict:
        """The evaluation stored with a version's manifest; ``promoted`` is the verdict
        (always True when the gate is off or the window is too small to judge)."""
        return judge_targets(self.greedy_targets(candidate_head),
                             self.greedy_targets(incumbent_head), np.array(self.reward),
                             np.array(self.propensity), enabled=enabled, margin=margin)

    def state(self) -> dict:
        return {"limit": self.limit,
                "embeddings": [_b64(e) for e in self.embeddings],
                "heads": [None if a is None else a.tolist() for a in self.heads],
                "action": self.action, "propensity": self.propensity, "reward": self.reward}

    @classmethod
    def from_state(cls, state: dict) -> Holdout:
        return cls(state["limit"], [_unb64(e) for e in state["embeddings"]],
                   [None if a is None else np.array(a) for a in state["heads"]],
                   state["action"], state["propensity"], state["reward"])


def judge_targets(candidate: np.ndarray, incumbent: np.ndarray, reward: np.ndarray,
                  propensity: np.ndarray, *, enabled: bool, margin: float) -> dict:
    """The gate on held-out events [N]: ``candidate`` and ``incumbent`` are each policy's
    probability of the logged action (1/0 for greedy policies), ``reward`` and ``propensity``
    the logged ones. Returns the evaluation stored with a version; ``promoted`` is the
    verdict (always True when the gate is off or fewer than 20 events can judge)."""
    cand, inc = _snips(candidate, reward, propensity), _snips(incumbent, reward, propensity)
    d = (candidate - incumbent) * reward / propensity  # paired: only disagreements count
    stderr = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    promote = True
    if enabled and cand is not None and inc is not None:
        promote = cand.value >= inc.value - margin - GATE_Z * stderr
    return {
        "gate": enabled, "margin": margin, "promoted": promote,
        "holdout_events": len(reward),
        "candidate_snips": None if cand is None else cand.value,
        "incumbent_snips": None if inc is None else inc.value,
        "difference_stderr": stderr,
    }


def _snips(target: np.ndarray, reward: np.ndarray, propensity: np.ndarray
           ) -> ope.Estimate | None:
    if len(target) < 20:
        return None
    if target.sum() == 0:
        return ope.Estimate("snips", 0.0, 0.0, 0.0, 0.0, len(target), 0, 0.0, 0.0)
    return ope.snips(reward, propensity, target)


def _b64(array: np.ndarray) -> list:
    return [list(array.shape), base64.b64encode(array.astype("<f8").tobytes()).decode()]


def _unb64(item: list) -> np.ndarray:
    shape, data = item
    return np.frombuffer(base64.b64decode(data), "<f8").reshape(shape).copy()
