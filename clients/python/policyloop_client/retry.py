"""Which calls the client sends again, and when.

A call is retried only after UNAVAILABLE or DEADLINE_EXCEEDED, that is before any response
came back, and only when sending it twice cannot change what is learned. The request may have
reached the server and been logged before the failure, so a retry is safe only if the server
and the reward join (``online/join.py``) treat a second copy as harmless:

- ``policy_info``, ``list_policies``: read only. Always retried.
- ``activate``: marks an event active; a second activation changes nothing. Always retried.
- ``reward``: the join keeps the first reward of an event (``reward_rule = "first"``, the
  default) and ignores a repeat, but with ``reward_rule = "sum"`` a repeat is added a second
  time. The client cannot see the learner's rule, so rewards are retried only with
  ``Retry(rewards=True)``: set it when your loop keeps the first reward.
- ``decide`` with your ``event_id`` *and* a ``seed``: the server makes the same choice for the
  same inputs and seed, and the join ignores a second decision with a logged event id, so the
  action you get back is the one that was logged. (Unless a new model version was swapped in
  between the two attempts; the decision you get then names the newer ``model_version``.)
  An ``event_id`` without a seed is *not* retried: the second attempt samples afresh and may
  choose another action than the first, logged one, which is what the join keeps.
- ``decide(deferred=True)`` without an ``event_id``: each attempt gets a new event id; a lost
  attempt stays inactive, is never activated and so never learned from. Retried.
- any other ``decide``: not retried. A lost attempt may already be logged as an active
  decision, and a second one would be a second decision for one request (the first is learned
  from with the default reward, as if shown and ignored). Fall back to your default action.
- ``decide_batch``: retried only when every row would be.

INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED and every other status are never retried: the
same request fails the same way. Between attempts the client waits ``backoff_s``, then
``multiplier`` times longer each time, at most ``max_backoff_s``, each wait shortened by a
random factor in [0.5, 1] so that many clients do not retry in step. The channel tries to
reconnect on the same schedule (gRPC's own default waits a second, then up to two minutes),
so a server that comes back is reached by the next attempt or the one after. Each attempt has
the call's whole timeout, so a call lasts at most ``attempts`` times its timeout plus the
waits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from policyloop_client._proto import decision_pb2 as pb
from policyloop_client._wire import replayable

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_ALWAYS_SAFE = frozenset({"GetPolicyInfo", "ListPolicies", "Activate"})


@dataclass(frozen=True)
class Retry:
    """How often and how patiently safe calls are retried (rules in the module docstring).

    >>> retry = Retry(attempts=4, backoff_s=0.1, max_backoff_s=0.3)
    >>> [round(wait, 3) for wait in retry.waits(random.Random(0))]  # 0.1, 0.2, 0.3 jittered
    [0.092, 0.176, 0.213]
    >>> Retry(attempts=0)
    Traceback (most recent call last):
    ...
    ValueError: Retry attempts must be an integer >= 1 (1: never retry), got 0
    """

    attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    rewards: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError("Retry attempts must be an integer >= 1 (1: never retry), got "
                             f"{self.attempts!r}")
        for name, low in (("backoff_s", 0.0), ("max_backoff_s", 0.0), ("multiplier", 1.0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
                raise ValueError(f"Retry {name} must be a finite number >= {low}, got "
                                 f"{value!r}")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"Retry max_backoff_s {self.max_backoff_s!r} is below backoff_s "
                             f"{self.backoff_s!r}")

    def waits(self, rng: random.Random) -> Iterator[float]:
        """The seconds to wait before each attempt after the first (``attempts - 1`` of them)."""
        wait = self.backoff_s
        for _ in range(self.attempts - 1):
            yield min(wait, self.max_backoff_s) * rng.uniform(0.5, 1.0)
            wait *= self.multiplier

    def allows(self, method: str, request: Message) -> bool:
        """Whether ``method`` with this request may be sent again after a failure."""
        if method in _ALWAYS_SAFE:
            return True
        if method == "Reward":
            return self.rewards
        if isinstance(request, pb.DecideRequest):
            return replayable(request)
        if isinstance(request, pb.DecideBatchRequest):
            return all(replayable(r) for r in request.requests)
        return False


DEFAULT = Retry()
