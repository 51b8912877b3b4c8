"""What a model expects and what it is: the manifest stored beside every ONNX file.

Serving checks a new version's signature against the policy's feature schema before it swaps
the version in, and callers learn from it how to build a request. Torch-free on purpose: the
server and the learner read manifests without torch installed.

The manifest's ``kind`` names a policy kind (``policyloop/contract/kinds.py``: a ranking policy
over the candidates a request sends, or a fixed action set), which fixes the tensor names and
shapes; ``head`` names the ONNX initializers holding the last linear layer so the online learner
can replace it without torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.kinds import PolicyKind, kind_of

MANIFEST_FORMAT = 1
# A policy's name, as the registry stores it and requests send it.
POLICY_NAME_MAX = 64
POLICY_NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{POLICY_NAME_MAX - 1}}}")
MISSING_FEATURES = ("zero", "error")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; -1 marks a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Categorical:
    """A feature whose values are strings, and the model columns it becomes, so that a user
    never one-hots by hand: with a ``vocabulary``, one column per value (named
    ``<name>=<value>``), and a value outside it sets none (Vowpal Wabbit, too, learns nothing
    from a feature it was never shown); with ``buckets``, that many hashed columns
    (``<name>#<i>``, i = CRC32 of the UTF-8 value modulo ``buckets``), open to any value.

    >>> plan = Categorical("plan", vocabulary=("free", "pro"))
    >>> plan.columns, plan.column("pro"), plan.column("gold")
    (('plan=free', 'plan=pro'), 1, None)
    >>> Categorical("country", buckets=4).column("US")
    0
    """

    name: str
    vocabulary: tuple[str, ...] = ()
    buckets: int = 0

    @property
    def columns(self) -> tuple[str, ...]:
        if self.buckets:
            return tuple(f"{self.name}#{i}" for i in range(self.buckets))
        return tuple(f"{self.name}={value}" for value in self.vocabulary)

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {value: i for i, value in enumerate(self.vocabulary)}

    def column(self, value: str) -> int | None:
        """The position, within ``columns``, of the one column ``value`` sets; None when a
        vocabulary does not hold it."""
        if self.buckets:
            return zlib.crc32(value.encode()) % self.buckets
        return self._positions.get(value)


@dataclass(frozen=True)
class FeatureSchema:
    """Names, in order, of the context features and of the per-action features: the model's
    columns. A categorical feature (``categorical``) stands there as its block of columns."""

    context: tuple[str, ...]
    action: tuple[str, ...] = ()
    # A request that names some features but not all: "zero" fills the rest with 0 (one-hot
    # groups, sparse counts), "error" refuses it, naming what is missing. Not in the hash: it
    # is how requests are read, not what the model computes.
    missing: str = "zero"
    # string-valued features; their columns (so their vocabularies) are in the hash
    categorical: tuple[Categorical, ...] = ()

    def __post_init__(self) -> None:
        if self.missing not in MISSING_FEATURES:
            raise InvalidArgument(f"features.missing: {self.missing!r} is not one of "
                                  f"{list(MISSING_FEATURES)}")

    def fields(self, side: str) -> tuple[tuple[str, Categorical | None], ...]:
        """The features a request or a log row names on ``side`` ("context" or "action"), in
        column order: a numeric one by its column, a categorical one once, for its block.

        >>> FeatureSchema(("age", "plan=free", "plan=pro"),
        ...               categorical=(Categorical("plan", ("free", "pro")),)).fields("context")
        (('age', None), ('plan', Categorical(name='plan', vocabulary=('free', 'pro'), buckets=0)))
        """
        columns = self.context if side == "context" else self.action
        owner = {column: c for c in self.categorical for column in c.columns}
        out: list[tuple[str, Categorical | None]] = []
        for column in columns:
            cat = owner.get(column)
            if cat is None:
                out.append((column, None))
            elif not out or out[-1][1] is not cat:
                out.append((cat.name, cat))
        return tuple(out)

    @property
    def hash(self) -> str:
        """Stable digest of the names and their order; a model trained on another layout of
        features must never be swapped in, even when the sizes agree."""
        payload = json.dumps({"context": list(self.context), "action": list(self.action)})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HeadSpec:
    """Where the neural-linear head lives in the ONNX graph.

    ``weight`` is the name of an initializer of shape [A, H] (qnet) or [1, H] (scoring),
    or its transpose when ``transposed`` is true; ``bias`` one of shape [A] or [1]. An
    imported model whose scores are no linear layer on its embedding has no head: ``weight``
    and ``bias`` empty, ``dim`` the embedding's width (``docs/model-contract.md``).
    """

    weight: str
    bias: str
    dim: int
    transposed: bool = False

    @property
    def learnable(self) -> bool:
        """Whether the online learner can refresh this head (False: served, never learned)."""
        return bool(self.weight)


@dataclass(frozen=True)
class PolicyDefaults:
    """What a policy's spec says about serving and learning it (its ``[exploration]`` and
    ``[reward]`` tables), carried by every version so that each replica and each learner reads
    the same: the strategy ``serve`` uses unless told one, and the reward contract ``learn``
    joins with unless told one. Empty or None: the server's or the learner's own default."""

    strategy: str = ""  # a serving/exploration.py strategy spec, e.g. "thompson"
    window_ms: int | None = None
    default_reward: float | None = None
    reward_rule: str = ""  # "first" or "sum"


@dataclass(frozen=True)
class Manifest:
    """Everything about one model version except the weights."""

    policy: str
    kind: str  # a name in policyloop.contract.kinds.KINDS
    features: FeatureSchema
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    head: HeadSpec
    opset: int
    actions: tuple[str, ...] = ()  # fixed action ids of a qnet policy
    version: int = 0  # assigned by the registry at publish
    parent_version: int | None = None
    created_at: str = ""
    sha256: str = ""  # of model.onnx, set by the registry at publish
    # sha256 of each extra file (head.npz...), set by the registry at publish; a version
    # published before this field existed has none, and its extra files go unchecked
    file_sha256: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    defaults: PolicyDefaults = PolicyDefaults()
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        kind_of(self.kind)  # an unknown kind is refused here, where manifests are made and read

    @property
    def policy_kind(self) -> PolicyKind:
        """The object that knows this kind's tensors, candidates and head."""
        return kind_of(self.kind)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
            return cls(
                policy=raw["policy"],
                kind=raw["kind"],
                features=FeatureSchema(
                    context=tuple(raw["features"]["context"]),
                    action=tuple(raw["features"].get("action", ())),
                    missing=raw["features"].get("missing", "zero"),
                    categorical=tuple(
                        Categorical(c["name"], tuple(c.get("vocabulary", ())),
                                    int(c.get("buckets", 0)))
                        for c in raw["features"].get("categorical", ())),
                ),
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                             for t in raw["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                              for t in raw["outputs"]),
                head=HeadSpec(**raw["head"]),
                opset=int(raw["opset"]),
                actions=tuple(raw.get("actions", ())),
                version=int(raw.get("version", 0)),
                parent_version=raw.get("parent_version"),
                created_at=raw.get("created_at", ""),
                sha256=raw.get("sha256", ""),
                file_sha256={str(k): str(v) for k, v in raw.get("file_sha256", {}).items()},
                training=dict(raw.get("training", {})),
                evaluation=dict(raw.get("evaluation", {})),
                defaults=PolicyDefaults(**raw.get("defaults", {})),
                format=int(raw.get("format", MANIFEST_FORMAT)),
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"manifest is malformed: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"manifest is malformed: {exc!r}") from exc

    @property
    def examples_learned(self) -> int:
        """How many examples this version was learned from, as its training record says:
        an online version's ``examples`` (counted since its learner started), a trained one's
        ``n_logged`` (the rows ``train`` fitted, simulated or from ``--data``); 0 for a created
        or imported version. A growing SquareCB's clock."""
        for key in ("examples", "n_logged"):
            value = self.training.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0

    @property
    def n_actions(self) -> int | None:
        """Size of the fixed action set, or None for a scoring policy."""
        return None if self.policy_kind.per_action_features else len(self.actions)

    def compatible_with(self, other: Manifest) -> str | None:
        """Why ``other`` cannot replace ``self`` in serving, or None when it can."""
        if other.policy != self.policy:
            return f"policy {other.policy!r} != {self.policy!r}"
        if other.kind != self.kind:
            return f"kind {other.kind!r} != {self.kind!r}"
        if other.features.hash != self.features.hash:
            return (f"feature schema hash {other.features.hash} != {self.features.hash}")
        if other.actions != self.actions:
            return "fixed action set differs"
        if [(t.name, t.dtype) for t in other.inputs] != [(t.name, t.dtype) for t in self.inputs]:
            return "model inputs differ"
        return None
