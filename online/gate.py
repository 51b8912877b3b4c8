"""The promotion gate: a candidate model is judged against the serving one by off-policy
evaluation on held-out logged events, before it may become current.

The learner holds out one event in ``holdout_every`` (by a hash of its id) and keeps the most
recent ``limit`` of them here, as the model inputs they were decided on. Both models are run
on them (any learner's candidate is an ONNX file, so the gate judges every learner the same
way) and act greedily on their own scores (the way a reward model is judged); each is valued
by SNIPS on the logged rewards and propensities. The candidate is promoted unless it is worse
than the incumbent by more than the margin plus ``GATE_Z`` standard errors of the difference,
so a noisy window alone does not block a refresh while a clearly worse model is refused.

Heavy-tailed weights: when the serving policy explores little (epsilon-greedy over ten
actions logs its alternatives with propensity 0.005), a candidate that disagrees with it is
valued mostly on a handful of exploratory events of weight 200. SNIPS keeps the estimate within
the rewards' range without clipping (its bias is of order 1/n, towards the weighted mean); the
standard error must not pretend those few events are many. It is the larger of two estimates
(``snips_difference_stderr``): the delta method's for the difference of the two SNIPS values,
in which every held-out event counts, unrewarded ones included; and the reward noise of that
same weighted difference, with each side's reward variance shrunk towards the largest the observed
rewards' range allows by ``PSEUDO_EVENTS`` pseudo-events, so a few heavy events whose rewards
happen to agree cannot make the interval collapse. So a better candidate is not refused on the
luck of a few events, while a sabotaged one is refused once two held-out events took its action
and went unrewarded (tests/test_gate.py pins both under epsilon-greedy logging).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from online import ope
from policyloop.contract.kinds import Logged, Run

GATE_Z = 2.0  # standard errors of the difference the gate allows beyond its margin
PSEUDO_EVENTS = 2.0  # worst-case pseudo-events in each side's reward variance
HOLDOUT_LIMIT = 1000  # held-out events the gate evaluates on (fewer with forgetting)


@dataclass
class Holdout:
    """The gate's evaluation window: the most recent held-out decisions and their outcomes."""

    limit: int = HOLDOUT_LIMIT
    logged: list[Logged] = field(default_factory=list)
    propensity: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)

    def add(self, logged: Logged, propensity: float, reward: float) -> None:
        self.logged.append(logged)
        self.propensity.append(propensity)
        self.reward.append(reward)
        if len(self.logged) > self.limit:
            for items in (self.logged, self.propensity, self.reward):
                del items[0]

    def __len__(self) -> int:
        return len(self.logged)

    def greedy_targets(self, run: Run) -> np.ndarray:
        """Per held-out event: 1 if the model's greedy action is the logged one, else 0.
        Decisions with the same input shapes are scored in one batch."""
        target = np.empty(len(self.logged))
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.logged):
            shape = None if row.action_features is None else row.action_features.shape
            groups.setdefault((row.context.shape, shape), []).append(i)
        for rows in groups.values():
            context = np.concatenate([self.logged[i].context for i in rows])
            features = (None if self.logged[rows[0]].action_features is None else
                        np.concatenate([self.logged[i].action_features for i in rows]))
            scores, _ = run(context, features)
            for j, i in enumerate(rows):
                row = self.logged[i]
                target[i] = float(row.greedy(scores[j]) == row.column)
        return target

    def judge(self, candidate: Run, incumbent: Run, *, enabled: bool, margin: float) -> dict:
        """The evaluation stored with a version's manifest; ``promoted`` is the verdict
        (always True when the gate is off or the window is too small to judge)."""
        return judge_targets(self.greedy_targets(candidate), self.greedy_targets(incumbent),
                             np.array(self.reward), np.array(self.propensity),
                             enabled=enabled, margin=margin)

    def state(self) -> dict:
        return {"limit": self.limit, "format": 2,
                "rows": [[_b64(r.context), None if r.action_features is None
                          else _b64(r.action_features),
                          None if r.allowed is None else r.allowed.tolist(), r.column]
                         for r in self.logged],
                "propensity": self.propensity, "reward": self.reward}

    @classmethod
    def from_state(cls, state: dict, *, warn: Callable[[str], None] | None = None) -> Holdout:
        """The window a checkpoint holds. A checkpoint of an older learner kept embeddings
        instead of inputs; its window is dropped (``warn`` is told) and refills as events
        arrive."""
        if state.get("format") != 2:
            if warn is not None and state.get("action"):
                warn(f"dropping the {len(state['action'])} held-out events of an older "
                     "checkpoint format; the gate's window refills from new events")
            return cls(int(state.get("limit", HOLDOUT_LIMIT)))
        rows = [Logged(_unb64(c, np.float32), None if a is None else _unb64(a, np.float32),
                       None if allowed is None else np.array(allowed, np.int64), int(column))
                for c, a, allowed, column in state["rows"]]
        return cls(int(state["limit"]), rows, list(state["propensity"]), list(state["reward"]))


