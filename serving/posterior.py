"""The Gaussian posterior of a neural-linear head, as the learner publishes it (``head.npz``).

Scores are ``embedding @ w + bias`` with ``w ~ N(mean, covariance)``. Scoring policies share one
head over every candidate's embedding (mean [H], covariance [H, H]); fixed-action policies have
one head per action over the context embedding (mean [A, H], covariance [A, H, H]).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from policyloop.errors import InvalidArgument

_JITTER = 1e-9


@dataclass(frozen=True)
class LinearPosterior:
    mean: np.ndarray  # float64[H] or [A, H]
    covariance: np.ndarray  # float64[H, H] or [A, H, H]
    bias: np.ndarray  # float64[1] or [A]
    _chol: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, np.float64)
        cov = np.asarray(self.covariance, np.float64)
        bias = np.asarray(self.bias, np.float64).reshape(-1)
        shared = mean.ndim == 1
        h = mean.shape[-1]
        if mean.ndim not in (1, 2) or cov.shape != ((h, h) if shared else (mean.shape[0], h, h)):
            raise InvalidArgument(f"posterior: mean {mean.shape} and covariance {cov.shape} "
                                  "do not fit ([H] with [H,H], or [A,H] with [A,H,H])")
        if bias.shape != ((1,) if shared else (mean.shape[0],)):
            raise InvalidArgument(f"posterior: bias shape {bias.shape} does not fit mean "
                                  f"{mean.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all() and np.isfinite(bias).all()):
            raise InvalidArgument("posterior: mean, covariance and bias must be finite")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "covariance", cov)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "_chol", _cholesky(cov))

    @property
    def shared(self) -> bool:
        return self.mean.ndim == 1

    def for_actions(self, actions: np.ndarray) -> LinearPosterior:
        """The per-action heads of ``actions`` only (fixed-action policies), in that order."""
        if self.shared:
            return self
        return LinearPosterior(self.mean[actions], self.covariance[actions], self.bias[actions])

    def mean_and_variance(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mu[K] and var[K] of the scores of embedding [K, H] (row k uses head k if per-action)."""
        x = np.asarray(embedding, np.float64)
        if self.shared:
            mu = x @ self.mean + self.bias[0]
            var = np.einsum("kh,hg,kg->k", x, self.covariance, x)
        else:
            mu = np.einsum("kh,kh->k", x, self.mean) + self.bias
            var = np.einsum("kh,khg,kg->k", x, self.covariance, x)
        return mu, np.maximum(var, 0.0)

    def sample_scores(self, embedding: np.ndarray, rng: np.random.Generator,
                      n: int) -> np.ndarray:
        """float64[n, K]: scores of embedding [K, H] under n independent posterior draws."""
        x = np.asarray(embedding, np.float64)
        h = self.mean.shape[-1]
        z = rng.standard_normal((n, h) if self.shared else (n, len(self.mean), h))
        if self.shared:
            w = self.mean + z @ self._chol.T  # [n, H]
            return w @ x.T + self.bias[0]
        w = self.mean + np.einsum("khg,nkg->nkh", self._chol, z)  # [n, K, H]
        return np.einsum("nkh,kh->nk", w, x) + self.bias

    def to_npz_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, covariance=self.covariance, bias=self.bias)
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> LinearPosterior:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return cls(npz["mean"], npz["covariance"], npz["bias"])
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidArgument(f"posterior file is malformed: {exc}") from exc


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor(s); a covariance that is only semi-definite gets a tiny jitter."""
    sym = (cov + np.swapaxes(cov, -1, -2)) / 2
    eye = np.eye(cov.shape[-1])
    for jitter in (0.0, _JITTER, 1e-6, 1e-3):
        try:
            return np.linalg.cholesky(sym + jitter * eye)
        except np.linalg.LinAlgError:
            continue
    raise InvalidArgument("posterior: covariance is not positive semi-definite")
