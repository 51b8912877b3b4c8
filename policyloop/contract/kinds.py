"""Policy kinds: what differs between a policy that ranks the candidates a request sends and one
that picks from a fixed action set.

Everything kind-specific lives in one object per kind: the tensor names and shapes of the ONNX
signature, how a request's candidates are read, how many rows the neural-linear head has, and
how a logged decision becomes a training example. Serving, the learner, evaluation and export
ask the kind (``kind_of(manifest.kind)``) instead of comparing the kind's name, so adding a kind
means one class here, its torch network in ``models/policies.py``, and one line in ``KINDS``.

In both kinds ``scores = embedding @ head.weight.T + head.bias``:

- ``scoring`` (``Ranking``): inputs ``context`` float32[B, Dc] and ``action_features``
  float32[B, K, Da]; outputs ``scores`` float32[B, K] and ``embedding`` float32[B, K, H]; one
  head row shared by every candidate.
- ``qnet`` (``FixedActions``): input ``context`` float32[B, Dc]; outputs ``scores`` float32[B, A]
  and ``embedding`` float32[B, H]; one head row per action.

>>> kind_of("qnet").head_rows(6), kind_of("scoring").head_rows(0)
(6, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from policyloop.contract.errors import InvalidArgument

if TYPE_CHECKING:
    from policyloop.contract.events import DecisionEvent
    from policyloop.contract.signature import TensorSpec

# (context float32[B, Dc], action_features float32[B, K, Da] or None) -> (scores, embedding)
Run = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Logged:
    """One logged decision as model inputs (batch of one).

    ``context`` float32[1, Dc]; ``action_features`` float32[1, K, Da] or None; ``allowed`` the
    score columns the request allowed (fixed action sets) or None (every column is a
    candidate); ``column`` the logged action's column in the scores, which is also the head
    row that scored it when the kind has one head row per action.
    """

    context: np.ndarray
    action_features: np.ndarray | None
    allowed: np.ndarray | None
    column: int

    @property
    def head(self) -> int:
        """The head row that scored the logged action."""
        return 0 if self.allowed is None else self.column

    def greedy(self, scores: np.ndarray) -> int:
        """The column a greedy policy picks from this decision's ``scores`` [columns]."""
        if self.allowed is None:
            return int(np.argmax(scores))
        return int(self.allowed[int(np.argmax(scores[self.allowed]))])


def example(kind: PolicyKind, run: Run, positions: Mapping[str, int],
            decision: DecisionEvent) -> tuple[np.ndarray, Logged]:
    """What the head learners fit on: the embeddings float64 [K, H] (one per candidate) or
    [H] (the context's, for a head row per action), and the decision as ``Logged``."""
    logged = kind.logged(decision, positions)
    _, emb = run(logged.context, logged.action_features)
    return emb[0].astype(np.float64), logged


