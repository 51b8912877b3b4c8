"""Plain values to ``policyloop.v1`` messages and back; nothing here talks to the network.

A value protobuf would refuse (a string feature, a negative seed) is refused here as
``InvalidArgument`` naming the field and the value, as the server would name it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc

from policyloop_client._proto import decision_pb2 as pb
from policyloop_client.errors import InvalidArgument
from policyloop_client.types import (
    Candidate,
    Categorical,
    Decision,
    Features,
    PolicyInfo,
    Request,
    Slot,
    TensorSpec,
)

_MAX_DEADLINE_MS = 2**32 - 1


def _refused(method: str, message: str) -> InvalidArgument:
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, message, method)


def features(values: Features, what: str, method: str) -> pb.Features:
    """A dict becomes named values (a string: a categorical feature's value), any other
    sequence dense values in schema order.

    >>> features({"age": 31, "mobile": True}, "context", "Decide").named["age"]
    31.0
    >>> features({"age": 31, "plan": "pro"}, "context", "Decide").categorical["plan"]
    'pro'
    >>> features(["x"], "context", "Decide")
    Traceback (most recent call last):
    ...
    policyloop_client.errors.InvalidArgument: Decide: INVALID_ARGUMENT: context[0] is 'x': \
feature values must be numbers
    """
    if isinstance(values, Mapping):
        named: dict[Any, Any] = {}
        categorical: dict[Any, str] = {}
        for name, value in values.items():
            if isinstance(value, str):
                categorical[name] = value
            else:
                named[name] = value
        try:
            return pb.Features(named=named, categorical=categorical)
        except (TypeError, ValueError):
            for name in [*named, *categorical]:
                if not isinstance(name, str):
                    raise _refused(method, f"{what}: feature name {name!r} must be a "
                                   "string") from None
            for name, value in named.items():
                try:
                    pb.Features(named={name: value})
                except (TypeError, ValueError):
                    raise _refused(method, f"{what}[{name!r}] is {value!r}: feature values "
                                   "must be numbers") from None
            raise
    if isinstance(values, str | bytes):
        raise _refused(method, f"{what} is {values!r}: give a dict of named numbers or a "
                       "sequence of numbers in schema order")
    try:
        return pb.Features(dense=values)
    except (TypeError, ValueError):
        try:
            listed = list(values)
        except TypeError:
            raise _refused(method, f"{what} is {values!r}: give a dict of named numbers or "
                           "a sequence of numbers in schema order") from None
        for i, value in enumerate(listed):
            try:
                pb.Features(dense=[value])
            except (TypeError, ValueError):
                raise _refused(method, f"{what}[{i}] is {value!r}: feature values must be "
                               "numbers") from None
        raise


def candidate(value: Candidate, k: int, method: str) -> pb.Candidate:
    """An id alone, ``(id, features)`` or ``{"id": ..., "features": ...}``."""
    if isinstance(value, str):
        return pb.Candidate(id=value)
    if isinstance(value, Mapping):
        if set(value) - {"id", "features"} or "id" not in value:
            raise _refused(method, f"candidates[{k}] has keys {sorted(map(str, value))}: "
                           "expected 'id' and optionally 'features'")
        action_id, values = value["id"], value.get("features")
    elif isinstance(value, tuple | list) and len(value) == 2:
        action_id, values = value
    else:
        raise _refused(method, f"candidates[{k}] is {value!r}: give an id, an (id, features) "
                       "pair or {'id': ..., 'features': ...}")
    if not isinstance(action_id, str):
        raise _refused(method, f"candidates[{k}] id {action_id!r} must be a string")
    if values is None:
        return pb.Candidate(id=action_id)
    return pb.Candidate(id=action_id,
                        features=features(values, f"candidates[{k}].features", method))


def decide_request(request: Request, timeout: float | None,
                   method: str = "Decide") -> pb.DecideRequest:
    """The message for one decision; ``timeout`` (seconds) is sent as the ``deadline_ms``
    hint."""
    if not isinstance(request.policy, str) or not request.policy:
        raise _refused(method, f"policy {request.policy!r} must be a non-empty string")
    message = pb.DecideRequest(
        policy=request.policy, context=features(request.context, "context", method),
        candidates=[candidate(c, k, method) for k, c in enumerate(request.candidates or ())])
    for name in ("slots", "event_id", "seed", "baseline_action"):
        value = getattr(request, name)
        if value is not None:
            try:
                setattr(message, name, value)
            except (TypeError, ValueError):
                raise _refused(method, f"{name} {value!r} is out of range or of the wrong "
                               "type") from None
    message.deferred = bool(request.deferred)
    if timeout is not None:
        message.deadline_ms = min(_MAX_DEADLINE_MS, max(1, int(timeout * 1000)))
    return message


def reward_request(event_id: str, value: float, policy: str | None,
                   slot_rewards: Sequence[float] | None,
                   timestamp: datetime | None) -> pb.RewardRequest:
    try:
        message = pb.RewardRequest(event_id=event_id, value=value, policy=policy or "",
                                   slot_rewards=slot_rewards or ())
    except (TypeError, ValueError) as exc:
        raise _refused("Reward", f"reward for {event_id!r}: {exc}") from None
    if timestamp is not None:
        if timestamp.tzinfo is None:
            raise _refused("Reward", f"timestamp {timestamp.isoformat()} has no time zone: "
                           "give an aware datetime, e.g. datetime.now(timezone.utc)")
        message.timestamp.FromDatetime(timestamp)
    return message


def decision(message: pb.DecideResponse) -> Decision:
    return Decision(
        event_id=message.event_id, policy=message.policy,
        chosen=tuple(Slot(c.action_id, c.candidate_index, c.propensity)
                     for c in message.chosen),
        ranking=tuple(message.ranking), strategy=message.strategy,
        model_version=message.model_version, active=message.active,
        policy_action=message.policy_action or None)


def policy_info(message: pb.PolicyInfo) -> PolicyInfo:
    return PolicyInfo(
        policy=message.policy, model_version=message.model_version, kind=message.kind,
        strategy=message.strategy, context_features=tuple(message.context_features),
        action_features=tuple(message.action_features), actions=tuple(message.actions),
        max_candidates=message.max_candidates, apprentice=message.apprentice,
        pinned=message.pinned, feature_schema_hash=message.feature_schema_hash,
        inputs=tuple(_tensor(t) for t in message.inputs),
        outputs=tuple(_tensor(t) for t in message.outputs), damage=message.damage,
        categorical=tuple(Categorical(c.name, tuple(c.vocabulary), c.buckets)
                          for c in message.categorical))


def _tensor(message: Any) -> TensorSpec:
    return TensorSpec(message.name, message.dtype, tuple(message.shape))


def replayable(message: pb.DecideRequest) -> bool:
    """Whether sending this decision again is harmless (see ``Retry``): a caller-chosen event id
    with a seed (the same choice again; the repeat of a logged event id is ignored), or a
    deferred decision with a server-made event id (a lost attempt is never activated, so it is
    never learned from)."""
    if message.event_id:
        return message.HasField("seed")
    return message.deferred
