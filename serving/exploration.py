"""Exploration strategies: how a decision is drawn from the model's scores.

Every strategy returns, with the chosen candidates, the exact distribution each slot was drawn
from, because the learner's importance weights and every off-policy estimate divide by it.
Slates (top-k) are drawn slot by slot without replacement: slot j applies the strategy to the
candidates not yet chosen, and its propensity is the probability conditional on slots < j.

Specs (``strategy_from_spec``): ``greedy``, ``epsilon_greedy:E``, ``softmax:T``,
``squarecb:G``, ``ucb:A[:E]``, ``thompson[:M[:E]]``; E is an optional uniform-exploration
floor, M the number of posterior draws used to estimate Thompson propensities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from policyloop.errors import InvalidArgument, Unavailable
from serving.posterior import LinearPosterior


@dataclass(frozen=True)
class Decision:
    chosen: np.ndarray  # int64[k]: candidate indices, slot order, distinct
    propensities: np.ndarray  # float64[k]: P(chosen[j] at slot j | chosen[:j])
    probabilities: np.ndarray  # float64[k, K]: each slot's distribution (0 for used candidates)
    ranking: np.ndarray  # int64[K]: candidates by score, best first, ties by index


class Strategy(Protocol):
    name: str
    needs_posterior: bool

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision: ...


def _ranking(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _check(scores: np.ndarray, slots: int) -> int:
    k = len(scores)
    if k == 0:
        raise InvalidArgument("no candidates to choose from")
    if not 1 <= slots <= k:
        raise InvalidArgument(f"slots must be in 1..{k}, got {slots}")
    return k


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw; zero-probability entries are never returned."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    index = min(index, len(probs) - 1)
    while probs[index] == 0.0:  # only reachable through rounding at the top end
        index -= 1
    return index


def _sequential(scores: np.ndarray, slots: int, rng: np.random.Generator,
                slot_probs: _SlotProbs) -> Decision:
    """Draw ``slots`` distinct candidates, each from ``slot_probs`` over those left."""
    k = _check(scores, slots)
    s = np.asarray(scores, np.float64)
    remaining = np.ones(k, dtype=bool)
    chosen = np.empty(slots, np.int64)
    probabilities = np.zeros((slots, k))
    for j in range(slots):
        probs = np.zeros(k)
        probs[remaining] = slot_probs(s[remaining])
        index = _draw(probs, rng)
        chosen[j] = index
        probabilities[j] = probs
        remaining[index] = False
    propensities = probabilities[np.arange(slots), chosen]
    return Decision(chosen, propensities, probabilities, _ranking(s))


class _SlotProbs(Protocol):
    def __call__(self, scores: np.ndarray) -> np.ndarray: ...


def _greedy_probs(scores: np.ndarray) -> np.ndarray:
    probs = np.zeros(len(scores))
    probs[int(np.argmax(scores))] = 1.0
    return probs


def _mix_uniform(probs: np.ndarray, epsilon: float) -> np.ndarray:
    return (1.0 - epsilon) * probs + epsilon / len(probs) if epsilon else probs


def _positive(name: str, value: float) -> float:
    if not (np.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _fraction(name: str, value: float) -> float:
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidArgument(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class Greedy:
    """Always the best score (ties: lowest index); propensity 1. Logged data from it alone
    cannot evaluate another policy: use it only where exploration is not wanted."""

    name = "greedy"
    needs_posterior = False

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        return _sequential(scores, slots, rng, _greedy_probs)


class EpsilonGreedy:
    """Uniform with probability epsilon, else greedy: p = 1-eps+eps/n (best), eps/n (others)."""

    needs_posterior = False

    def __init__(self, epsilon: float) -> None:
        self.epsilon = _fraction("epsilon", epsilon)
        self.name = f"epsilon_greedy(epsilon={self.epsilon:g})"

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        return _sequential(scores, slots, rng,
                           lambda s: _mix_uniform(_greedy_probs(s), self.epsilon))


class Softmax:
    """Boltzmann exploration: p_a proportional to exp(s_a / temperature)."""

    needs_posterior = False

    def __init__(self, temperature: float) -> None:
        self.temperature = _positive("temperature", temperature)
        self.name = f"softmax(temperature={self.temperature:g})"

    def _probs(self, scores: np.ndarray) -> np.ndarray:
        z = np.exp((scores - scores.max()) / self.temperature)
        return z / z.sum()

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        return _sequential(scores, slots, rng, self._probs)


class SquareCB:
    """Inverse-gap weighting (Foster & Rakhlin, 2020) over reward estimates:
    p_a = 1 / (n + gamma * (s_best - s_a)) for a != best, the rest of the mass on best."""

    needs_posterior = False

    def __init__(self, gamma: float) -> None:
        self.gamma = _positive("gamma", gamma)
        self.name = f"squarecb(gamma={self.gamma:g})"

    def _probs(self, scores: np.ndarray) -> np.ndarray:
        n = len(scores)
        best = int(np.argmax(scores))
        probs = 1.0 / (n + self.gamma * (scores[best] - scores))
        probs[best] = 0.0
        probs[best] = 1.0 - probs.sum()
        return probs

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        return _sequential(scores, slots, rng, self._probs)


def _require_posterior(name: str, embedding: np.ndarray | None,
                       posterior: LinearPosterior | None) -> tuple[np.ndarray, LinearPosterior]:
    if posterior is None or embedding is None:
        raise Unavailable(f"{name} needs the neural-linear posterior, and this model version "
                          "was published without one (head.npz)")
    return embedding, posterior


class UCB:
    """Upper confidence bound on the neural-linear head: argmax of mu + alpha * sigma.

    Deterministic given its inputs (propensity 1) unless ``epsilon`` mixes in uniform
    exploration, which keeps every candidate's probability above epsilon/n so the logged data
    stays usable for off-policy evaluation.
    """

    needs_posterior = True

    def __init__(self, alpha: float, epsilon: float = 0.0) -> None:
        self.alpha = _positive("alpha", alpha)
        self.epsilon = _fraction("epsilon", epsilon)
        self.name = f"ucb(alpha={self.alpha:g},epsilon={self.epsilon:g})"

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        x, post = _require_posterior("ucb", embedding, posterior)
        mu, var = post.mean_and_variance(x)
        bound = mu + self.alpha * np.sqrt(var)
        decision = _sequential(bound, slots, rng,
                               lambda s: _mix_uniform(_greedy_probs(s), self.epsilon))
        return Decision(decision.chosen, decision.propensities, decision.probabilities,
                        _ranking(scores))


class Thompson:
    """Thompson sampling on the neural-linear head.

    The action is the argmax of one posterior draw of the scores. Its probability has no closed
    form, so it is estimated from ``n_samples`` further independent draws:
    p_hat(a) = (c_a + 1) / (M + n), with c_a the draws in which a wins among the n candidates
    left. The +1 smoothing keeps every logged propensity positive (importance weights stay
    finite) and biases p_hat toward uniform by at most n / (M + n); the sampling error is about
    sqrt(p (1 - p) / M), i.e. at most 0.016 absolute for M = 1024 and 0.031 for the default 256.
    With ``epsilon`` > 0 the draw is uniform with probability epsilon and the logged
    probabilities are mixed accordingly, as for epsilon-greedy.
    """

    needs_posterior = True

    def __init__(self, n_samples: int = 256, epsilon: float = 0.0) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise InvalidArgument(f"n_samples must be an int >= 1, got {n_samples!r}")
        self.n_samples = n_samples
        self.epsilon = _fraction("epsilon", epsilon)
        self.name = f"thompson(samples={n_samples},epsilon={self.epsilon:g})"

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        x, post = _require_posterior("thompson", embedding, posterior)
        k = _check(scores, slots)
        draw = post.sample_scores(x, rng, 1)[0]
        estimates = post.sample_scores(x, rng, self.n_samples)  # [M, K]
        remaining = np.ones(k, dtype=bool)
        chosen = np.empty(slots, np.int64)
        probabilities = np.zeros((slots, k))
        for j in range(slots):
            left = np.flatnonzero(remaining)
            wins = np.bincount(np.argmax(estimates[:, left], axis=1), minlength=len(left))
            probs = np.zeros(k)
            probs[left] = _mix_uniform((wins + 1.0) / (self.n_samples + len(left)),
                                       self.epsilon)
            if self.epsilon and rng.random() < self.epsilon:
                index = int(left[rng.integers(len(left))])
            else:
                index = int(left[np.argmax(draw[left])])
            chosen[j] = index
            probabilities[j] = probs
            remaining[index] = False
        return Decision(chosen, probabilities[np.arange(slots), chosen], probabilities,
                        _ranking(scores))


def strategy_from_spec(spec: str) -> Strategy:
    """Parse ``name[:arg[:arg]]`` (see the module docstring)."""
    name, *args = spec.strip().split(":")
    try:
        values = [float(a) for a in args]
        if name == "greedy" and not values:
            return Greedy()
        if name == "epsilon_greedy" and len(values) == 1:
            return EpsilonGreedy(values[0])
        if name == "softmax" and len(values) == 1:
            return Softmax(values[0])
        if name == "squarecb" and len(values) == 1:
            return SquareCB(values[0])
        if name == "ucb" and len(values) in (1, 2):
            return UCB(*values)
        if name == "thompson" and len(values) <= 2:
            samples = int(values[0]) if values else 256
            if values and values[0] != samples:
                raise ValueError("samples must be an integer")
            return Thompson(samples, *values[1:])
    except ValueError as exc:
        raise InvalidArgument(f"strategy {spec!r}: {exc}") from exc
    raise InvalidArgument(f"strategy {spec!r} is not one of greedy, epsilon_greedy:E, "
                          "softmax:T, squarecb:G, ucb:A[:E], thompson[:M[:E]]")
