"""The records serving writes to the bus and the learner reads: decisions, rewards, activations.

Each event is a frozen dataclass that travels as compact UTF-8 JSON (``to_bytes`` /
``from_bytes``) under the key ``event_id`` encoded as UTF-8. The three kinds of one event share
that key, so on topics with equal partition counts they land on the same partition number, and
one joiner worker sees all of them.

Scalar floats are written with Python's shortest round-trip ``repr``; the decision's feature
arrays as base64 of their bytes (see ``DecisionEvent``). Both decode to exactly the values
written. NaN and infinity are refused on both sides.

Decoding checks types and refuses what cannot be joined (a chosen index outside the candidates,
propensities not matching the chosen slots) with ``InvalidArgument``; fields a newer writer adds
are ignored, so readers can be upgraded after writers.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from policyloop.contract.errors import InvalidArgument


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v) and abs(v) < 2**1023  # type: ignore[arg-type]


def _float_list(v: object) -> bool:
    return isinstance(v, list) and all(_is_float(x) for x in v)


# Annotation (as written in the dataclasses below) -> check of a decoded JSON value.
_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "str | None": lambda v: v is None or isinstance(v, str),
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "float": _is_float,
    "list[float]": _float_list,
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _as_float(annotation: str, v: Any) -> Any:
    """JSON writers may spell 1.0 as 1: give float fields Python floats back."""
    if v is None:
        return None
    if annotation == "float":
        return float(v)
    if annotation == "list[float]":
        return [float(x) for x in v]
    return v


class _JsonEvent:
    """Shared JSON codec of the event dataclasses (fields checked by their annotation)."""

    event_id: str

    @property
    def key(self) -> bytes:
        """The bus key: ``event_id`` as UTF-8, the same for every record of one event."""
        return self.event_id.encode("utf-8")

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON of every field; InvalidArgument if a float is NaN or infinite."""
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return _dump(type(self).__name__, self.event_id, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode and type-check ``to_bytes`` output; InvalidArgument names the bad field."""
        name = cls.__name__
        try:
            body = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidArgument(f"{name}: not UTF-8 JSON ({e}): {bytes(data[:80])!r}") from e
        if not isinstance(body, dict):
            raise InvalidArgument(f"{name}: expected a JSON object, got {type(body).__name__}")
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            annotation = str(f.type)
            if f.name not in body:
                raise InvalidArgument(f"{name}: field {f.name!r} is missing")
            v = body[f.name]
            if not _CHECKS[annotation](v):
                raise InvalidArgument(
                    f"{name}: field {f.name!r} must be {annotation}, got {str(v)[:80]!r}")
            values[f.name] = _as_float(annotation, v)
        event = cls(**values)
        event._check()
        return event

    def _check(self) -> None:
        """Cross-field checks of a decoded event (none by default)."""


def _dump(name: str, event_id: str, body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; InvalidArgument if a float is NaN or infinite."""
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except ValueError as e:
        raise InvalidArgument(f"{name} {event_id!r} holds NaN or infinity: {e}") from e
    return text.encode("utf-8")


def _load_object(name: str, data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument(f"{name}: not UTF-8 JSON ({e}): {bytes(data[:80])!r}") from e
    if not isinstance(body, dict):
        raise InvalidArgument(f"{name}: expected a JSON object, got {type(body).__name__}")
    return body


def _refuse_constant(token: str) -> float:
    raise ValueError(f"{token} is not allowed")


@dataclass(frozen=True, eq=False)
class DecisionEvent:
    """One logged decision: everything off-policy learning and evaluation need to replay it.

    ``context`` float32[d]; ``action_features`` float32[K, k] or None for fixed-action
    policies; ``chosen`` holds candidate indices into ``action_ids``, one per slot in slot order,
    with the probability each was chosen with in ``propensities`` (same length);
    ``probabilities`` float64[n_slots, K]: the policy's full distribution per slot. ``active``
    is False for a deferred decision, which counts only once an ``ActivationEvent`` arrives. In
    apprentice mode ``chosen`` is the app's ``baseline_action`` (propensity 1) and
    ``policy_action`` is what the policy would have done.

    The arrays travel as base64 of their little-endian bytes inside the JSON object: this record
    is built on the request path, and writing 1,300 floats as decimal text costs half a
    millisecond, while copying their bytes costs a few microseconds. Values are exact.
    """

    event_id: str
    policy: str
    model_version: int
    timestamp_ms: int
    context: np.ndarray
    action_ids: list[str]
    action_features: np.ndarray | None
    chosen: list[int]
    propensities: list[float]
    probabilities: np.ndarray
    strategy: str
    active: bool
    baseline_action: str | None
    policy_action: str | None

    @property
    def key(self) -> bytes:
        """The bus key: ``event_id`` as UTF-8, as for the other events."""
        return self.event_id.encode("utf-8")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecisionEvent) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON; InvalidArgument when a value is NaN or infinite."""
        arrays = [self.context, self.probabilities]
        if self.action_features is not None:
            arrays.append(self.action_features)
        if not all(np.isfinite(a).all() for a in arrays):
            raise InvalidArgument(f"DecisionEvent {self.event_id!r} holds NaN or infinity")
        body = {
            "event_id": self.event_id, "policy": self.policy,
            "model_version": self.model_version, "timestamp_ms": self.timestamp_ms,
            "action_ids": self.action_ids, "chosen": self.chosen,
            "propensities": self.propensities, "strategy": self.strategy,
            "active": self.active, "baseline_action": self.baseline_action,
            "policy_action": self.policy_action,
        }
        # base64 needs no JSON escaping: the arrays are spliced in after the rest is encoded
        # (the encoder would scan every one of their characters).
        head = _dump("DecisionEvent", self.event_id, body)
        features = (b"null" if self.action_features is None
                    else b'"' + _b64(self.action_features, "<f4") + b'"')
        return b"".join((head[:-1], b',"context":"', _b64(self.context, "<f4"),
                         b'","probabilities":"', _b64(self.probabilities, "<f8"),
                         b'","action_features":', features, b"}"))

    @classmethod
    def from_bytes(cls, data: bytes) -> DecisionEvent:
        """Decode and check ``to_bytes`` output; InvalidArgument names the bad field."""
        body = _load_object("DecisionEvent", data)
        checks = {"event_id": "str", "policy": "str", "model_version": "int",
                  "timestamp_ms": "int", "action_ids": "list[str]", "chosen": "list[int]",
                  "propensities": "list[float]", "strategy": "str", "active": "bool",
                  "baseline_action": "str | None", "policy_action": "str | None"}
        for name in (*checks, "context", "action_features", "probabilities"):
            if name not in body:
                raise InvalidArgument(f"DecisionEvent: field {name!r} is missing")
        for name, annotation in checks.items():
            if not _CHECKS[annotation](body[name]):
                raise InvalidArgument(f"DecisionEvent: field {name!r} must be {annotation}, "
                                      f"got {str(body[name])[:80]!r}")
        k = len(body["action_ids"])
        features = body["action_features"]
        event = cls(
            event_id=body["event_id"], policy=body["policy"],
            model_version=body["model_version"], timestamp_ms=body["timestamp_ms"],
            context=_unb64(body["context"], "<f4", "context", np.float32),
            action_ids=body["action_ids"],
            action_features=(None if features is None else _rows(_unb64(
                features, "<f4", "action_features", np.float32), k, "action_features")),
            chosen=body["chosen"], propensities=[float(p) for p in body["propensities"]],
            probabilities=_rows(_unb64(body["probabilities"], "<f8", "probabilities",
                                       np.float64), len(body["chosen"]), "probabilities"),
            strategy=body["strategy"], active=body["active"],
            baseline_action=body["baseline_action"], policy_action=body["policy_action"])
        event._check()
        return event

    def _check(self) -> None:
        if len(self.propensities) != len(self.chosen):
            raise InvalidArgument(
                f"DecisionEvent {self.event_id!r}: {len(self.propensities)} propensities for "
                f"{len(self.chosen)} chosen slots")
        bad = [i for i in self.chosen if not 0 <= i < len(self.action_ids)]
        if bad:
            raise InvalidArgument(
                f"DecisionEvent {self.event_id!r}: chosen index {bad[0]} outside "
                f"[0, {len(self.action_ids)})")
        if self.action_features is not None and len(self.action_features) != len(
                self.action_ids):
            raise InvalidArgument(
                f"DecisionEvent {self.event_id!r}: {len(self.action_features)} action_features "
                f"rows for {len(self.action_ids)} action_ids")
        if self.probabilities.shape[-1:] != (len(self.action_ids),):
            raise InvalidArgument(
                f"DecisionEvent {self.event_id!r}: probabilities shape "
                f"{self.probabilities.shape} for {len(self.action_ids)} action_ids")


def _b64(array: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())


def _rows(array: np.ndarray, rows: int, name: str) -> np.ndarray:
    if rows == 0 or array.size % rows:
        raise InvalidArgument(f"DecisionEvent: field {name!r} has {array.size} values, not "
                              f"{rows} equal rows")
    return array.reshape(rows, -1)


def _unb64(text: object, dtype: str, name: str, as_type: type) -> np.ndarray:
    if not isinstance(text, str):
        raise InvalidArgument(f"DecisionEvent: field {name!r} must be base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise InvalidArgument(f"DecisionEvent: field {name!r} is not base64: {e}") from e
    width = np.dtype(dtype).itemsize
    if len(raw) % width:
        raise InvalidArgument(f"DecisionEvent: field {name!r} has {len(raw)} bytes, not a "
                              f"multiple of {width}")
    array: np.ndarray = np.frombuffer(raw, dtype=dtype).astype(as_type)
    if not np.isfinite(array).all():
        raise InvalidArgument(f"DecisionEvent: field {name!r} holds NaN or infinity")
    return array


REWARD_LIMIT = 1e6
"""Default bound on |reward| for both ends of the loop: serving refuses a larger reward with
INVALID_ARGUMENT, and the learner skips (and counts) one that reached the bus another way, so
one absurd value (a price in cents sent as a click) cannot swamp a model's statistics."""


def usable_reward(value: float, limit: float = REWARD_LIMIT) -> bool:
    """Whether a learner can use ``value``: finite and within ±``limit``."""
    return math.isfinite(value) and abs(value) <= limit


@dataclass(frozen=True)
class RewardEvent(_JsonEvent):
    """The reward the app observed for a decision; ``slot_rewards`` per slot, may be empty.

    ``policy`` may be empty when the app did not say which policy decided.
    """

    event_id: str
    policy: str
    value: float
    slot_rewards: list[float]
    timestamp_ms: int


@dataclass(frozen=True)
class ActivationEvent(_JsonEvent):
    """A deferred decision was really shown: from now on it counts for learning."""

    event_id: str
    policy: str
    timestamp_ms: int
