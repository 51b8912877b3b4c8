"""Exploration strategies draw from exactly the distribution they report, and the posterior
they explore with samples what it describes."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from policyloop.contract.errors import InvalidArgument, Unavailable
from policyloop.contract.posterior import LinearPosterior, add_outer
from serving import exploration
from serving.exploration import (
    SPECS,
    UCB,
    Decision,
    EpsilonGreedy,
    Greedy,
    Softmax,
    SquareCB,
    Strategy,
    Thompson,
    for_version,
    strategy_from_spec,
)

SCORES = np.array([0.1, 0.5, 0.3, 0.5, -0.2])  # candidates 1 and 3 tie for the best
SMALL = np.array([0.1, 0.5, 0.3, -0.2])  # four candidates: all 24 ordered 3-slates are seen


def _posterior(k: int, h: int = 3, seed: int = 0) -> tuple[np.ndarray, LinearPosterior]:
    """A shared head whose candidates overlap enough for Thompson to hesitate."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((k, h))
    return embedding, LinearPosterior(0.3 * rng.standard_normal(h), 0.5 * np.eye(h),
                                      np.array([0.1]))


def _decide(strategy: Strategy, scores: np.ndarray, slots: int, seed: int) -> Decision:
    embedding, posterior = _posterior(len(scores))
    return strategy.decide(scores, slots, np.random.default_rng(seed), embedding=embedding,
                           posterior=posterior)


# Every strategy, discovered from the spec table: each of its examples runs the generic tests.
STRATEGIES = [strategy_from_spec(spec) for form in SPECS.values() for spec in form.examples]


def _is_fixed(strategy: Strategy) -> bool:
    """Whether the strategy's distribution is a fixed function of its inputs (not of the rng)."""
    first, second = (_decide(strategy, SMALL, 1, seed=seed).probabilities for seed in (0, 1))
    return bool((first == second).all())


FIXED = [s for s in STRATEGIES if _is_fixed(s)]


