"""Off-policy evaluation: the value a target policy would have had, from logged bandit data.

Notation, per logged event i: reward r_i, the logging policy's probability p_i of the logged
action, the target policy's probability pi_i of that same action, importance weight
w_i = pi_i / p_i (optionally clipped at M: min(w_i, M)).

- IPS:   V = mean(w_i r_i)
- SNIPS: V = sum(w_i r_i) / sum(w_i)                  (self-normalised; bounded by the rewards)
- DR:    V = mean(qpi_i + w_i (r_i - q_i))           (doubly robust, Dudik et al. 2011)
  with q_i a reward model's prediction for the logged action and qpi_i its expectation under
  the target policy. With an action-independent reward model (q_i = qpi_i = baseline(x_i)),
  DR is IPS with a control variate and needs only pi_i, not the target's full distribution.

Confidence intervals are normal approximations: mean +- z * sd / sqrt(n) for IPS and DR, and the
delta method for SNIPS. Weights are computed in float64 from the two probabilities, so logging
propensities down to 1e-12 are fine; the result says how many weights were clipped, the largest
weight and the effective sample size (sum w)^2 / sum w^2, which is what to look at when the
interval seems too good to be true.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from policyloop.contract.errors import InvalidArgument


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    ci_low: float
    ci_high: float
    stderr: float
    n: int
    clipped: int
    max_weight: float
    effective_sample_size: float


def _arrays(rewards: np.ndarray, logging_p: np.ndarray,
            target_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(rewards, np.float64)
    p = np.asarray(logging_p, np.float64)
    pi = np.asarray(target_p, np.float64)
    if not (r.ndim == p.ndim == pi.ndim == 1 and len(r) == len(p) == len(pi)):
        raise InvalidArgument(f"rewards, propensities and target probabilities must be 1-d of "
                              f"one length, got {r.shape}, {p.shape}, {pi.shape}")
    if len(r) == 0:
        raise InvalidArgument("no logged events to evaluate")
    for name, a in (("reward", r), ("propensity", p), ("target probability", pi)):
        if not np.isfinite(a).all():
            raise InvalidArgument(f"{name} has NaN or infinite values (row "
                                  f"{int(np.flatnonzero(~np.isfinite(a))[0])})")
    if (p <= 0).any() or (p > 1).any():
        row = int(np.flatnonzero((p <= 0) | (p > 1))[0])
        raise InvalidArgument(f"propensity must be in (0, 1], row {row} has {p[row]!r}")
    if (pi < 0).any() or (pi > 1).any():
        row = int(np.flatnonzero((pi < 0) | (pi > 1))[0])
        raise InvalidArgument(f"target probability must be in [0, 1], row {row} has {pi[row]!r}")
    return r, p, pi


def _weights(p: np.ndarray, pi: np.ndarray, clip: float | None) -> tuple[np.ndarray, int]:
    w = pi / p
    if clip is None:
        return w, 0
    if not clip > 0:
        raise InvalidArgument(f"clip must be > 0, got {clip!r}")
    return np.minimum(w, clip), int((w > clip).sum())


def _normal(name: str, terms: np.ndarray, w: np.ndarray, clipped: int,
            alpha: float) -> Estimate:
    n = len(terms)
    value = float(terms.mean())
    stderr = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return Estimate(name, value, value - z * stderr, value + z * stderr, stderr, n, clipped,
                    float(w.max()), _ess(w))


def _ess(w: np.ndarray) -> float:
    total = w.sum()
    squares = (w * w).sum()
    return float(total * total / squares) if squares > 0 else 0.0


def ips(rewards: np.ndarray, logging_p: np.ndarray, target_p: np.ndarray, *,
        clip: float | None = None, alpha: float = 0.05) -> Estimate:
    r, p, pi = _arrays(rewards, logging_p, target_p)
    w, clipped = _weights(p, pi, clip)
    return _normal("ips", w * r, w, clipped, alpha)


def snips(rewards: np.ndarray, logging_p: np.ndarray, target_p: np.ndarray, *,
          clip: float | None = None, alpha: float = 0.05) -> Estimate:
    r, p, pi = _arrays(rewards, logging_p, target_p)
    w, clipped = _weights(p, pi, clip)
    n = len(r)
    if w.sum() == 0:
        raise InvalidArgument("the target policy gives probability 0 to every logged action")
    value = float((w * r).sum() / w.sum())
    influence = w * (r - value) / w.mean()  # delta method
    stderr = float(np.sqrt((influence ** 2).mean() / n)) if n > 1 else float("inf")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return Estimate("snips", value, value - z * stderr, value + z * stderr, stderr, n, clipped,
                    float(w.max()), _ess(w))


def dr(rewards: np.ndarray, logging_p: np.ndarray, target_p: np.ndarray,
       q_logged: np.ndarray, q_target: np.ndarray, *, clip: float | None = None,
       alpha: float = 0.05) -> Estimate:
    """``q_logged`` [n]: reward model at the logged action; ``q_target`` [n]: its expectation
    under the target policy."""
    r, p, pi = _arrays(rewards, logging_p, target_p)
    q = np.asarray(q_logged, np.float64)
    qpi = np.asarray(q_target, np.float64)
    if q.shape != r.shape or qpi.shape != r.shape:
        raise InvalidArgument(f"reward model predictions must have shape {r.shape}")
    w, clipped = _weights(p, pi, clip)
    return _normal("dr", qpi + w * (r - q), w, clipped, alpha)


def ridge_baseline(features: np.ndarray, rewards: np.ndarray, *,
                   l2: float = 1.0) -> np.ndarray:
    """An action-independent reward model for DR: ridge regression of reward on the context,
    fitted by cross-fitting (two folds) so no event's prediction has seen its own reward.
    features [n, d] -> predictions [n]."""
    x = np.asarray(features, np.float64)
    y = np.asarray(rewards, np.float64)
    x = np.hstack([x, np.ones((len(x), 1))])
    half = len(y) // 2
    out = np.empty(len(y))
    for fit, apply in ((slice(half, None), slice(0, half)), (slice(0, half), slice(half, None))):
        xf, yf = x[fit], y[fit]
        if len(yf) == 0:
            out[apply] = y.mean()
            continue
        beta = np.linalg.solve(xf.T @ xf + l2 * np.eye(x.shape[1]), xf.T @ yf)
        out[apply] = x[apply] @ beta
    return out
