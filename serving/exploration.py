"""Exploration strategies: how a decision is drawn from the model's scores.

Every strategy returns, with the chosen candidates, the exact distribution each slot was drawn
from, because the learner's importance weights and every off-policy estimate divide by it.
Slates (top-k) are drawn slot by slot without replacement: slot j applies the strategy to the
n = K - j candidates not yet chosen (probabilities as the strategy defines them over those n),
and its propensity is the probability conditional on the slots before it. Ties between equal
scores always go to the lowest candidate index.

Spec grammar (``strategy_from_spec``; numbers as Python's float() and int() read them)::

    greedy
    epsilon_greedy:E          E in [0, 1]
    softmax:T                 T > 0, the temperature
    squarecb[:G[:X]]          G > 0, the inverse-gap weighting gamma, fixed; with X > 0
                              it grows as G * t^X, t the examples the served version
                              learned from; plain ``squarecb`` is VW's 10 * t^0.5
    ucb:A[:E]                 A >= 0, the width in posterior standard deviations
    thompson[:M[:E]]          M integer in 1..16384, posterior draws per decision (default 256)

where the optional E of ``ucb`` and ``thompson`` mixes in uniform exploration (default 0).

>>> d = EpsilonGreedy(0.2).decide(np.array([0.1, 0.9, 0.5]), 2, np.random.default_rng(0))
>>> d.probabilities.round(4).tolist()[0]
[0.0667, 0.8667, 0.0667]
>>> bool(d.propensities[0] == d.probabilities[0, d.chosen[0]])
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Protocol

import numpy as np

from policyloop.contract.errors import InvalidArgument, Unavailable
from policyloop.contract.posterior import LinearPosterior

MAX_THOMPSON_SAMPLES = 16384


@dataclass(frozen=True, eq=False)
class Decision:
    """One decision: what each slot got, and the distribution it was drawn from."""

    chosen: np.ndarray  # int64[k]: candidate indices, one per slot, in slot order (distinct)
    propensities: np.ndarray  # float64[k]: P(chosen[j] at slot j | chosen[:j]), as sampled
    probabilities: np.ndarray  # float64[k, K]: each slot's distribution (0 for used ones)
    ranking: np.ndarray  # int64[K]: candidates by model score, best first, ties by index


class Strategy(Protocol):
    """Draws ``slots`` distinct candidates from ``scores`` float[K] (higher is better).
    ``embedding`` [K, H] and ``posterior`` are used, and required, when ``needs_posterior``."""

    name: str  # logged with every decision, e.g. "epsilon_greedy(epsilon=0.1)"
    needs_posterior: bool

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision: ...


class Greedy:
    """Always the best score (ties: lowest index); propensity 1. Logged data from it alone
    cannot evaluate another policy: use it only where exploration is not wanted."""

    name = "greedy"
    needs_posterior = False

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        s = _scores(scores, slots)
        ranking = _ranking(s)
        chosen = ranking[:slots].copy()  # the best left at every slot
        probabilities = np.zeros((slots, len(s)))
        probabilities[np.arange(slots), chosen] = 1.0
        return Decision(chosen, np.ones(slots), probabilities, ranking)


class _ScoreDistribution:
    """A strategy defined by a distribution over the candidates left, computed from their
    scores alone (``_probs``); slates draw it slot by slot."""

    needs_posterior = False

    def _probs(self, s: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        s = _scores(scores, slots)
        return _slate(s, s, slots, rng, self._probs)


class EpsilonGreedy(_ScoreDistribution):
    """Uniform over the n candidates left with probability epsilon, else the best of them:
    p = 1 - epsilon + epsilon/n for the best (ties: lowest index), epsilon/n for the others."""

    def __init__(self, epsilon: float) -> None:
        self.epsilon = _in_unit("epsilon", epsilon)
        self.name = f"epsilon_greedy(epsilon={_fmt(self.epsilon)})"

    def _probs(self, s: np.ndarray) -> np.ndarray:
        return _epsilon_greedy(s, self.epsilon)


class Softmax(_ScoreDistribution):
    """Boltzmann exploration: p_a = exp(s_a / T) / sum_b exp(s_b / T) over the candidates
    left, computed after subtracting the best score so no exp overflows."""

    def __init__(self, temperature: float) -> None:
        self.temperature = _positive("temperature", temperature)
        self.name = f"softmax(temperature={_fmt(self.temperature)})"

    def _probs(self, s: np.ndarray) -> np.ndarray:
        z = s - s[s.argmax()]
        z /= self.temperature
        np.exp(z, out=z)
        z /= z.sum()
        return z


class SquareCB(_ScoreDistribution):
    """Inverse-gap weighting (Foster & Rakhlin, 2020; VW's ``--squarecb``) over reward
    estimates: with b the best of the n candidates left (ties: lowest index),
    p_a = 1 / (n + gamma * (s_b - s_a)) for a != b, and p_b = 1 - sum of the others.
    Larger gamma exploits more; every p_a <= 1/n, so p_b >= 1/n.

    gamma is fixed, or grows with what the served version has learned from: ``exponent`` > 0
    makes it ``gamma * max(t, 1) ** exponent`` with t the version's examples
    (``Manifest.examples_learned``), VW's schedule (its defaults: 10 and 0.5). A fixed gamma
    explores as much after a million examples as after ten; the growing one explores a
    created policy almost uniformly and exploits as its estimates firm up. ``after`` gives the
    strategy a version decides with; the name stays the schedule's, so metrics keep one label.
    """

    def __init__(self, gamma: float, exponent: float = 0.0) -> None:
        self.gamma = _positive("gamma", gamma)
        self.exponent = _non_negative("exponent", exponent)
        self.name = (f"squarecb(gamma={_fmt(self.gamma)})" if not self.exponent else
                     f"squarecb(gamma={_fmt(self.gamma)}*t^{_fmt(self.exponent)})")
        self.rate = self.gamma  # the gamma decisions are drawn with

    def after(self, examples: int) -> SquareCB:
        """This strategy for a version learned from ``examples`` (itself if gamma is fixed)."""
        if not self.exponent:
            return self
        grown = copy.copy(self)
        grown.rate = self.gamma * max(int(examples), 1) ** self.exponent
        return grown

    def _probs(self, s: np.ndarray) -> np.ndarray:
        best = int(s.argmax())
        p = s[best] - s
        p *= self.rate
        p += len(s)
        np.reciprocal(p, out=p)
        p[best] = 0.0
        p[best] = 1.0 - p.sum()
        return p


def for_version(strategy: Strategy, examples: int) -> Strategy:
    """The strategy a version learned from ``examples`` decides with: only a growing SquareCB
    depends on it. Serving and ``policyloop evaluate`` both call this."""
    return strategy.after(examples) if isinstance(strategy, SquareCB) else strategy


class UCB:
    """Upper confidence bound on the neural-linear posterior: the best mu + alpha * sigma,
    mu and sigma^2 the posterior mean and variance of each candidate's score.

    UCB is deterministic given its inputs: propensity 1 for the chosen, 0 for every other,
    so its logged data alone cannot evaluate another policy. ``epsilon`` > 0 mixes in uniform
    exploration exactly as epsilon-greedy does (p = 1 - epsilon + epsilon/n for the best bound,
    epsilon/n for the others), which keeps every candidate's probability at least epsilon/n.
    The ranking is by the model's scores, as for every strategy.
    """

    needs_posterior = True

    def __init__(self, alpha: float, epsilon: float = 0.0) -> None:
        self.alpha = _non_negative("alpha", alpha)
        self.epsilon = _in_unit("epsilon", epsilon)
        self.name = f"ucb(alpha={_fmt(self.alpha)},epsilon={_fmt(self.epsilon)})"

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        s = _scores(scores, slots)
        x, post = _posterior_inputs("ucb", s, embedding, posterior)
        mu, var = post.mean_and_variance(x)
        bound = np.sqrt(var)
        bound *= self.alpha
        bound += mu
        return _slate(bound, s, slots, rng, self._probs)

    def _probs(self, bound: np.ndarray) -> np.ndarray:
        return _epsilon_greedy(bound, self.epsilon)


class Thompson:
    """Thompson sampling on the neural-linear posterior, with exact propensities.

    Thompson sampling plays the best candidate under one posterior draw of the weights; the
    probability p_a that candidate a wins has no closed form. Logging an estimate of p_a beside
    an action drawn independently of it would make every importance weight 1/p_hat wrong, and
    biased (E[1/p_hat] != 1/p_a). Instead each decision draws M = ``n_propensity_samples``
    score vectors S_1..S_M from the posterior in one vectorised call, counts each of the n
    candidates' wins c_a = #{m : a = argmax of S_m over the n} (ties: lowest index), and samples
    the action from

        q_a = (1 - epsilon) * (c_a + 1) / (M + n) + epsilon / n

    logging q_a as its propensity. q is exactly the distribution the action was drawn from (given
    the draws, which do not depend on the reward), so IPS and DR stay unbiased whatever M. And
    it is Thompson sampling: with probability (1 - epsilon) M / (M + n) the action is the argmax
    of one of the M draws picked at random, itself a posterior draw; otherwise it is uniform.
    The +1 smoothing keeps every q_a >= (1 - epsilon) / (M + n) + epsilon / n, so importance
    weights stay below M + n.

    q_a also estimates Thompson's own p_a (which is how a target policy's ``probabilities`` are
    read). For epsilon = 0, E[q_a] = (M p_a + 1) / (M + n): the smoothing biases it toward
    uniform by (1 - n p_a) / (M + n), less than n / (M + n) in size (0.019 for n = 5 and
    M = 256); its standard error is sqrt(p_a (1 - p_a) / M) * M / (M + n) <= 0.5 / sqrt(M),
    i.e. 0.031 for M = 256 and 0.016 for M = 1024. E[q_a] is exactly the probability that this
    strategy serves a, so q_a is an unbiased estimate of that. The cost is M * K scores (and
    M * H normal draws for a shared head) per decision.

    Slates use the same M draws for every slot; slot j recounts the wins among the n = K - j
    candidates left. The ranking is by the model's scores, as for every strategy.
    """

    needs_posterior = True

    def __init__(self, n_propensity_samples: int = 256, epsilon: float = 0.0) -> None:
        m = n_propensity_samples
        if (isinstance(m, bool) or not isinstance(m, int | np.integer)
                or not 1 <= m <= MAX_THOMPSON_SAMPLES):
            raise InvalidArgument(f"n_propensity_samples must be an int in "
                                  f"1..{MAX_THOMPSON_SAMPLES}, got {m!r}")
        self.n_propensity_samples = int(m)
        self.epsilon = _in_unit("epsilon", epsilon)
        self.name = f"thompson(samples={self.n_propensity_samples},epsilon={_fmt(self.epsilon)})"

    def decide(self, scores: np.ndarray, slots: int, rng: np.random.Generator, *,
               embedding: np.ndarray | None = None,
               posterior: LinearPosterior | None = None) -> Decision:
        s = _scores(scores, slots)
        x, post = _posterior_inputs("thompson", s, embedding, posterior)
        draws = post.sample_scores(x, rng, self.n_propensity_samples)  # [M, K], ours to mask
        k, m = len(s), self.n_propensity_samples
        chosen = np.empty(slots, np.int64)
        propensities = np.empty(slots)
        probabilities = np.empty((slots, k))
        for j in range(slots):
            n = k - j
            p = probabilities[j]
            p[:] = np.bincount(draws.argmax(axis=1), minlength=k)
            p += 1.0
            p *= (1.0 - self.epsilon) / (m + n)
            p += self.epsilon / n
            p[chosen[:j]] = 0.0
            index = _draw(p, rng)
            chosen[j], propensities[j] = index, p[index]
            draws[:, index] = -np.inf  # never wins again: the argmax is over those left
        return Decision(chosen, propensities, probabilities, _ranking(s))


@dataclass(frozen=True)
class SpecForm:
    """One strategy's line of the spec grammar: ``form`` as the module docstring writes it,
    how many ``arguments`` may follow the name (fewest, most), ``build`` from those arguments
    (strings), and ``examples``: the specs that tests/test_exploration.py runs its generic
    tests on, so a strategy added here is tested like every other."""

    form: str
    arguments: tuple[int, int]
    build: Callable[[list[str]], Strategy]
    examples: tuple[str, ...]


def _squarecb(args: list[str]) -> SquareCB:
    return SquareCB(*map(float, args)) if args else SquareCB(10.0, 0.5)


def _thompson(args: list[str]) -> Thompson:
    return Thompson(int(args[0]), *map(float, args[1:])) if args else Thompson()


SPECS: dict[str, SpecForm] = {
    "greedy": SpecForm("greedy", (0, 0), lambda args: Greedy(), ("greedy",)),
    "epsilon_greedy": SpecForm("epsilon_greedy:E", (1, 1),
                               lambda args: EpsilonGreedy(float(args[0])),
                               ("epsilon_greedy:0.2",)),
    "softmax": SpecForm("softmax:T", (1, 1), lambda args: Softmax(float(args[0])),
                        ("softmax:0.3",)),
    "squarecb": SpecForm("squarecb[:G[:X]]", (0, 2), _squarecb,
                         ("squarecb:10", "squarecb", "squarecb:5:0.3")),
    "ucb": SpecForm("ucb:A[:E]", (1, 2), lambda args: UCB(*map(float, args)),
                    ("ucb:1", "ucb:0.5:0.3")),
    "thompson": SpecForm("thompson[:M[:E]]", (0, 2), _thompson,
                         ("thompson:8", "thompson:64:0.2")),
}


def strategy_from_spec(spec: str) -> Strategy:
    """The strategy a spec names (grammar in the module docstring, one ``SPECS`` entry per
    strategy), e.g. ``"softmax:0.5"``.

    >>> strategy_from_spec("thompson:512").name
    'thompson(samples=512,epsilon=0)'
    """
    if not isinstance(spec, str):
        raise InvalidArgument(f"strategy spec must be a string, got {spec!r}")
    name, *args = spec.split(":")
    form = SPECS.get(name)
    if form is not None and form.arguments[0] <= len(args) <= form.arguments[1]:
        try:
            return form.build(args)
        except (ValueError, InvalidArgument) as exc:
            raise InvalidArgument(f"strategy {spec!r}: {exc}") from exc
    raise InvalidArgument(f"strategy {spec!r} is not one of "
                          f"{', '.join(f.form for f in SPECS.values())}")


def spec_from_name(name: str) -> str:
    """The spec of the strategy a ``Strategy.name`` describes (what ``GetPolicyInfo`` and
    every logged decision carry): its arguments in the spec's order.

    >>> spec_from_name("thompson(samples=64,epsilon=0.2)")
    'thompson:64:0.2'
    """
    head, _, rest = name.partition("(")
    spec = ":".join([head, *(part.partition("=")[2] for part in rest.rstrip(")").split(",")
                             if part)])
    try:
        if strategy_from_spec(spec).name == name:
            return spec
    except InvalidArgument:
        pass
    raise InvalidArgument(f"strategy name {name!r} names no strategy of this version")


def _slate(s: np.ndarray, ranked: np.ndarray, slots: int, rng: np.random.Generator,
           probs: Callable[[np.ndarray], np.ndarray]) -> Decision:
    """Draw ``slots`` distinct candidates; ``probs`` maps the values of the candidates left
    (in index order) to their distribution. ``ranked``: the scores the ranking is by."""
    k = len(s)
    chosen = np.empty(slots, np.int64)
    propensities = np.empty(slots)
    probabilities = np.zeros((slots, k))
    left = np.arange(k)
    for j in range(slots):
        if j:
            left = left[left != chosen[j - 1]]
            p = probs(s[left])
            probabilities[j, left] = p
        else:
            p = probabilities[0] = probs(s)
        index = _draw(p, rng)
        chosen[j], propensities[j] = left[index], p[index]
    return Decision(chosen, propensities, probabilities, _ranking(ranked))


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability p[i] / sum(p), by inverse CDF; never one with p = 0."""
    cdf = p.cumsum()
    index = int(cdf.searchsorted(rng.random() * cdf[-1], side="right"))
    if index == len(p):  # u * total rounded up to total
        index = int(p.nonzero()[0][-1])
    return index


