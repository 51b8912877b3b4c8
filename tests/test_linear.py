"""Incremental Bayesian linear regression on embeddings: LinUCB/Thompson state."""

from __future__ import annotations

import numpy as np
import pytest

from online.linear import LinearHeads
from policyloop.contract.errors import InvalidArgument


def _stream(n: int, w: np.ndarray, bias: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(w)))
    return x, x @ w + bias + 0.1 * rng.standard_normal(n)


def test_recovers_the_true_head_from_data() -> None:
    w = np.array([0.5, -1.0, 2.0])
    heads = LinearHeads.from_head(np.zeros((1, 3)), np.zeros(1))
    x, r = _stream(2000, w, 0.3, 0)
    for xi, ri in zip(x, r, strict=True):
        heads.update(xi, ri)
    weight, bias = heads.head()
    np.testing.assert_allclose(weight[0], w, atol=0.02)
    assert bias[0] == pytest.approx(0.3, abs=0.02)
    assert heads.noise_variance() == pytest.approx(0.01, rel=0.5)


def test_two_learners_on_disjoint_halves_merge_into_one() -> None:
    x, r = _stream(400, np.array([1.0, 2.0]), 0.0, 1)
    actions = np.arange(400) % 3
    one = LinearHeads.from_head(np.ones((3, 2)), np.zeros(3))
    left = LinearHeads.from_head(np.ones((3, 2)), np.zeros(3))
    right = LinearHeads.from_head(np.ones((3, 2)), np.zeros(3))
    for i in range(400):
        one.update(x[i], r[i], head=int(actions[i]))
        (left if i % 2 else right).update(x[i], r[i], head=int(actions[i]))
    merged = left.merge(right)
    np.testing.assert_allclose(merged.head()[0], one.head()[0], atol=1e-10)
    np.testing.assert_allclose(merged.posterior().covariance, one.posterior().covariance,
                               rtol=1e-6, atol=1e-12)


def test_forgetting_follows_a_drifting_truth() -> None:
    before, after = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    x1, r1 = _stream(3000, before, 0.0, 2)
    x2, r2 = _stream(300, after, 0.0, 3)
    errors = {}
    for gamma in (1.0, 0.98):
        heads = LinearHeads.from_head(np.zeros((1, 2)), np.zeros(1), gamma=gamma)
        for xi, ri in zip(np.vstack([x1, x2]), np.concatenate([r1, r2]), strict=True):
            heads.update(xi, ri)
        errors[gamma] = np.abs(heads.head()[0][0] - after).max()
    assert errors[0.98] < 0.1 < errors[1.0]


def test_uncertainty_shrinks_with_data_and_starts_at_the_prior_head() -> None:
    heads = LinearHeads.from_head(np.array([[0.2, 0.4]]), np.array([0.1]))
    np.testing.assert_allclose(heads.head()[0], [[0.2, 0.4]])
    wide = np.trace(heads.posterior().covariance)
    x, r = _stream(500, np.array([0.2, 0.4]), 0.1, 4)
    for xi, ri in zip(x, r, strict=True):
        heads.update(xi, ri)
    assert np.trace(heads.posterior().covariance) < wide / 50


def test_state_round_trips() -> None:
    heads = LinearHeads.from_head(np.zeros((2, 3)), np.zeros(2), gamma=0.99)
    heads.update(np.ones(3), 1.0, head=1)
    again = LinearHeads.from_npz_arrays(heads.to_npz_arrays())
    np.testing.assert_array_equal(again.head()[0], heads.head()[0])
    assert again.gamma == 0.99


@pytest.mark.parametrize("kwargs", [{"prior": 0.0}, {"gamma": 0.0}, {"gamma": 1.5}])
def test_bad_hyperparameters_are_refused(kwargs) -> None:
    with pytest.raises(InvalidArgument):
        LinearHeads.from_head(np.zeros((1, 2)), np.zeros(1), **kwargs)


def test_bad_examples_are_refused() -> None:
    heads = LinearHeads.from_head(np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(InvalidArgument):
        heads.update(np.array([np.nan, 1.0]), 1.0)
    with pytest.raises(InvalidArgument):
        heads.update(np.ones(3), 1.0)


def test_the_posterior_is_the_weights_given_the_bias_so_one_hot_draws_stay_narrow() -> None:
    """One-hot features sum to 1, like the bias: data pin (weights + bias) down but not each.
    Drawn with the bias at its mean, the scores of valid inputs must still be as certain as
    the data make them."""
    rng = np.random.default_rng(0)
    heads = LinearHeads.from_head(np.zeros((1, 4)), np.zeros(1))
    for _ in range(4000):
        x = np.eye(4)[rng.integers(4)]
        heads.update(x, float(rng.random() < 0.2 + 0.15 * x.argmax()))
    posterior = heads.posterior()
    precision = heads.precision()
    np.testing.assert_allclose(posterior.covariance,
                               heads.noise_variance() * np.linalg.inv(precision[:-1, :-1]))
    draws = posterior.sample_scores(np.eye(4), rng, 2000)  # [M, 4]: one score per category
    assert draws.std(axis=0).max() < 0.05  # about 0.4 / sqrt(1000) each, not the prior's 0.5
