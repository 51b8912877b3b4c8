"""What the client takes and gives back: plain Python values in, frozen dataclasses out.

Features are a dict of named numbers (names from ``PolicyInfo.context_features`` /
``action_features``; an unknown name is refused; names left out are zero, or refused when the
policy's spec says ``features.missing = "error"``), where a categorical feature of the spec
takes its value as a string (``{"plan": "pro"}``), or a sequence of
numbers in the policy's schema order (a list, a tuple, a numpy array). Candidates are action ids
(fixed-action policies; they restrict the choice to those actions) or, for ranking policies,
each id with its own features, as ``{"id": ..., "features": ...}`` or an ``(id, features)``
pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

Features: TypeAlias = Mapping[str, float | str] | Sequence[float]
Candidate: TypeAlias = str | tuple[str, Features] | Mapping[str, Any]


@dataclass(frozen=True)
class Request:
    """One row of ``decide_batch``: the arguments of ``decide``.

    >>> Request("routing", {"queue_load": 0.3}, ["billing", "tech"]).slots is None
    True
    """

    policy: str
    context: Features
    candidates: Sequence[Candidate] | None = None
    slots: int | None = None
    event_id: str | None = None
    deferred: bool = False
    seed: int | None = None
    baseline_action: str | None = None


@dataclass(frozen=True)
class Slot:
    """One filled slot: the action, its position in the request's candidates (or in the fixed
    action set when none were sent), and the probability it was chosen with, given the slots
    before it, under the distribution the server sampled from."""

    action: str
    index: int
    propensity: float


@dataclass(frozen=True)
class Decision:
    """The server's answer to one ``decide``.

    ``chosen`` holds one ``Slot`` per requested slot, in slot order; ``action`` and
    ``propensity`` are the first slot's. ``ranking`` lists every candidate id by score, best
    first. ``active`` is False for a deferred decision until ``activate(event_id)``. In
    apprentice mode ``action`` is your ``baseline_action`` and ``policy_action`` what the
    policy would have chosen (None otherwise).

    >>> d = Decision("e-1", "routing", (Slot("tech", 1, 0.7),), ("tech", "billing"),
    ...              "softmax(temperature=0.5)", 3, True)
    >>> d.action, d.propensity
    ('tech', 0.7)
    """

    event_id: str
    policy: str
    chosen: tuple[Slot, ...]
    ranking: tuple[str, ...]
    strategy: str
    model_version: int
    active: bool
    policy_action: str | None = None

    @property
    def action(self) -> str:
        return self.chosen[0].action

    @property
    def propensity(self) -> float:
        return self.chosen[0].propensity


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, dtype and shape (-1 marks a dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Categorical:
    """A string-valued feature: its ``vocabulary`` (a column per value), or ``buckets``
    hashed columns when it has none."""

    name: str
    vocabulary: tuple[str, ...]
    buckets: int


@dataclass(frozen=True)
class PolicyInfo:
    """What a served policy expects.

    ``kind`` is ``"scoring"`` (ranks the candidates you send, each with ``action_features``)
    or ``"qnet"`` (a fixed set of ``actions``). ``context_features`` are the context's names in
    schema order, which is also the order of a dense context; a categorical feature
    (``categorical``) stands there as its columns, and is sent by its name with a string. In
    ``list_policies`` a policy with no model loaded yet has only its name (``model_version``
    0). ``damage`` says why
    the server does not serve the registry's current version (it failed its checks and an
    older intact one serves, or none does); empty when it does.
    """

    policy: str
    model_version: int
    kind: str
    strategy: str
    context_features: tuple[str, ...]
    action_features: tuple[str, ...]
    actions: tuple[str, ...]
    max_candidates: int
    apprentice: bool
    pinned: bool
    feature_schema_hash: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    damage: str = ""
    categorical: tuple[Categorical, ...] = ()