def judge_targets(candidate: np.ndarray, incumbent: np.ndarray, reward: np.ndarray,
                  propensity: np.ndarray, *, enabled: bool, margin: float) -> dict:
    """The gate on held-out events [N]: ``candidate`` and ``incumbent`` are each policy's
    probability of the logged action (1/0 for greedy policies), ``reward`` and ``propensity``
    the logged ones. Returns the evaluation stored with a version; ``promoted`` is the
    verdict (always True when the gate is off, when fewer than 20 events can judge, or when
    no logged action is one a policy would take: there is nothing to value it on)."""
    cand, inc = _snips(candidate, reward, propensity), _snips(incumbent, reward, propensity)
    stderr = None  # not judged: too few events, or a policy no logged action agrees with
    promote = True
    if cand is not None and inc is not None and candidate.any() and incumbent.any():
        stderr = snips_difference_stderr(candidate, incumbent, reward, propensity)
        promote = not enabled or cand.value >= inc.value - margin - GATE_Z * stderr
    return {
        "gate": enabled, "margin": margin, "promoted": promote,
        "holdout_events": len(reward),
        "candidate_snips": None if cand is None else cand.value,
        "incumbent_snips": None if inc is None else inc.value,
        "difference_stderr": stderr,
    }


def snips_difference_stderr(candidate: np.ndarray, incumbent: np.ndarray, reward: np.ndarray,
                            propensity: np.ndarray) -> float:
    """Standard error of SNIPS(candidate) - SNIPS(incumbent) on the same events [N], each
    policy's probability of the logged action given (both match at least one event): the
    larger of the delta method's and the shrunk reward-noise estimate (module docstring)."""
    r = np.asarray(reward, np.float64)
    n = len(r)
    wc = np.asarray(candidate, np.float64) / propensity
    wi = np.asarray(incumbent, np.float64) / propensity
    ac, ai = wc / wc.sum(), wi / wi.sum()  # each event's share of each estimate
    vc, vi = float(ac @ r), float(ai @ r)
    influence = ac * (r - vc) - ai * (r - vi)  # the delta method's per-event terms, sum 0
    delta = float(np.sqrt((influence ** 2).sum() * n / max(n - 1, 1)))
    worst = ((r.max() - r.min()) / 2) ** 2  # the largest variance rewards in this range have

    def shrunk(share: np.ndarray, value: float) -> float:
        effective = 1.0 / float((share ** 2).sum())  # (sum w)^2 / sum w^2
        observed = float(share @ (r - value) ** 2)
        return (effective * observed + PSEUDO_EVENTS * worst) / (effective + PSEUDO_EVENTS)

    sc, si = shrunk(ac, vc), shrunk(ai, vi)
    variance = np.where(wi == 0, sc, np.where(wc == 0, si, max(sc, si)))
    noise = float(np.sqrt(((ac - ai) ** 2 * variance).sum()))
    return max(delta, noise)


def _snips(target: np.ndarray, reward: np.ndarray, propensity: np.ndarray
           ) -> ope.Estimate | None:
    if len(target) < 20:
        return None
    if target.sum() == 0:
        return ope.Estimate("snips", 0.0, 0.0, 0.0, 0.0, len(target), 0, 0.0, 0.0)
    return ope.snips(reward, propensity, target)


def _b64(array: np.ndarray) -> list:
    return [list(array.shape), base64.b64encode(array.astype("<f4").tobytes()).decode()]


def _unb64(item: list, dtype: type) -> np.ndarray:
    shape, data = item
    return np.frombuffer(base64.b64decode(data), "<f4").reshape(shape).astype(dtype)