class PolicyKind(Protocol):
    name: str  # the manifest's ``kind``
    per_action_features: bool  # candidates carry features (and the model takes them)

    def signature(self, *, context_dim: int, action_dim: int, n_actions: int,
                  head_dim: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The ONNX inputs and outputs a model of this kind declares (-1: dynamic axis)."""

    def feeds(self, context: np.ndarray,
              action_features: np.ndarray | None) -> dict[str, np.ndarray]:
        """onnxruntime feeds for a batch."""

    def head_rows(self, n_actions: int) -> int:
        """Rows of the head's weight [rows, H]."""

    def score_width(self, candidates: int, n_actions: int) -> int:
        """Columns of ``scores`` for a batch of ``candidates`` candidates per row."""

    def candidates(self, ids: Sequence[str], n_feature_rows: int, actions: Sequence[str],
                   positions: Mapping[str, int]) -> tuple[list[str], np.ndarray | None]:
        """A request's candidate ids (defaulted where the kind allows) and the positions of
        the allowed actions in the model's scores (None: each candidate is its own column).
        ``n_feature_rows`` is how many candidates came with features. Raises InvalidArgument
        naming the candidate that is wrong."""

    def logged(self, decision: DecisionEvent, positions: Mapping[str, int]) -> Logged:
        """A logged decision as model inputs: what to feed, which columns of the scores were
        allowed, and the column of the logged action."""


class Ranking:
    """``scoring``: the model scores each candidate the request sends, from its features."""

    name = "scoring"
    per_action_features = True

    def signature(self, *, context_dim: int, action_dim: int, n_actions: int,
                  head_dim: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        from policyloop.contract.signature import TensorSpec

        return ((TensorSpec("context", "float32", (-1, context_dim)),
                 TensorSpec("action_features", "float32", (-1, -1, action_dim))),
                (TensorSpec("scores", "float32", (-1, -1)),
                 TensorSpec("embedding", "float32", (-1, -1, head_dim))))

    def feeds(self, context: np.ndarray,
              action_features: np.ndarray | None) -> dict[str, np.ndarray]:
        if action_features is None:
            raise InvalidArgument("a ranking policy needs action_features")
        return {"context": context, "action_features": action_features}

    def head_rows(self, n_actions: int) -> int:
        return 1

    def score_width(self, candidates: int, n_actions: int) -> int:
        return candidates

    def candidates(self, ids: Sequence[str], n_feature_rows: int, actions: Sequence[str],
                   positions: Mapping[str, int]) -> tuple[list[str], np.ndarray | None]:
        if not ids:
            raise InvalidArgument("candidates is empty: this policy ranks the candidates you "
                                  "send")
        if n_feature_rows != len(ids):
            raise InvalidArgument("candidates: every candidate needs features")
        return list(ids), None

    def logged(self, decision: DecisionEvent, positions: Mapping[str, int]) -> Logged:
        return Logged(np.asarray(decision.context, np.float32)[None],
                      np.asarray(decision.action_features, np.float32)[None], None,
                      decision.chosen[0])


class FixedActions:
    """``qnet``: the model scores a fixed, named action set; a request may restrict it."""

    name = "qnet"
    per_action_features = False

    def signature(self, *, context_dim: int, action_dim: int, n_actions: int,
                  head_dim: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        from policyloop.contract.signature import TensorSpec

        return ((TensorSpec("context", "float32", (-1, context_dim)),),
                (TensorSpec("scores", "float32", (-1, n_actions)),
                 TensorSpec("embedding", "float32", (-1, head_dim))))

    def feeds(self, context: np.ndarray,
              action_features: np.ndarray | None) -> dict[str, np.ndarray]:
        return {"context": context}

    def head_rows(self, n_actions: int) -> int:
        return n_actions

    def score_width(self, candidates: int, n_actions: int) -> int:
        return n_actions

    def candidates(self, ids: Sequence[str], n_feature_rows: int, actions: Sequence[str],
                   positions: Mapping[str, int]) -> tuple[list[str], np.ndarray | None]:
        ids = list(ids) or list(actions)
        unknown = [a for a in ids if a not in positions]
        if unknown:
            raise InvalidArgument(f"candidates: unknown action id {unknown[0]!r}; actions are "
                                  f"{list(actions)}")
        if n_feature_rows:
            raise InvalidArgument("candidates: this policy has a fixed action set and takes "
                                  "no per-action features")
        return ids, np.fromiter((positions[a] for a in ids), dtype=np.int64, count=len(ids))

    def logged(self, decision: DecisionEvent, positions: Mapping[str, int]) -> Logged:
        allowed = np.array([positions[a] for a in decision.action_ids], np.int64)
        return Logged(np.asarray(decision.context, np.float32)[None], None, allowed,
                      int(allowed[decision.chosen[0]]))


KINDS: dict[str, PolicyKind] = {kind.name: kind for kind in (Ranking(), FixedActions())}


def kind_of(name: str) -> PolicyKind:
    """The kind a manifest names; InvalidArgument for an unknown one.

    >>> kind_of("ranking")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    policyloop.contract.errors.InvalidArgument: unknown policy kind 'ranking'; kinds are [...]
    """
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown policy kind {name!r}; kinds are {list(KINDS)}") from None