def _epsilon_greedy(s: np.ndarray, epsilon: float) -> np.ndarray:
    p = np.empty(len(s))
    p.fill(epsilon / len(s))
    p[s.argmax()] += 1.0 - epsilon
    return p


def _ranking(s: np.ndarray) -> np.ndarray:
    return (-s).argsort(kind="stable")


def _scores(scores: np.ndarray, slots: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise InvalidArgument(f"scores must be a non-empty vector [K], got shape {s.shape}")
    if isinstance(slots, bool) or not isinstance(slots, int | np.integer):
        raise InvalidArgument(f"slots must be an int, got {slots!r}")
    if not 1 <= slots <= s.size:
        raise InvalidArgument(f"slots must be in 1..{s.size} (the candidates), got {slots}")
    if not np.isfinite(s).all():
        raise InvalidArgument(f"scores must be finite, got {s[~np.isfinite(s)][0]} at "
                              f"candidate {int(np.flatnonzero(~np.isfinite(s))[0])}")
    return s


def _posterior_inputs(name: str, s: np.ndarray, embedding: np.ndarray | None,
                      posterior: LinearPosterior | None) -> tuple[np.ndarray, LinearPosterior]:
    if posterior is None or embedding is None:
        raise Unavailable(f"{name} needs the neural-linear posterior, and this model version "
                          "was published without one (head.npz)")
    if len(embedding) != len(s):
        raise InvalidArgument(f"embedding has {len(embedding)} rows for {len(s)} scores")
    return embedding, posterior


def _checked(name: str, value: float, ok: bool, wanted: str) -> float:
    if not ok:
        raise InvalidArgument(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def _is_real(value: object) -> bool:
    return (isinstance(value, Real) and not isinstance(value, bool)
            and bool(np.isfinite(float(value))))


def _positive(name: str, value: float) -> float:
    return _checked(name, value, _is_real(value) and value > 0, "a finite number > 0")


def _non_negative(name: str, value: float) -> float:
    return _checked(name, value, _is_real(value) and value >= 0, "a finite number >= 0")


def _in_unit(name: str, value: float) -> float:
    return _checked(name, value, _is_real(value) and 0 <= value <= 1, "in [0, 1]")


def _fmt(value: float) -> str:
    """Shortest exact form, without a trailing .0: names must tell strategies apart."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
