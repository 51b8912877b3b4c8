"""Join decisions with their rewards by event id, within a reward window.

Rules (the contract the learner relies on):

- Time is event time: a decision's window closes when the joiner has seen a record stamped
  ``window_ms`` after the decision (the watermark), so replaying a log gives the same joins.
- A decision whose window closes without a reward gets ``default_reward``.
- Rewards combine by ``reward_rule``: ``first`` (the first reward wins, later ones for the same
  event are ignored) or ``sum`` (rewards within the window add up, e.g. several clicks).
- A reward for an event already emitted, or arriving after its window, is late: counted, never
  applied, so nothing is counted twice. A reward that arrives before its decision is held
  (bounded) until the decision comes or its own window passes.
- A deferred decision (``active`` false) is emitted only if an activation arrives within the
  window; otherwise it is dropped and counted. Apprentice decisions (the app's own action,
  logged with propensity 1) are emitted like any other.
- Duplicate decisions (same event id, e.g. a producer retry) are ignored.
- Memory is bounded by ``max_pending``: beyond it the oldest open decisions are closed early.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from online.events import ActivationEvent, DecisionEvent, RewardEvent
from policyloop.errors import InvalidArgument


@dataclass(frozen=True)
class Example:
    """One training example: a decision with its outcome."""

    decision: DecisionEvent
    reward: float
    rewarded: bool  # False when the default reward was used

    @property
    def propensity(self) -> float:
        return self.decision.propensities[0]

    @property
    def action(self) -> int:
        return self.decision.chosen[0]


@dataclass
class _Open:
    decision: DecisionEvent | None
    deadline_ms: int
    reward: float | None = None
    active: bool = False


@dataclass
class JoinStats:
    emitted: int = 0
    rewarded: int = 0
    defaulted: int = 0
    late_rewards: int = 0
    duplicate_rewards: int = 0
    duplicate_decisions: int = 0
    never_activated: int = 0
    evicted: int = 0
    orphan_rewards: int = 0  # rewards whose decision never came within the window


class RewardJoiner:
    def __init__(self, *, window_ms: int = 60_000, default_reward: float = 0.0,
                 reward_rule: str = "first", max_pending: int = 100_000,
                 remember_emitted: int = 200_000) -> None:
        if window_ms < 0:
            raise InvalidArgument(f"window_ms must be >= 0, got {window_ms}")
        if reward_rule not in ("first", "sum"):
            raise InvalidArgument(f"reward_rule must be 'first' or 'sum', got {reward_rule!r}")
        if max_pending < 1 or remember_emitted < 1:
            raise InvalidArgument("max_pending and remember_emitted must be >= 1")
        self.window_ms = window_ms
        self.default_reward = default_reward
        self.reward_rule = reward_rule
        self.max_pending = max_pending
        self._remember = remember_emitted
        self._open: OrderedDict[str, _Open] = OrderedDict()  # by arrival, ~ by deadline
        self._emitted: OrderedDict[str, None] = OrderedDict()
        self._watermark = 0
        self.stats = JoinStats()

    @property
    def pending(self) -> int:
        return len(self._open)

    @property
    def watermark_ms(self) -> int:
        return self._watermark

    def add_decision(self, event: DecisionEvent) -> list[Example]:
        if event.event_id in self._emitted:
            self.stats.duplicate_decisions += 1
            return self._advance(event.timestamp_ms)
        slot = self._open.get(event.event_id)
        if slot is not None and slot.decision is not None:
            self.stats.duplicate_decisions += 1
            return self._advance(event.timestamp_ms)
        if slot is None:
            slot = self._open[event.event_id] = _Open(None, 0)
        slot.decision = event
        slot.deadline_ms = event.timestamp_ms + self.window_ms
        slot.active = slot.active or event.active
        return self._advance(event.timestamp_ms) + self._evict()

    def add_reward(self, event: RewardEvent) -> list[Example]:
        if event.event_id in self._emitted:
            self.stats.late_rewards += 1
            return self._advance(event.timestamp_ms)
        slot = self._open.get(event.event_id)
        if slot is None:  # the decision has not arrived (yet)
            slot = self._open[event.event_id] = _Open(None, event.timestamp_ms + self.window_ms)
        if slot.decision is not None and event.timestamp_ms > slot.deadline_ms:
            self.stats.late_rewards += 1
        elif slot.reward is None:
            slot.reward = event.value
        elif self.reward_rule == "sum":
            slot.reward += event.value
        else:
            self.stats.duplicate_rewards += 1
        return self._advance(event.timestamp_ms) + self._evict()

    def add_activation(self, event: ActivationEvent) -> list[Example]:
        if event.event_id not in self._emitted:
            slot = self._open.get(event.event_id)
            if slot is None:
                slot = self._open[event.event_id] = _Open(
                    None, event.timestamp_ms + self.window_ms)
            slot.active = True
        return self._advance(event.timestamp_ms) + self._evict()

    def flush(self) -> list[Example]:
        """Close every open decision now (end of a bounded replay)."""
        return list(self._close_while(lambda slot: True))

    def _advance(self, timestamp_ms: int) -> list[Example]:
        self._watermark = max(self._watermark, timestamp_ms)
        return list(self._close_while(lambda slot: slot.deadline_ms <= self._watermark))

    def _evict(self) -> list[Example]:
        out = []
        while len(self._open) > self.max_pending:
            event_id, slot = self._open.popitem(last=False)
            self.stats.evicted += 1
            out.extend(self._emit(event_id, slot))
        return out

    def _close_while(self, due) -> Iterator[Example]:  # type: ignore[no-untyped-def]
        # Decisions arrive in roughly timestamp order, so the oldest are at the front; a
        # straggler behind a younger one closes a little late, never early.
        while self._open:
            event_id, slot = next(iter(self._open.items()))
            if not due(slot):
                return
            del self._open[event_id]
            yield from self._emit(event_id, slot)

    def _emit(self, event_id: str, slot: _Open) -> list[Example]:
        self._emitted[event_id] = None
        if len(self._emitted) > self._remember:
            self._emitted.popitem(last=False)
        if slot.decision is None:
            if slot.reward is not None:
                self.stats.orphan_rewards += 1
            return []
        if not slot.active:
            self.stats.never_activated += 1
            return []
        rewarded = slot.reward is not None
        self.stats.emitted += 1
        if rewarded:
            self.stats.rewarded += 1
        else:
            self.stats.defaulted += 1
        return [Example(slot.decision, slot.reward if rewarded else self.default_reward,
                        rewarded)]
