"""Join decisions with their rewards by event id, within a reward window.

Rules (the contract the learner relies on):

- Time is event time: a decision's window closes once every input in ``sources`` (each
  partition of the decision and reward topics, as the caller names them) has shown a record stamped
  ``window_ms`` after it: the watermark is the smallest of the inputs' latest timestamps. A
  reader that happens to read one partition or topic ahead of another therefore closes nothing
  early, and replaying a log in any interleaving gives the same joins. ``caught_up()`` tells
  the joiner every available record has been read (the bus is drained): the watermark then
  moves to the latest timestamp seen on any input.
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
- Memory is bounded by ``max_pending``: beyond it the open events with the earliest deadlines
  are closed early. Events close in deadline order (ties by event id), never in arrival order.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import (
    REWARD_LIMIT,
    ActivationEvent,
    DecisionEvent,
    RewardEvent,
    usable_reward,
)


@dataclass(frozen=True)
class Example:
    """One training example: a decision with its outcome."""

    decision: DecisionEvent
    reward: float
    rewarded: bool  # False when the default reward was used
    reward_ms: int | None = None  # event time of the (last applied) reward

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
    reward_ms: int | None = None


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
    refused_rewards: int = 0  # non-finite or beyond ±reward_limit: never learned from
    undecodable_records: int = 0  # bus records that are not events: skipped by the learner


class RewardJoiner:
    def __init__(self, *, window_ms: int = 60_000, default_reward: float = 0.0,
                 reward_rule: str = "first", max_pending: int = 100_000,
                 remember_emitted: int = 200_000,
                 sources: tuple[str, ...] = ("decisions", "rewards"),
                 reward_limit: float = REWARD_LIMIT) -> None:
        if window_ms < 0:
            raise InvalidArgument(f"window_ms must be >= 0, got {window_ms}")
        if reward_rule not in ("first", "sum"):
            raise InvalidArgument(f"reward_rule must be 'first' or 'sum', got {reward_rule!r}")
        if max_pending < 1 or remember_emitted < 1:
            raise InvalidArgument("max_pending and remember_emitted must be >= 1")
        self.window_ms = window_ms
        self.default_reward = default_reward
        self.reward_rule = reward_rule
        self.reward_limit = reward_limit
        self.max_pending = max_pending
        self._remember = remember_emitted
        self._open: dict[str, _Open] = {}
        self._deadlines: list[tuple[int, str]] = []  # heap; stale entries skipped on pop
        self._emitted: OrderedDict[str, None] = OrderedDict()
        self._sources = frozenset(sources)
        self._marks: dict[str, int] = {}
        self._watermark = 0
        self.stats = JoinStats()

    @property
    def pending(self) -> int:
        return len(self._open)

    @property
    def watermark_ms(self) -> int:
        return self._watermark

    def add_decision(self, event: DecisionEvent, source: str = "decisions") -> list[Example]:
        if event.event_id in self._emitted:
            self.stats.duplicate_decisions += 1
            return self._advance(source, event.timestamp_ms)
        slot = self._open.get(event.event_id)
        if slot is not None and slot.decision is not None:
            self.stats.duplicate_decisions += 1
            return self._advance(source, event.timestamp_ms)
        if slot is None:
            slot = self._open[event.event_id] = _Open(None, 0)
        slot.decision = event
        slot.deadline_ms = event.timestamp_ms + self.window_ms
        heapq.heappush(self._deadlines, (slot.deadline_ms, event.event_id))
        slot.active = slot.active or event.active
        return self._advance(source, event.timestamp_ms) + self._evict()

    def add_reward(self, event: RewardEvent, source: str = "rewards") -> list[Example]:
        """Join a reward; one the learner cannot use (a producer other than serving wrote a
        NaN or an absurd value on the bus) is skipped and counted, never joined, and the sum
        rule refuses the addition that would carry a total past the limit."""
        if not usable_reward(event.value, self.reward_limit) or not all(
                usable_reward(v, self.reward_limit) for v in event.slot_rewards):
            self.stats.refused_rewards += 1
            return self._advance(source, event.timestamp_ms)
        if event.event_id in self._emitted:
            self.stats.late_rewards += 1
            return self._advance(source, event.timestamp_ms)
        slot = self._open.get(event.event_id)
        if slot is None:  # the decision has not arrived (yet)
            slot = self._new_slot(event.event_id, event.timestamp_ms)
        if slot.decision is not None and event.timestamp_ms > slot.deadline_ms:
            self.stats.late_rewards += 1
        elif slot.reward is None:
            slot.reward = event.value
            slot.reward_ms = event.timestamp_ms
        elif self.reward_rule == "sum":
            if not usable_reward(slot.reward + event.value, self.reward_limit):
                self.stats.refused_rewards += 1
                return self._advance(source, event.timestamp_ms) + self._evict()
            slot.reward += event.value
            slot.reward_ms = event.timestamp_ms
        else:
            self.stats.duplicate_rewards += 1
        return self._advance(source, event.timestamp_ms) + self._evict()

    def observe(self, source: str, timestamp_ms: int) -> list[Example]:
        """A record of another policy on a shared input: it says how far that input has got,
        so the clock moves on without opening anything."""
        return self._advance(source, timestamp_ms)

    def add_activation(self, event: ActivationEvent) -> list[Example]:
        if event.event_id not in self._emitted:
            slot = self._open.get(event.event_id)
            if slot is None:
                slot = self._new_slot(event.event_id, event.timestamp_ms)
            slot.active = True
        return self._evict()

    def _new_slot(self, event_id: str, timestamp_ms: int) -> _Open:
        slot = self._open[event_id] = _Open(None, timestamp_ms + self.window_ms)
        heapq.heappush(self._deadlines, (slot.deadline_ms, event_id))
        return slot

    def state(self) -> dict:
        """Everything needed to resume exactly here (JSON-serialisable)."""
        return {
            "open": [[k, None if s.decision is None else s.decision.to_bytes().decode(),
                      s.deadline_ms, s.reward, s.active, s.reward_ms]
                     for k, s in self._open.items()],
            "emitted": list(self._emitted), "watermark": self._watermark,
            "marks": self._marks, "stats": vars(self.stats),
        }

    def load_state(self, state: dict) -> None:
        self._open.clear()
        for k, decision, deadline, reward, active, reward_ms in state["open"]:
            self._open[k] = _Open(None if decision is None else DecisionEvent.from_bytes(
                decision.encode()), deadline, reward, active, reward_ms)
        self._deadlines = [(slot.deadline_ms, k) for k, slot in self._open.items()]
        heapq.heapify(self._deadlines)
        self._emitted = OrderedDict((k, None) for k in state["emitted"])
        self._watermark = state["watermark"]
        self._marks = dict(state["marks"])
        self.stats = JoinStats(**state["stats"])

    def flush(self) -> list[Example]:
        """Close every open decision now (end of a bounded replay)."""
        return list(self._close_due(None))

    def caught_up(self) -> list[Example]:
        """Every available record has been read: let the watermark follow the furthest input."""
        if not self._marks:
            return []
        latest = max(self._marks.values())
        self._marks = dict.fromkeys(self._marks, latest)
        return self._advance(next(iter(self._marks)), latest)

    def _advance(self, source: str, timestamp_ms: int) -> list[Example]:
        self._marks[source] = max(self._marks.get(source, 0), timestamp_ms)
        if self._sources <= self._marks.keys():  # every input has shown where it is
            self._watermark = max(self._watermark, min(self._marks.values()))
        return list(self._close_due(self._watermark))

    def _evict(self) -> list[Example]:
        """Close the earliest-deadline events beyond ``max_pending`` now."""
        excess = len(self._open) - self.max_pending
        if excess <= 0:
            return []
        self.stats.evicted += excess
        return list(self._close_due(None, limit=excess))

    def _close_due(self, watermark: int | None, limit: int | None = None) -> Iterator[Example]:
        """Close open events by deadline (ties by event id), those due by ``watermark`` or,
        with None, all of them up to ``limit``: the order never depends on arrival order."""
        closed = 0
        while self._deadlines and (limit is None or closed < limit):
            deadline, event_id = self._deadlines[0]
            if watermark is not None and deadline > watermark:
                return
            heapq.heappop(self._deadlines)
            slot = self._open.get(event_id)
            if slot is None or slot.deadline_ms != deadline:
                continue  # stale: closed already, or its deadline moved
            del self._open[event_id]
            closed += 1
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
        value = self.default_reward if slot.reward is None else slot.reward
        return [Example(slot.decision, value, rewarded, slot.reward_ms)]