def test_the_spec_table_names_every_strategy_and_the_grammar_documents_it() -> None:
    classes = {c for c in vars(exploration).values() if isinstance(c, type)
               and hasattr(c, "decide") and c is not Strategy and not c.__name__.startswith("_")}
    assert classes == {type(s) for s in STRATEGIES}
    assert len({s.name for s in STRATEGIES}) == len(STRATEGIES)  # names tell them apart
    fixed = {type(s) for s in FIXED}
    assert Thompson not in fixed and {EpsilonGreedy, Softmax, SquareCB, UCB} <= fixed
    for name, form in SPECS.items():
        assert form.form.startswith(name) and form.form in (exploration.__doc__ or "")
        assert all(spec.split(":")[0] == name for spec in form.examples)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize("slots", [1, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_slot_is_a_distribution_and_the_propensity_is_its_chosen_entry(
        strategy: Strategy, slots: int, dtype: type) -> None:
    d = _decide(strategy, SCORES.astype(dtype), slots, seed=1)
    assert d.chosen.dtype == np.int64 and d.chosen.shape == (slots,)
    assert d.propensities.dtype == np.float64 and d.probabilities.shape == (slots, 5)
    assert len(set(d.chosen.tolist())) == slots
    assert (d.probabilities >= 0).all()
    np.testing.assert_allclose(d.probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(d.propensities, d.probabilities[np.arange(slots), d.chosen])
    assert (d.propensities > 0).all()
    for j in range(1, slots):  # earlier picks have probability 0 later
        assert (d.probabilities[j, d.chosen[:j]] == 0).all()
    np.testing.assert_array_equal(d.ranking, [1, 3, 2, 0, 4])  # by score, ties by index


def _chi_square_limit(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at a normal z (z = 4.5: p ~ 3e-6)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize("strategy", FIXED, ids=lambda s: s.name)
def test_three_slot_slates_are_drawn_with_the_stated_probabilities(strategy: Strategy) -> None:
    n = 4000
    embedding, posterior = _posterior(4)
    rng = np.random.default_rng(7)
    counts: Counter[tuple[int, ...]] = Counter()
    stated: dict[tuple[int, ...], float] = {}
    for _ in range(n):
        d = strategy.decide(SMALL, 3, rng, embedding=embedding, posterior=posterior)
        slate = tuple(d.chosen.tolist())
        counts[slate] += 1
        joint = float(np.prod(d.propensities))
        assert stated.setdefault(slate, joint) == pytest.approx(joint, rel=1e-12)
    expected = {s: n * p for s, p in stated.items()}
    big = [s for s in expected if expected[s] >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    wanted = [expected[s] for s in big] + [n - sum(expected[s] for s in big)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True) if e > 0)
    assert chi2 < _chi_square_limit(len(big))
    # ...and the first slot alone, against binomial bounds
    first = np.zeros(4)
    for slate, c in counts.items():
        first[slate[0]] += c
    p0 = strategy.decide(SMALL, 1, rng, embedding=embedding, posterior=posterior)
    p = p0.probabilities[0]
    assert (np.abs(first / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12).all()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_importance_weights_are_unbiased_at_every_slot(strategy: Strategy) -> None:
    """E[1{chosen_j = a} / propensity_j | earlier slots] = 1{a could be drawn at slot j}:
    true only when the propensity is the probability the action was actually drawn with.
    Thompson(8) would fail this by far if it logged an estimate beside an independent draw."""
    n = 4000
    embedding, posterior = _posterior(4)
    rng = np.random.default_rng(11)
    residual = np.zeros((n, 3, 4))
    for i in range(n):
        d = strategy.decide(SMALL, 3, rng, embedding=embedding, posterior=posterior)
        residual[i] = -(d.probabilities > 0).astype(float)
        residual[i, np.arange(3), d.chosen] += 1 / d.propensities
    mean, se = residual.mean(axis=0), residual.std(axis=0) / math.sqrt(n)
    assert (np.abs(mean) <= 5 * se + 1e-9).all(), mean


def _first_then(strategy: Strategy, first: int) -> Decision:
    """A two-slot decision whose first slot went to ``first``."""
    for seed in range(500):
        d = strategy.decide(SCORES, 2, np.random.default_rng(seed))
        if d.chosen[0] == first:
            return d
    raise AssertionError(f"{strategy.name} never chose {first} first")


SOFTMAX_HALF = np.array([math.exp(0.2), math.e, math.exp(0.6), math.e, math.exp(-0.4)])


@pytest.mark.parametrize("strategy, first, slot0, slot1", [
    (Greedy(), 1, [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]),
    (EpsilonGreedy(0.1), 1, [0.02, 0.92, 0.02, 0.02, 0.02], [0.025, 0, 0.025, 0.925, 0.025]),
    (EpsilonGreedy(0.1), 3, [0.02, 0.92, 0.02, 0.02, 0.02], [0.025, 0.925, 0.025, 0, 0.025]),
    (EpsilonGreedy(1.0), 4, [0.2] * 5, [0.25, 0.25, 0.25, 0.25, 0]),
    (Softmax(0.5), 1, SOFTMAX_HALF / SOFTMAX_HALF.sum(),
     SOFTMAX_HALF * [1, 0, 1, 1, 1] / (SOFTMAX_HALF.sum() - math.e)),
    # 1 / (n + gamma * gap); the best takes the rest: 1 - 1/9 - 1/7 - 1/5 - 1/12 = 583/1260
    (SquareCB(10.0), 1, [1 / 9, 583 / 1260, 1 / 7, 1 / 5, 1 / 12],
     [1 / 8, 0, 1 / 6, 163 / 264, 1 / 11]),
    (SquareCB(10.0), 4, [1 / 9, 583 / 1260, 1 / 7, 1 / 5, 1 / 12],
     [1 / 8, 1 - 1 / 8 - 1 / 6 - 1 / 4, 1 / 6, 1 / 4, 0]),
], ids=lambda v: v.name if hasattr(v, "name") else None)
def test_probabilities_match_hand_computed_values(strategy: Strategy, first: int,
                                                  slot0: list[float],
                                                  slot1: list[float]) -> None:
    d = _first_then(strategy, first)
    np.testing.assert_allclose(d.probabilities[0], slot0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d.probabilities[1], slot1, rtol=1e-12, atol=1e-15)


def test_softmax_does_not_overflow_on_large_scores() -> None:
    d = Softmax(0.01).decide(np.array([1000.0, 999.0, 0.0]), 1, np.random.default_rng(0))
    np.testing.assert_allclose(d.probabilities[0], [1 / (1 + math.exp(-100)),
                                                    math.exp(-100), 0.0], rtol=1e-12)
    assert d.chosen[0] == 0


def _thompson_truth(embedding: np.ndarray, posterior: LinearPosterior, left: list[int],
                    n: int = 200_000) -> np.ndarray:
    """Monte-Carlo P(a is the argmax among ``left``) under the posterior, over all K."""
    draws = posterior.sample_scores(embedding, np.random.default_rng(99), n)
    wins = np.bincount(np.array(left)[draws[:, left].argmax(axis=1)], minlength=len(embedding))
    return wins / n


def _qnet_posterior() -> tuple[np.ndarray, LinearPosterior]:
    rng = np.random.default_rng(5)
    h, a = 3, 4
    context = np.broadcast_to(rng.standard_normal(h), (a, h))  # one embedding for every action
    covs = np.stack([np.eye(h) * v for v in (0.2, 0.5, 1.0, 2.0)])
    return context, LinearPosterior(0.3 * rng.standard_normal((a, h)), covs, np.zeros(a))


@pytest.mark.parametrize("layout", ["shared", "per_action"])
@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_thompson_propensities_are_within_standard_errors_of_the_truth(layout: str,
                                                                       epsilon: float) -> None:
    if layout == "shared":
        embedding, posterior = _posterior(5, seed=4)
    else:
        embedding, posterior = _qnet_posterior()
    k, m = len(embedding), 1024
    d = Thompson(m, epsilon).decide(np.zeros(k), 2, np.random.default_rng(3),
                                    embedding=embedding, posterior=posterior)
    for j, left in enumerate([list(range(k)), [a for a in range(k) if a != d.chosen[0]]]):
        n = len(left)
        p = _thompson_truth(embedding, posterior, left)[left]
        # q = (1 - eps)(wins + 1)/(M + n) + eps/n: its mean and standard error
        mean = (1 - epsilon) * (m * p + 1) / (m + n) + epsilon / n
        se = (1 - epsilon) * np.sqrt(p * (1 - p) / m) * m / (m + n)
        assert (np.abs(d.probabilities[j, left] - mean) <= 4 * se + 1e-3).all()


def test_thompson_slates_reuse_one_set_of_posterior_draws() -> None:
    embedding, posterior = _posterior(5)
    rng = np.random.default_rng(0)
    Thompson(32).decide(np.zeros(5), 3, rng, embedding=embedding, posterior=posterior)
    after_slate = rng.random()
    rng = np.random.default_rng(0)
    posterior.sample_scores(embedding, rng, 32)
    rng.random(3)  # one uniform per slot
    assert rng.random() == after_slate


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_seeded_decisions_repeat(strategy: Strategy) -> None:
    a, b = (_decide(strategy, SCORES, 3, seed=5) for _ in range(2))
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_ucb_picks_the_uncertain_candidate_when_means_tie() -> None:
    embedding = np.array([[1.0, 0.0], [0.0, 1.0]])
    posterior = LinearPosterior(np.array([0.5, 0.5]), np.diag([0.01, 1.0]), np.zeros(1))
    d = UCB(1.0).decide(np.array([1.0, 0.0]), 1, np.random.default_rng(0),
                        embedding=embedding, posterior=posterior)
    assert d.chosen[0] == 1 and d.propensities[0] == 1.0
    np.testing.assert_array_equal(d.ranking, [0, 1])  # the ranking stays the model's
    mean_only = UCB(0.0).decide(np.zeros(2), 1, np.random.default_rng(0),
                                embedding=embedding, posterior=posterior)
    assert mean_only.chosen[0] == 0  # alpha = 0: ties by index


def test_ucb_epsilon_floor_has_exact_probabilities_per_action_heads() -> None:
    context, posterior = _qnet_posterior()  # equal contexts; variances grow with the action
    flat = LinearPosterior(np.zeros((4, 3)), posterior.covariance, np.zeros(4))
    d = UCB(1.0, 0.2).decide(np.zeros(4), 2, np.random.default_rng(0), embedding=context,
                             posterior=flat)
    np.testing.assert_allclose(d.probabilities[0], [0.05, 0.05, 0.05, 0.85], rtol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_only_posterior_strategies_need_a_posterior(strategy: Strategy) -> None:
    if not strategy.needs_posterior:
        assert strategy.decide(SCORES, 2, np.random.default_rng(0)).chosen.shape == (2,)
        return
    with pytest.raises(Unavailable, match="posterior"):
        strategy.decide(SCORES, 1, np.random.default_rng(0))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_decide_leaves_its_inputs_unchanged(strategy: Strategy) -> None:
    scores = SCORES.copy()
    embedding, posterior = _posterior(len(scores))
    before = embedding.copy()
    strategy.decide(scores, 3, np.random.default_rng(0), embedding=embedding,
                    posterior=posterior)
    np.testing.assert_array_equal(scores, SCORES)
    np.testing.assert_array_equal(embedding, before)


@pytest.mark.parametrize("scores, slots, message", [
    (SCORES, 0, r"slots must be in 1..5 \(the candidates\), got 0"),
    (SCORES, 6, r"slots must be in 1..5 \(the candidates\), got 6"),
    (SCORES, 1.0, "slots must be an int, got 1.0"),
    (SCORES, True, "slots must be an int, got True"),
    (np.array([]), 1, r"scores must be a non-empty vector \[K\], got shape \(0,\)"),
    (SCORES[None], 1, r"got shape \(1, 5\)"),
    (np.array([0.1, np.nan]), 1, "scores must be finite, got nan at candidate 1"),
    (np.array([np.inf, 0.0]), 1, "scores must be finite, got inf at candidate 0"),
])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_bad_decide_inputs_name_the_problem(strategy: Strategy, scores: np.ndarray,
                                            slots: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        strategy.decide(scores, slots, np.random.default_rng(0))


def test_embedding_rows_must_match_the_scores() -> None:
    embedding, posterior = _posterior(4)
    with pytest.raises(InvalidArgument, match="embedding has 4 rows for 5 scores"):
        UCB(1.0).decide(SCORES, 1, np.random.default_rng(0), embedding=embedding,
                        posterior=posterior)


def _any(value: Any) -> Any:
    """A value of the wrong type, passed on purpose past the type checker."""
    return value


@pytest.mark.parametrize("make, message", [
    (lambda: EpsilonGreedy(-0.1), "epsilon must be in [0, 1], got -0.1"),
    (lambda: EpsilonGreedy(1.5), "epsilon must be in [0, 1], got 1.5"),
    (lambda: EpsilonGreedy(float("nan")), "epsilon must be in [0, 1], got nan"),
    (lambda: EpsilonGreedy(_any("0.1")), "epsilon must be in [0, 1], got '0.1'"),
    (lambda: EpsilonGreedy(True), "epsilon must be in [0, 1], got True"),
    (lambda: Softmax(0.0), "temperature must be a finite number > 0, got 0.0"),
    (lambda: Softmax(float("inf")), "temperature must be a finite number > 0, got inf"),
    (lambda: SquareCB(-1.0), "gamma must be a finite number > 0, got -1.0"),
    (lambda: UCB(-0.5), "alpha must be a finite number >= 0, got -0.5"),
    (lambda: UCB(1.0, 2.0), "epsilon must be in [0, 1], got 2.0"),
    (lambda: Thompson(0), "n_propensity_samples must be an int in 1..16384, got 0"),
    (lambda: Thompson(_any(1.5)), "n_propensity_samples must be an int in 1..16384, got 1.5"),
    (lambda: Thompson(True), "n_propensity_samples must be an int in 1..16384, got True"),
    (lambda: Thompson(100_000), "n_propensity_samples must be an int in 1..16384, got 100000"),
    (lambda: Thompson(64, -0.1), "epsilon must be in [0, 1], got -0.1"),
])
def test_bad_hyperparameters_name_the_parameter_and_value(make: Callable[[], Strategy],
                                                          message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        make()


@pytest.mark.parametrize("spec, name", [
    ("greedy", "greedy"),
    ("epsilon_greedy:0.1", "epsilon_greedy(epsilon=0.1)"),
    ("epsilon_greedy:1e-3", "epsilon_greedy(epsilon=0.001)"),
    ("softmax:0.5", "softmax(temperature=0.5)"),
    ("squarecb:10", "squarecb(gamma=10)"),
    ("squarecb", "squarecb(gamma=10*t^0.5)"),
    ("squarecb:5:0.3", "squarecb(gamma=5*t^0.3)"),
    ("ucb:1.5", "ucb(alpha=1.5,epsilon=0)"),
    ("ucb:1:0.05", "ucb(alpha=1,epsilon=0.05)"),
    ("thompson", "thompson(samples=256,epsilon=0)"),
    ("thompson:512", "thompson(samples=512,epsilon=0)"),
    ("thompson:512:0.1", "thompson(samples=512,epsilon=0.1)"),
])
def test_specs_parse(spec: str, name: str) -> None:
    assert strategy_from_spec(spec).name == name


def test_a_growing_squarecb_exploits_more_as_the_version_learned_from_more() -> None:
    growing = strategy_from_spec("squarecb")
    assert isinstance(growing, SquareCB)
    scores = np.array([1.0, 0.0])
    gap_share = [for_version(growing, t).decide(scores, 1, np.random.default_rng(0))
                 .probabilities[0, 1] for t in (0, 100, 10_000)]
    # p of the worse of two = 1 / (2 + gamma * gap), gamma = 10 * max(t, 1)^0.5
    np.testing.assert_allclose(gap_share, [1 / 12, 1 / 102, 1 / 1002])
    assert for_version(growing, 10_000).name == growing.name  # one metrics label
    fixed = strategy_from_spec("squarecb:10")
    assert for_version(fixed, 10_000) is fixed
    thompson = strategy_from_spec("thompson")
    assert for_version(thompson, 10_000) is thompson


@pytest.mark.parametrize("spec, message", [
    ("bogus", "is not one of"), ("", "is not one of"), ("Greedy", "is not one of"),
    ("greedy:1", "is not one of"), ("softmax", "is not one of"), ("ucb", "is not one of"),
    ("ucb:1:0.1:2", "is not one of"), ("thompson:64:0.1:2", "is not one of"),
    ("softmax:", "could not convert"), ("epsilon_greedy:x", "could not convert"),
    ("epsilon_greedy:1.5", "epsilon must be in"), ("softmax:0", "temperature must be"),
    ("squarecb:-1", "gamma must be"), ("ucb:-1", "alpha must be"),
    ("squarecb:10:-0.5", "exponent must be"), ("squarecb:1:2:3", "is not one of"),
    ("thompson:1.5", "invalid literal"), ("thompson:0", "n_propensity_samples must be"),
    ("thompson:64:2", "epsilon must be in"),
])
def test_bad_specs_name_the_spec_and_the_problem(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"strategy {re.escape(repr(spec))}.*{message}"):
        strategy_from_spec(spec)


# The posterior


def _empirical_cov(draws: np.ndarray) -> np.ndarray:
    return np.cov(draws, rowvar=False)


def test_shared_head_draws_have_the_posterior_mean_and_correlated_covariance() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    a = rng.standard_normal((3, 3))
    cov = a @ a.T + 0.1 * np.eye(3)
    posterior = LinearPosterior(np.array([0.2, -0.1, 0.4]), cov, np.array([0.3]))
    mu, var = posterior.mean_and_variance(x.astype(np.float32))
    np.testing.assert_allclose(mu, x @ posterior.mean + 0.3, rtol=1e-6)
    np.testing.assert_allclose(var, np.diag(x @ cov @ x.T), rtol=1e-6)
    draws = posterior.sample_scores(x, rng, 200_000)
    assert draws.shape == (200_000, 4)
    np.testing.assert_allclose(draws.mean(axis=0), mu, atol=0.03)
    np.testing.assert_allclose(_empirical_cov(draws), x @ cov @ x.T, rtol=0.03, atol=0.02)


@pytest.mark.parametrize("actions", [None, np.array([2, 0, 1]), np.array([1, 0, 1])],
                         ids=["default", "permuted", "repeated"])
def test_per_action_heads_draw_independently_per_head(actions: np.ndarray | None) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2))
    covs = np.stack([np.diag([1.0, 0.5]), np.diag([0.2, 2.0]), np.array([[1.0, 0.3],
                                                                          [0.3, 0.5]])])
    posterior = LinearPosterior(rng.standard_normal((3, 2)), covs, np.array([0.0, 1.0, 2.0]))
    heads = np.arange(3) if actions is None else actions
    mu, var = posterior.mean_and_variance(x, actions)
    np.testing.assert_allclose(mu, np.einsum("kh,kh->k", x, posterior.mean[heads])
                               + posterior.bias[heads])
    truth = np.array([[x[i] @ covs[heads[i]] @ x[j] if heads[i] == heads[j] else 0.0
                       for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(var, np.diag(truth), rtol=1e-12)
    draws = posterior.sample_scores(x, rng, 200_000, actions)
    np.testing.assert_allclose(draws.mean(axis=0), mu, atol=0.03)
    np.testing.assert_allclose(_empirical_cov(draws), truth, rtol=0.03, atol=0.02)


def test_for_actions_equals_passing_the_actions() -> None:
    context, posterior = _qnet_posterior()
    allowed = np.array([3, 1])
    sub = posterior.for_actions(allowed)
    for got, want in zip(sub.mean_and_variance(context[:2]),
                         posterior.mean_and_variance(context[:2], allowed), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sub.covariance, posterior.covariance[allowed])
    with pytest.raises(InvalidArgument, match=re.escape("actions must be distinct, got [1, 1]")):
        posterior.for_actions(np.array([1, 1]))


@pytest.mark.parametrize("call, message", [
    (lambda p, x: p.mean_and_variance(x[:, :2]), r"embedding must be \[K, 3\], got shape"),
    (lambda p, x: p.mean_and_variance(x[:3]), "3 rows for 4 per-action heads"),
    (lambda p, x: p.mean_and_variance(x, np.array([0, 1, 2, 4])), r"actions must be in 0..3"),
    (lambda p, x: p.mean_and_variance(x, np.array([0.0, 1, 2, 3])), "actions must be int"),
    (lambda p, x: p.sample_scores(x, np.random.default_rng(0), 0), "n must be an int >= 1"),
])
def test_bad_posterior_inputs_name_the_problem(call: Callable[..., object],
                                               message: str) -> None:
    context, posterior = _qnet_posterior()
    with pytest.raises(InvalidArgument, match=message):
        call(posterior, context)


def test_semi_definite_covariance_is_factored_without_added_variance() -> None:
    v = np.array([[1.0, 2.0, 0.0]])
    cov = v.T @ v - 1e-15 * np.eye(3)  # rank 1, two eigenvalues a rounding error below 0
    posterior = LinearPosterior(np.zeros(3), cov, np.zeros(1))
    x = np.array([[1.0, 2.0, 0.0], [2.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    _, var = posterior.mean_and_variance(x)
    np.testing.assert_allclose(var, [25.0, 0.0, 0.0], atol=1e-9)
    draws = posterior.sample_scores(x, np.random.default_rng(0), 1000)
    np.testing.assert_allclose(draws[:, 1:], 0.0, atol=1e-6)  # no jitter in the null space
    zero = LinearPosterior(np.ones(3), np.zeros((3, 3)), np.zeros(1))
    np.testing.assert_array_equal(zero.sample_scores(x, np.random.default_rng(0), 3),
                                  np.tile(x @ np.ones(3), (3, 1)))


def test_posterior_copies_its_inputs_and_is_read_only() -> None:
    mean = np.ones(2)
    posterior = LinearPosterior(mean, np.eye(2), np.zeros(1))
    mean[0] = 100.0
    assert posterior.mean[0] == 1.0
    with pytest.raises(ValueError):
        posterior.mean[0] = 5.0


@pytest.mark.parametrize("layout", ["shared", "per_action"])
def test_posterior_round_trips_through_npz(layout: str) -> None:
    _, posterior = _posterior(3) if layout == "shared" else _qnet_posterior()
    back = LinearPosterior.from_npz_bytes(posterior.to_npz_bytes())
    for name in ("mean", "covariance", "bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(posterior, name))
    assert back.noise is None
    noisy = LinearPosterior(posterior.mean, posterior.covariance, posterior.bias,
                            np.full(len(posterior.bias), 0.2))
    np.testing.assert_array_equal(LinearPosterior.from_npz_bytes(noisy.to_npz_bytes()).noise,
                                  noisy.noise)


def test_an_observed_row_narrows_the_posterior_as_the_learners_ridge_regression() -> None:
    """``observed`` is the ridge regression's covariance after one more row: on the learner's
    own statistics (online/linear.py), the same as fitting the row at that noise variance."""
    from online.linear import LinearHeads

    rng = np.random.default_rng(3)
    heads = LinearHeads.from_head(np.zeros((3, 4)), np.zeros(3), prior=0.5)
    for _ in range(40):
        heads.update(rng.standard_normal(4), float(rng.random() < 0.3), head=int(rng.integers(3)))
    posterior = heads.posterior()
    row = rng.standard_normal(4)
    after = posterior.observed(row, head=1)
    noise = heads.noise_variance(1)
    heads.update(row, 0.0, head=1)  # the reward does not matter to the covariance
    want = noise * np.linalg.inv(heads.precision(1)[:-1, :-1])
    np.testing.assert_allclose(after.covariance[1], want, atol=1e-12)
    np.testing.assert_allclose(after._factor[1] @ after._factor[1].T, want, atol=1e-12)
    np.testing.assert_array_equal(after.covariance[[0, 2]], posterior.covariance[[0, 2]])
    np.testing.assert_array_equal(after.mean, posterior.mean)
    _, var = after.mean_and_variance(np.stack([row] * 3))
    _, before = posterior.mean_and_variance(np.stack([row] * 3))
    assert var[1] < before[1] and var[0] == before[0]


def test_narrowing_in_place_leaves_the_published_posterior_as_it_was() -> None:
    """Serving narrows a private copy (``narrowable``) by each decision: the same result as
    ``observed`` step by step, and the version's own posterior is untouched and read-only."""
    rng = np.random.default_rng(4)
    published = LinearPosterior(np.zeros((3, 4)), np.stack([np.eye(4)] * 3), np.zeros(3),
                                np.full(3, 0.25))
    before = published.covariance.copy()
    private, step = published.narrowable(), published
    for _ in range(5):
        row, head = rng.standard_normal(4), int(rng.integers(3))
        private.narrow(row, head)
        step = step.observed(row, head)
    np.testing.assert_allclose(private.covariance, step.covariance, atol=1e-12)
    np.testing.assert_allclose(private._factor, step._factor, atol=1e-12)
    np.testing.assert_array_equal(published.covariance, before)
    with pytest.raises(ValueError, match="narrowable"):
        published.narrow(np.ones(4))


def test_nudged_rewards_give_the_ridge_regressions_mean_whatever_arrived() -> None:
    """Narrowing observes a row at its predicted score; ``nudge`` replaces that score by the
    reward when it comes. After four decisions and two rewards, interleaved and in another
    order than the decisions, the mean is the Bayesian linear regression's on all four rows
    with the two rewards and the two predicted scores, and the covariance its covariance."""
    rng = np.random.default_rng(6)
    noise, prior_var, bias = 0.3, 0.5, 0.1
    published = LinearPosterior(rng.standard_normal(3), prior_var * np.eye(3),
                                np.array([bias]), np.array([noise]))
    private = published.narrowable()
    rows = rng.standard_normal((4, 3))
    rewards = {1: 1.0, 0: -0.5}
    predicted = [private.narrow(rows[0]), private.narrow(rows[1])]
    assert predicted[0] == pytest.approx(float(rows[0] @ published.mean + bias))
    private.nudge(rows[1], 0, rewards[1] - predicted[1])  # row 1's reward first
    predicted += [private.narrow(rows[2]), private.narrow(rows[3])]  # on the moved mean
    private.nudge(rows[0], 0, rewards[0] - predicted[0])
    targets = np.array([rewards.get(i, predicted[i]) for i in range(4)]) - bias
    precision = np.eye(3) / prior_var + rows.T @ rows / noise
    expected = np.linalg.solve(precision, published.mean / prior_var + rows.T @ targets / noise)
    np.testing.assert_allclose(private.mean, expected, atol=1e-10)
    np.testing.assert_allclose(private.covariance, np.linalg.inv(precision), atol=1e-10)
    assert not published.mean.flags.writeable
    with pytest.raises(ValueError, match="narrowable"):
        published.nudge(rows[0], 0, 1.0)


@pytest.mark.parametrize("layout", ["one head", "a head of three", "transposed", "float32"])
def test_add_outer_updates_the_matrix_itself_whatever_its_layout(layout: str) -> None:
    """BLAS updates a C-contiguous float64 matrix in place (a head of a stacked [A, H, H]
    covariance included); any other layout takes NumPy's path: same result, same matrix."""
    rng = np.random.default_rng(5)
    stack = rng.standard_normal((3, 5, 5))
    matrix = {"one head": stack[0].copy(), "a head of three": stack[1],
              "transposed": stack[2].T, "float32": stack[0].astype(np.float32)}[layout]
    x, y = rng.standard_normal(5), rng.standard_normal(5)
    expected = matrix + -0.5 * np.outer(x, y)
    add_outer(matrix, -0.5, x, y)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-6)
    if layout == "a head of three":
        np.testing.assert_allclose(stack[1], expected)


def test_ucb_moves_on_from_an_action_it_has_just_observed() -> None:
    """Two tied, equally uncertain actions: UCB picks the first; once that decision is
    observed (serving's pending decisions) it picks the other, still before any reward."""
    posterior = LinearPosterior(np.zeros((2, 2)), np.stack([np.eye(2)] * 2), np.zeros(2),
                                np.array([0.25, 0.25]))
    context = np.array([[1.0, 0.5], [1.0, 0.5]])
    ucb = UCB(1.0)
    rng = np.random.default_rng(0)
    first = ucb.decide(np.zeros(2), 1, rng, embedding=context, posterior=posterior)
    chosen = int(first.chosen[0])
    second = ucb.decide(np.zeros(2), 1, rng, embedding=context,
                        posterior=posterior.observed(context[chosen], head=chosen))
    assert int(second.chosen[0]) == 1 - chosen


def test_a_posterior_without_noise_is_not_narrowed() -> None:
    _, posterior = _posterior(3)
    assert posterior.observed(np.ones(3)) is posterior


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


EYE = np.eye(2)


@pytest.mark.parametrize("data, message", [
    (b"", "not an npz archive"),
    (b"not a zip file at all", "not an npz archive"),
    (b"PK\x03\x04truncated", "not an npz archive"),
    (_npy(np.ones(2)), "a single array"),
    (_npz(mean=np.ones(2), covariance=EYE), r"lacks \['bias'\]"),
    (_npz(mean=np.ones(2), covariance=np.eye(3), bias=np.zeros(1)), "covariance shape"),
    (_npz(mean=np.ones((2, 2)), covariance=np.stack([EYE] * 2), bias=np.zeros(3)),
     "bias shape"),
    (_npz(mean=np.ones((2, 2, 2)), covariance=EYE, bias=np.zeros(1)), "mean must be"),
    (_npz(mean=[1.0, np.nan], covariance=EYE, bias=np.zeros(1)), "mean has NaN"),
    (_npz(mean=np.ones(2), covariance=[[np.inf, 0], [0, 1]], bias=np.zeros(1)),
     "covariance has NaN"),
    (_npz(mean=np.ones(2), covariance=EYE + 0j, bias=np.zeros(1)), "must be real numbers"),
    (_npz(mean=np.ones(2), covariance=[[1.0, 0.5], [0.0, 1.0]], bias=np.zeros(1)),
     "not symmetric"),
    (_npz(mean=np.ones(2), covariance=np.diag([1.0, -0.5]), bias=np.zeros(1)),
     "not positive semi-definite"),
    (_npz(mean=np.ones(2), covariance=EYE, bias=np.zeros(1), noise=np.zeros(1)),
     "noise must be 1 positive variances"),
    (_npz(mean=np.ones((2, 2)), covariance=np.stack([EYE] * 2), bias=np.zeros(2),
          noise=np.ones(3)), "noise must be 2 positive"),
])
def test_malformed_posterior_files_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        LinearPosterior.from_npz_bytes(data)
