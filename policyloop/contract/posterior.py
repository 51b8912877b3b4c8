"""The Gaussian posterior of a neural-linear head, as the learner publishes it (``head.npz``).

Scores are ``embedding @ w + bias`` with ``w ~ N(mean, covariance)``; the covariance is Cov(w)
itself, any noise-variance scale already applied. Two layouts:

- shared head (scoring policies): mean [H], covariance [H, H], bias [1]; every candidate's
  embedding row is scored by the same w, so candidates' scores are correlated;
- per-action heads (qnet): mean [A, H], covariance [A, H, H], bias [A]; independent heads,
  row k scored by head ``actions[k]`` (by default head k).

A square root ``F`` of each covariance (``F @ F.T == covariance``) is computed once, at
construction: a Cholesky factor when the covariance is positive definite. A covariance that is
only semi-definite (rank-deficient, or with eigenvalues a rounding error below zero) is
factored through its eigendecomposition instead, those eigenvalues clipped to zero; that is a
projection onto the nearest PSD matrix, not a jitter, so it adds no variance. A covariance with
clearly negative eigenvalues (below -1e-6 times the largest) or clearly asymmetric is rejected.
Variances and posterior draws both come from ``F``, so UCB and Thompson see the same posterior.

``noise`` (optional, float64[1] or [A]) is each head's noise variance, the scale the learner
gives one more example: with it, ``observed`` shrinks the covariance by a decision the learner
will fit before its reward is known, and ``nudge`` moves the mean by the reward once it comes
(serving's pending decisions, ``serving/dataplane.py``).

>>> p = LinearPosterior(np.zeros(2), np.diag([1.0, 4.0]), np.array([0.5]))
>>> mu, var = p.mean_and_variance(np.array([[1.0, 0.0], [0.0, 1.0]]))
>>> mu.tolist(), var.tolist()
([0.5, 0.5], [1.0, 4.0])
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from policyloop.contract.errors import InvalidArgument

_ASYMMETRY = 1e-6  # tolerated |C - C.T| relative to max |C|
_NEGATIVE = 1e-6  # tolerated negative eigenvalue relative to the largest one


@dataclass(frozen=True, eq=False)
class LinearPosterior:
    """Gaussian posterior of the neural-linear head, as published by the learner.

    The arrays are copied to float64 and made read-only, so the cached factor cannot go stale.
    """

    mean: np.ndarray  # float64[H] (shared head) or [A, H] (per-action heads)
    covariance: np.ndarray  # float64[H, H] or [A, H, H]: Cov(w)
    bias: np.ndarray  # float64[1] or [A]
    noise: np.ndarray | None = None  # float64[1] or [A]: each head's noise variance
    _factor: np.ndarray = field(init=False, repr=False)  # F with F @ F.T == covariance

    def __post_init__(self) -> None:
        mean = _float_array("mean", self.mean)
        cov = _float_array("covariance", self.covariance)
        bias = _float_array("bias", self.bias).reshape(-1)
        if mean.ndim not in (1, 2) or mean.shape[-1] == 0:
            raise InvalidArgument(f"posterior: mean must be [H] or [A, H], got shape "
                                  f"{mean.shape}")
        h = mean.shape[-1]
        shared = mean.ndim == 1
        if cov.shape != ((h, h) if shared else (mean.shape[0], h, h)):
            raise InvalidArgument(f"posterior: covariance shape {cov.shape} does not fit mean "
                                  f"{mean.shape} ([H] with [H, H], or [A, H] with [A, H, H])")
        if bias.shape != ((1,) if shared else (mean.shape[0],)):
            raise InvalidArgument(f"posterior: bias shape {bias.shape} does not fit mean "
                                  f"{mean.shape} ([1] for [H], [A] for [A, H])")
        noise = None
        if self.noise is not None:
            noise = _float_array("noise", self.noise).reshape(-1)
            if noise.shape != bias.shape or not (noise > 0).all():
                raise InvalidArgument(f"posterior: noise must be {bias.shape[0]} positive "
                                      f"variances (one per head), got {noise.tolist()[:8]}")
        self._set(mean, cov, bias, _square_root(cov), noise)

    def _set(self, mean: np.ndarray, cov: np.ndarray, bias: np.ndarray,
             factor: np.ndarray, noise: np.ndarray | None, *, writeable: bool = False) -> None:
        """Freeze and store the arrays (``writeable``: mean, covariance and factor stay
        writable, for ``narrow`` and ``nudge``)."""
        for name, value in (("mean", mean), ("covariance", cov), ("bias", bias),
                            ("_factor", factor), ("noise", noise)):
            if value is not None:
                value.flags.writeable = writeable and name in ("mean", "covariance", "_factor")
            object.__setattr__(self, name, value)

    @property
    def shared(self) -> bool:
        """One head for every candidate (scoring), rather than one per action (qnet)."""
        return self.mean.ndim == 1

    @property
    def dim(self) -> int:
        """H, the embedding width."""
        return int(self.mean.shape[-1])

    def for_actions(self, actions: np.ndarray) -> LinearPosterior:
        """The per-action heads ``actions`` (distinct, int64[K]) as heads 0..K-1; a shared head
        is returned as it is. Slices the cached factors: cheap enough per request."""
        if self.shared:
            return self
        heads = self._heads(actions, len(actions))
        if np.unique(heads).size != heads.size:
            raise InvalidArgument(f"actions must be distinct, got {heads.tolist()}")
        sub = object.__new__(LinearPosterior)
        sub._set(self.mean[heads], self.covariance[heads], self.bias[heads],
                 self._factor[heads], None if self.noise is None else self.noise[heads])
        return sub

    def observed(self, row: np.ndarray, head: int = 0) -> LinearPosterior:
        """This posterior once its learner has fitted one more example of embedding ``row``
        [H], scored by ``head`` (per-action heads), whatever the reward: the mean kept, each
        covariance as a ridge regression's after that row, ``C - C x x^T C / (noise +
        x^T C x)``, and its factor by the matching rank-one update (O(H^2), no new
        factorisation). Serving applies it to each decision it makes until the next version
        arrives (pending observations, as GP-BUCB: Desautels et al., JMLR 2014): without it a
        deterministic UCB sends every decision between two versions to the same most
        uncertain action. A posterior without ``noise`` (a file from before it) is returned
        as it is."""
        if self.noise is None:
            return self
        out = self.narrowable()
        out.narrow(row, head)
        return out

    def narrowable(self) -> LinearPosterior:
        """A private copy whose covariance ``narrow`` updates in place: serving copies a
        version's posterior once and narrows it by each decision, where ``observed`` would
        copy every head's [H, H] matrices per decision."""
        out = object.__new__(LinearPosterior)
        out._set(self.mean.copy(), self.covariance.copy(), self.bias, self._factor.copy(),
                 self.noise, writeable=True)
        return out

    def narrow(self, row: np.ndarray, head: int = 0) -> float:
        """``observed`` in place, on a copy from ``narrowable`` (no-op without ``noise``).
        Returns the row's predicted score: narrowing is observing the row at that score,
        which leaves the mean as it is until ``nudge`` replaces it by the reward."""
        x = self._row(row, head)
        predicted = float(x @ (self.mean if self.shared else self.mean[head]) + self.bias[head])
        if self.noise is None:
            return predicted
        if not self._factor.flags.writeable:
            raise ValueError("narrow needs a copy from narrowable(); use observed()")
        factor = self._factor if self.shared else self._factor[head]  # views: updated in place
        cov = self.covariance if self.shared else self.covariance[head]
        u = factor.T @ x  # C x = F u, x^T C x = |u|^2
        uu = float(u @ u)
        if not uu > 0:
            return predicted
        noise = float(self.noise[head])
        cu = factor @ u
        # (I - c u u^T)^2 = I - u u^T / (noise + |u|^2) for this c
        c = (1.0 - np.sqrt(noise / (noise + uu))) / uu
        add_outer(factor, -c, cu, u)
        add_outer(cov, -1.0 / (noise + uu), cu, cu)
        return predicted

    def nudge(self, row: np.ndarray, head: int, delta: float) -> None:
        """The reward of a row ``narrow`` observed at its predicted score has come: ``delta``
        is the reward minus that score. The mean moves by ``C x delta / noise``, C the
        covariance now: the posterior mean is linear in the observed scores, so this is the
        Bayesian linear regression's mean with this row's reward and every other narrowed
        row still at its predicted score, in any order (tests/test_exploration.py). Serving
        applies each reward that reaches its replica, so between two versions it learns as
        LinUCB does, and the next version replaces it with the learner's."""
        x = self._row(row, head)
        if self.noise is None or not np.isfinite(delta):
            return
        if not self.mean.flags.writeable:
            raise ValueError("nudge needs a copy from narrowable()")
        cov = self.covariance if self.shared else self.covariance[head]
        mean = self.mean if self.shared else self.mean[head]  # a view: updated in place
        mean += cov @ x * (float(delta) / float(self.noise[head]))

    def _row(self, row: np.ndarray, head: int) -> np.ndarray:
        x = np.asarray(row, np.float64)
        if x.shape != (self.dim,) or not np.isfinite(x).all():
            raise InvalidArgument(f"row must be {self.dim} finite values, got shape {x.shape}")
        if not (0 <= head < len(self.bias)):
            raise InvalidArgument(f"head must be in 0..{len(self.bias) - 1}, got {head}")
        return x

    def mean_and_variance(self, embedding: np.ndarray,
                          actions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean mu float64[K] and variance var float64[K] (>= 0) of the score of
        each row of ``embedding`` [K, H]; ``actions`` int64[K]: the head of each row
        (per-action heads only; default row k uses head k)."""
        mu, noise, _ = self._project(embedding, actions)
        return mu, np.einsum("kh,kh->k", noise, noise)

    def sample_scores(self, embedding: np.ndarray, rng: np.random.Generator, n: int,
                      actions: np.ndarray | None = None) -> np.ndarray:
        """float64[n, K]: the scores of the rows of ``embedding`` [K, H] under ``n``
        independent posterior draws of the weights (jointly, so a shared head's candidates
        stay correlated, and rows using one per-action head share its draw)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise InvalidArgument(f"n must be an int >= 1, got {n!r}")
        mu, noise, heads = self._project(embedding, actions)
        if self.shared:  # score_k = mu_k + (F^T x_k) . z, one z [H] per draw
            return mu + rng.standard_normal((n, self.dim)) @ noise.T
        if heads is None:  # distinct independent heads: independent Gaussian scores
            return mu + rng.standard_normal((n, len(mu))) * np.sqrt(
                np.einsum("kh,kh->k", noise, noise))
        unique, inverse = np.unique(heads, return_inverse=True)
        z = rng.standard_normal((n, unique.size, self.dim))
        return mu + np.einsum("nkh,kh->nk", z[:, inverse], noise)

    def _project(self, embedding: np.ndarray, actions: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """mu[K], noise[K, H] with score_k = mu_k + noise_k . z_(head of k), z ~ N(0, I);
        and the rows' heads when some per-action head is used by more than one row."""
        x = np.asarray(embedding, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidArgument(f"embedding must be [K, {self.dim}], got shape {x.shape}")
        if self.shared:
            if actions is not None:
                raise InvalidArgument("actions: a shared head scores every row; pass none")
            return x @ self.mean + self.bias[0], x @ self._factor, None
        if actions is None:
            if len(x) != len(self.mean):
                raise InvalidArgument(f"embedding has {len(x)} rows for {len(self.mean)} "
                                      "per-action heads; pass actions to say which is which")
            mean, bias, factor, repeated = self.mean, self.bias, self._factor, None
        else:
            heads = self._heads(actions, len(x))
            mean, bias, factor = self.mean[heads], self.bias[heads], self._factor[heads]
            repeated = heads if np.unique(heads).size < heads.size else None
        mu = np.einsum("kh,kh->k", x, mean) + bias
        return mu, np.matmul(x[:, None, :], factor)[:, 0, :], repeated

    def _heads(self, actions: np.ndarray, rows: int) -> np.ndarray:
        heads = np.asarray(actions)
        if heads.shape != (rows,) or heads.dtype.kind not in "iu":
            raise InvalidArgument(f"actions must be int[{rows}], got {heads.dtype}"
                                  f"{list(heads.shape)}")
        if rows and not (0 <= heads.min() and heads.max() < len(self.mean)):
            raise InvalidArgument(f"actions must be in 0..{len(self.mean) - 1}, got "
                                  f"{heads.tolist()}")
        return heads

    def to_npz_bytes(self) -> bytes:
        buffer = io.BytesIO()
        if self.noise is None:
            np.savez(buffer, mean=self.mean, covariance=self.covariance, bias=self.bias)
        else:
            np.savez(buffer, mean=self.mean, covariance=self.covariance, bias=self.bias,
                     noise=self.noise)
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> LinearPosterior:
        """Read ``head.npz`` (keys mean, covariance, bias, optionally noise); InvalidArgument
        when malformed."""
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InvalidArgument(f"posterior file is not an npz archive: {exc}") from exc
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise InvalidArgument("posterior file is a single array, not an npz archive")
        with npz:
            missing = sorted({"mean", "covariance", "bias"} - set(npz.files))
            if missing:
                raise InvalidArgument(f"posterior file lacks {missing}; has {npz.files}")
            try:
                arrays = npz["mean"], npz["covariance"], npz["bias"]
                noise = npz["noise"] if "noise" in npz.files else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise InvalidArgument(f"posterior file is malformed: {exc}") from exc
        return cls(*arrays, noise=noise)


def _float_array(name: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise InvalidArgument(f"posterior: {name} must be real numbers, got dtype {array.dtype}")
    array = np.array(array, dtype=np.float64)  # a copy: the caller's array stays theirs
    if not np.isfinite(array).all():
        raise InvalidArgument(f"posterior: {name} has NaN or infinite values")
    return array


def _square_root(cov: np.ndarray) -> np.ndarray:
    """F [.., H, H] with F @ F.T == cov: Cholesky, else the eigendecomposition of a PSD cov."""
    transposed = np.swapaxes(cov, -1, -2)
    scale = float(np.abs(cov).max()) if cov.size else 0.0
    if np.abs(cov - transposed).max(initial=0.0) > _ASYMMETRY * scale:
        raise InvalidArgument("posterior: covariance is not symmetric")
    sym = (cov + transposed) / 2
    try:
        return np.linalg.cholesky(sym)
    except np.linalg.LinAlgError:
        pass
    values, vectors = np.linalg.eigh(sym)
    top = np.abs(values).max(axis=-1, keepdims=True)
    if (values < -_NEGATIVE * top).any():
        raise InvalidArgument(f"posterior: covariance is not positive semi-definite (smallest "
                              f"eigenvalue {values.min():.3g}, largest {top.max():.3g})")
    return vectors * np.sqrt(np.clip(values, 0.0, None))[..., None, :]


def add_outer(matrix: np.ndarray, alpha: float, x: np.ndarray, y: np.ndarray) -> None:
    """``matrix += alpha * outer(x, y)`` in place, by BLAS's rank-one update (``dger``) on a
    C-contiguous float64 matrix, NumPy's outer product on any other. Serving narrows the
    posterior by this inside each decision and the learner adds each example by it: on a
    288-wide head (the recommendation stream of bench/bandit_bench.py) ``dger`` takes about
    10 µs where ``outer`` and a subtraction take about 105 µs."""
    if matrix.dtype == np.float64 and matrix.flags.c_contiguous and matrix.ndim == 2:
        # the transpose is a Fortran-ordered matrix dger updates in place: M^T += a y x^T
        out = _dger()(alpha, np.asarray(y, np.float64), np.asarray(x, np.float64),
                      a=matrix.T, overwrite_a=True)
        if np.may_share_memory(out, matrix):
            return
    matrix += alpha * np.outer(x, y)


@functools.cache
def _dger() -> Callable[..., np.ndarray]:
    """SciPy's BLAS, imported on first use (it costs a process about 0.4 s, which a command
    that never narrows or learns should not pay), and every BLAS of the process held to one
    thread from then on: SciPy's OpenBLAS and NumPy's each keep a thread pool, and on two
    cores the two pools spun against each other (the recommendation stream of
    bench/bandit_bench.py fell from 1,000 to 71 events/s); these products are too small to
    gain from threads, and ONNX Runtime has its own."""
    from scipy.linalg.blas import dger
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    return dger
