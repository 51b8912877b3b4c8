"""Exploration strategies report exactly the distribution they sample from."""

from __future__ import annotations

import numpy as np
import pytest

from policyloop.errors import InvalidArgument, Unavailable
from serving.exploration import (
    UCB,
    EpsilonGreedy,
    Greedy,
    Softmax,
    SquareCB,
    Thompson,
    strategy_from_spec,
)
from serving.posterior import LinearPosterior

SCORES = np.array([0.1, 0.5, 0.3, 0.5, -0.2])


def _posterior(h: int = 3, seed: int = 0) -> tuple[np.ndarray, LinearPosterior]:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((5, h))
    return embedding, LinearPosterior(rng.standard_normal(h), 0.3 * np.eye(h), np.zeros(1))


STRATEGIES = [Greedy(), EpsilonGreedy(0.2), Softmax(0.3), SquareCB(10.0), UCB(1.0, 0.1),
              Thompson(400, 0.05)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize("slots", [1, 3])
def test_propensities_are_the_probabilities_of_the_chosen(strategy, slots) -> None:
    embedding, posterior = _posterior()
    d = strategy.decide(SCORES, slots, np.random.default_rng(1), embedding=embedding,
                        posterior=posterior)
    assert d.probabilities.shape == (slots, 5)
    np.testing.assert_allclose(d.probabilities.sum(axis=1), 1.0)
    assert len(set(d.chosen.tolist())) == slots
    np.testing.assert_array_equal(d.propensities, d.probabilities[np.arange(slots), d.chosen])
    for j in range(1, slots):  # earlier slots' picks have probability 0 later
        assert d.probabilities[j, d.chosen[:j]].sum() == 0.0


@pytest.mark.parametrize("strategy", [EpsilonGreedy(0.3), Softmax(0.2), SquareCB(5.0)],
                         ids=lambda s: s.name)
def test_empirical_frequencies_match_the_stated_probabilities(strategy) -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    first = np.bincount([strategy.decide(SCORES, 2, rng).chosen[0] for _ in range(n)],
                        minlength=5) / n
    stated = strategy.decide(SCORES, 2, rng).probabilities[0]
    assert np.abs(first - stated).max() < 4 * np.sqrt(0.25 / n)


def test_hand_computed_probabilities() -> None:
    rng = np.random.default_rng(0)
    eps = EpsilonGreedy(0.1).decide(SCORES, 1, rng).probabilities[0]
    np.testing.assert_allclose(eps, [0.02, 0.92, 0.02, 0.02, 0.02])  # ties: lowest index
    soft = Softmax(0.5).decide(SCORES, 1, rng).probabilities[0]
    z = np.exp(SCORES / 0.5)
    np.testing.assert_allclose(soft, z / z.sum())
    sq = SquareCB(10.0).decide(SCORES, 1, rng).probabilities[0]
    others = 1 / (5 + 10 * (0.5 - SCORES))
    others[1] = 0
    np.testing.assert_allclose(sq[[0, 2, 3, 4]], others[[0, 2, 3, 4]])
    assert sq[1] == pytest.approx(1 - others.sum())


def test_thompson_propensity_estimate_is_close_to_the_truth() -> None:
    embedding, posterior = _posterior(seed=4)
    strategy = Thompson(1024)
    d = strategy.decide(np.zeros(5), 1, np.random.default_rng(3), embedding=embedding,
                        posterior=posterior)
    draws = posterior.sample_scores(embedding, np.random.default_rng(99), 200_000)
    truth = np.bincount(draws.argmax(axis=1), minlength=5) / len(draws)
    bias = 5 / (1024 + 5)
    assert np.abs(d.probabilities[0] - truth).max() < 4 * np.sqrt(0.25 / 1024) + bias


def test_ucb_prefers_the_uncertain_candidate_when_means_tie() -> None:
    embedding = np.array([[1.0, 0.0], [0.0, 1.0]])
    posterior = LinearPosterior(np.array([0.5, 0.5]), np.diag([0.01, 1.0]), np.zeros(1))
    d = UCB(1.0).decide(np.zeros(2), 1, np.random.default_rng(0), embedding=embedding,
                        posterior=posterior)
    assert d.chosen[0] == 1 and d.propensities[0] == 1.0


def test_seeded_decisions_repeat() -> None:
    a = Softmax(1.0).decide(SCORES, 3, np.random.default_rng(5))
    b = Softmax(1.0).decide(SCORES, 3, np.random.default_rng(5))
    np.testing.assert_array_equal(a.chosen, b.chosen)


def test_posterior_strategies_need_a_posterior() -> None:
    with pytest.raises(Unavailable, match="posterior"):
        Thompson().decide(SCORES, 1, np.random.default_rng(0))


def test_per_action_posterior_restricts_to_allowed_actions() -> None:
    mean = np.arange(12.0).reshape(4, 3)
    posterior = LinearPosterior(mean, np.stack([np.eye(3)] * 4), np.zeros(4))
    sub = posterior.for_actions(np.array([3, 1]))
    mu, _ = sub.mean_and_variance(np.ones((2, 3)))
    np.testing.assert_allclose(mu, [mean[3].sum(), mean[1].sum()])


@pytest.mark.parametrize("spec, name", [
    ("greedy", "greedy"), ("epsilon_greedy:0.1", "epsilon_greedy(epsilon=0.1)"),
    ("softmax:0.5", "softmax(temperature=0.5)"), ("squarecb:10", "squarecb(gamma=10)"),
    ("ucb:1.5", "ucb(alpha=1.5,epsilon=0)"), ("thompson", "thompson(samples=256,epsilon=0)"),
    ("thompson:512:0.1", "thompson(samples=512,epsilon=0.1)")])
def test_specs_parse(spec, name) -> None:
    assert strategy_from_spec(spec).name == name


@pytest.mark.parametrize("spec, message", [
    ("epsilon_greedy:1.5", "epsilon must be in"), ("softmax:0", "temperature must be"),
    ("squarecb:-1", "gamma must be"), ("bogus", "is not one of"), ("softmax", "is not one of"),
    ("thompson:1.5", "integer"), ("epsilon_greedy:x", "strategy")])
def test_bad_specs_name_the_problem(spec, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        strategy_from_spec(spec)
