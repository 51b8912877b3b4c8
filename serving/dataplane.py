"""The transport-neutral decision path: validate, score, explore, log.

The gRPC servicer translates protobuf into the small input types here and back; nothing in this
module knows about gRPC. Every check raises ``InvalidArgument`` (or ``NotFound``) with a message
naming the field and the bad value, before anything is logged.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any

import numpy as np

from policyloop.bus import interface as bus
from policyloop.contract.errors import InvalidArgument, PolicyloopError, shown
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent, usable_reward
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import Categorical
from policyloop.registry.onnx_model import LoadedModel
from serving.config import ServeConfig
from serving.decision_log import DecisionLog
from serving.exploration import Decision, Strategy, for_version, strategy_from_spec
from serving.metrics import ServingMetrics
from serving.model_store import ModelStore

log = logging.getLogger(__name__)

EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_SLOTS = 100
RECENT_EVENT_IDS = 100_000  # caller event ids remembered to report reuse (~10 MB at most)
# decisions whose reward serve applies to the pending posterior when it reaches this replica
# (their embedding rows: ~23 MB at most for a 288-wide head); older ones wait for a version
AWAITED_REWARDS = 10_000


@dataclass(frozen=True)
class Features:
    """A feature vector as sent: dense values in schema order, or values by name (numbers,
    and the strings of categorical features)."""

    dense: Sequence[float] = ()
    named: Mapping[str, float] = field(default_factory=dict)
    categorical: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DecideInput:
    policy: str
    event_id: str = ""
    context: Features = Features()
    candidate_ids: Sequence[str] = ()
    # per candidate, or already float32[K, n] when the transport read every row's dense values
    # in one go (serving/grpc_decision.py)
    candidate_features: Sequence[Features] | np.ndarray = ()
    slots: int = 0
    seed: int | None = None
    deferred: bool = False
    baseline_action: str = ""


@dataclass(frozen=True)
class Chosen:
    action_id: str
    candidate_index: int
    propensity: float


@dataclass(frozen=True)
class DecideOutput:
    event_id: str
    policy: str
    chosen: list[Chosen]
    ranking: list[str]
    strategy: str
    model_version: int
    active: bool
    policy_action: str = ""


@dataclass(frozen=True)
class RewardInput:
    event_id: str
    value: float
    slot_rewards: Sequence[float] = ()
    timestamp_ms: int = 0
    policy: str = ""


def _vector(features: Features, names: Sequence[str], index: Mapping[str, int],
            what: str, missing: str = "zero",
            categorical: Mapping[str, tuple[Categorical, int]] | None = None,
            fields: Sequence[tuple[str, Categorical | None]] | None = None) -> np.ndarray:
    """float32[len(names)] from dense or named values; names not given are zero, or refused
    when the policy's ``missing`` rule is "error". ``categorical``: the side's string-valued
    features (``LoadedModel.categorical_at``), each setting one column of its block;
    ``fields``: the features a request names (``LoadedModel.fields_at``; default: ``names``),
    for the missing rule."""
    categorical = categorical or {}
    if len(features.dense):
        if len(features.dense) != len(names):
            raise InvalidArgument(f"{what}.dense has {len(features.dense)} values, the policy "
                                  f"expects {len(names)}")
        vec = np.asarray(features.dense, dtype=np.float32)
        if features.named or features.categorical:
            raise InvalidArgument(f"{what}: give dense or named values, not both")
    else:
        vec = np.zeros(len(names), dtype=np.float32)
        for name, value in features.named.items():
            position = index.get(name)
            if position is None:
                if name in categorical:
                    raise InvalidArgument(f"{what}.named: {shown(name)} is categorical: send "
                                          f"its value as a string in {what}.categorical")
                raise InvalidArgument(f"{what}.named has unknown feature {shown(name)}")
            vec[position] = value
        for name, text in features.categorical.items():
            entry = categorical.get(name)
            if entry is None:
                problem = ("is numeric: send it in named" if name in index
                           else "is no categorical feature of the policy")
                raise InvalidArgument(f"{what}.categorical: {shown(name)} {problem}")
            cat, start = entry
            column = cat.column(text)
            if column is not None:  # outside the vocabulary: no column (the docstring's why)
                vec[start + column] = 1.0
        given = len(features.named) + len(features.categorical)
        if missing == "error" and (categorical or given < len(names)):
            wanted = fields if fields is not None else [(n, None) for n in names]
            absent = [n for n, cat in wanted
                      if n not in (features.categorical if cat else features.named)]
            if absent:
                raise InvalidArgument(
                    f"{what}.named lacks {len(absent)} of the policy's {len(wanted)} features "
                    f"({', '.join(map(repr, absent[:5]))}{', ...' if len(absent) > 5 else ''})"
                    ": this policy refuses missing features (its spec's features.missing)")
    if not np.isfinite(vec).all():
        bad = int(np.flatnonzero(~np.isfinite(vec))[0])
        raise InvalidArgument(f"{what} value {bad} ({names[bad]}) is {vec[bad]}: features "
                              "must be finite")
    return vec


def _matrix(rows: Sequence[Features] | np.ndarray, names: Sequence[str],
            index: Mapping[str, int], missing: str = "zero",
            categorical: Mapping[str, tuple[Categorical, int]] | None = None,
            fields: Sequence[tuple[str, Categorical | None]] | None = None) -> np.ndarray:
    """float32[K, len(names)] of per-candidate features.

    The common case, every row dense and of the right length, is converted in one call: on the
    request path the per-row checks of ``_vector`` cost more than the model.
    """
    width = len(names)
    if isinstance(rows, np.ndarray):
        if rows.shape[1] != width:
            raise InvalidArgument(f"candidates[0].features.dense has {rows.shape[1]} values, "
                                  f"the policy expects {width}")
        finite = np.isfinite(rows)
        if not finite.all():
            k, bad = (int(i) for i in np.argwhere(~finite)[0])
            raise InvalidArgument(f"candidates[{k}].features value {bad} ({names[bad]}) is "
                                  f"{rows[k, bad]}: features must be finite")
        return rows
    if all(len(f.dense) == width and not f.named and not f.categorical for f in rows):
        matrix = np.array([f.dense for f in rows], dtype=np.float32)
        if np.isfinite(matrix).all():
            return matrix
    return np.stack([_vector(f, names, index, f"candidates[{k}].features", missing,
                             categorical, fields) for k, f in enumerate(rows)])


def check_event_id(event_id: str, field_name: str = "event_id") -> str:
    if not EVENT_ID.fullmatch(event_id):
        raise InvalidArgument(f"{field_name} {event_id[:64]!r} is malformed: use 1-128 "
                              "characters of A-Z a-z 0-9 . _ : -")
    return event_id


def _in_row(exc: PolicyloopError, row: int) -> PolicyloopError:
    """``exc`` with its message prefixed by the batch row it is about (same type, so it maps
    to the same status)."""
    named = copy.copy(exc)
    named.args = (f"requests[{row}]: {exc}",)
    return named


class _RecentIds:
    """The last ``capacity`` caller-given event ids, to count their reuse.

    Reuse across calls is reported, not refused: the client library resends a Decide with an
    event id and a seed (the same decision, by construction) when its first answer was lost,
    and that resend must succeed. The learner keeps the first decision of an id either way
    (``online/join.py``); this counter tells an operator that an app reuses ids."""

    def __init__(self, capacity: int) -> None:
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._capacity = capacity

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; True when it was already remembered."""
        if event_id in self._ids:
            return True
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self._capacity:
            self._ids.discard(self._order.popleft())
        return False


class DataPlane:
    """Decisions, rewards and activations for every served policy."""

    def __init__(self, config: ServeConfig, store: ModelStore, log: DecisionLog,
                 metrics: ServingMetrics, *, seed: int | None = None) -> None:
        self._config = config
        self._store = store
        self._log = log
        self._metrics = metrics
        self._rng = np.random.default_rng(seed)
        # Built here, so a bad spec stops the server: the strategies configured by name. A
        # policy without one gets its version's spec default, else the server's default.
        self._strategies: dict[str, Strategy] = {
            name: strategy_from_spec(policy.strategy)
            for name, policy in config.policies.items() if policy.strategy}
        self._default_strategy = strategy_from_spec(config.default_strategy)
        self._spec_strategies: dict[str, Strategy] = {}  # by a manifest's strategy spec
        # per policy: the strategy its latest version decides with (a growing SquareCB's
        # gamma depends on the version), keyed by (version, the strategy's name)
        self._versioned: dict[str, tuple[tuple[int, str], Strategy]] = {}
        # per policy: (version, its posterior shrunk by the decisions made since it arrived)
        self._pending: dict[str, tuple[int, LinearPosterior]] = {}
        # event id -> (policy, version, embedding row, head, predicted score) of a pending
        # decision whose reward has not reached this replica yet (``_rewarded``)
        self._awaited: OrderedDict[str, tuple[str, int, np.ndarray, int, float]] = (
            OrderedDict())
        self._pending_lock = threading.Lock()
        # labelled metric children, looked up once (label values are bounded)
        self._decision_metrics: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._recent_ids = _RecentIds(RECENT_EVENT_IDS)

    @property
    def store(self) -> ModelStore:
        return self._store

    def strategy(self, policy: str) -> Strategy:
        self._store.get_known(policy)
        try:
            model: LoadedModel | None = self._store.get(policy)
        except PolicyloopError:  # no version loaded: what it would get without a spec
            model = None
        return self._strategy(policy, model)

    def _strategy(self, policy: str, model: LoadedModel | None) -> Strategy:
        """The configured strategy, else the one the version's spec names, else the default
        (a spec's strategy was checked when the spec was read; one that no longer parses is
        logged once and the default used)."""
        explicit = self._strategies.get(policy)
        if explicit is not None:
            return explicit
        spec = model.manifest.defaults.strategy if model is not None else ""
        if not spec:
            return self._default_strategy
        strategy = self._spec_strategies.get(spec)
        if strategy is None:
            try:
                strategy = strategy_from_spec(spec)
            except InvalidArgument as exc:
                log.error("%s: the spec's strategy is unusable (%s); using %s", policy, exc,
                          self._default_strategy.name)
                strategy = self._default_strategy
            self._spec_strategies[spec] = strategy
        return strategy

    def _for_version(self, policy: str, strategy: Strategy, model: LoadedModel) -> Strategy:
        """``strategy`` as ``model``'s version decides with it (``for_version``), built once
        per version."""
        key = (model.version, strategy.name)
        cached = self._versioned.get(policy)
        if cached is None or cached[0] != key:
            cached = (key, for_version(strategy, model.manifest.examples_learned))
            self._versioned[policy] = cached
        return cached[1]

    def _served_posterior(self, policy: str, model: LoadedModel) -> LinearPosterior | None:
        """The posterior ``model``'s decisions explore with: as published, or (serve
        ``pending_decisions``, the default) shrunk by every decision made on this version
        so far (``_observe``)."""
        if model.posterior is None or not self._config.pending_decisions:
            return model.posterior
        pending = self._pending.get(policy)
        return pending[1] if pending is not None and pending[0] == model.version else (
            model.posterior)

    def _observe(self, policy: str, model: LoadedModel, row: np.ndarray,
                 head: int) -> float | None:
        """A decision of ``model``'s version the learner will fit (its reward still unknown):
        the posterior later decisions on this version explore with narrows as the
        learner's will (``LinearPosterior.narrow``, in place on this version's private copy;
        callers hold ``_pending_lock``), so between two versions UCB and Thompson sampling
        move on from what they have just tried. Per replica: each replica narrows by its own
        decisions, the next version replaces them all. Returns the row's predicted score
        (what ``_rewarded`` replaces by the reward), or None where there is nothing to narrow:
        a posterior published without its noise variance (a file from before it)."""
        if model.posterior is None or model.posterior.noise is None:
            return None
        pending = self._pending.get(policy)
        if pending is None or pending[0] != model.version:
            pending = (model.version, model.posterior.narrowable())
            self._pending[policy] = pending
        return pending[1].narrow(row, head)

    def _rewarded(self, event_id: str, value: float) -> None:
        """A reward for a pending decision of this replica's: the posterior its version
        explores with moves by it (``LinearPosterior.nudge``), so between two versions the
        served policy learns from every reward as it arrives, as LinUCB does; the learner's
        next version replaces it. The first reward of a decision counts here (any later one,
        a reward of an older version's decision, or one this replica did not decide waits
        for the learner)."""
        with self._pending_lock:
            awaited = self._awaited.pop(event_id, None)
            if awaited is None:
                return
            policy, version, row, head, predicted = awaited
            pending = self._pending.get(policy)
            if pending is not None and pending[0] == version:
                pending[1].nudge(row, head, value - predicted)

    def max_candidates(self, policy: str) -> int:
        return self._config.policy(policy).max_candidates

    def apprentice(self, policy: str) -> bool:
        return self._config.policy(policy).apprentice

    def decide(self, request: DecideInput) -> DecideOutput:
        return self._score([self._prepare(request)], independent=False)[0]  # type: ignore

    def decide_many(self, requests: Sequence[DecideInput]) -> list[DecideOutput]:
        """Decide every row; rows of one policy and candidate count share one model run.

        All rows are validated before any is scored or logged, so a bad row fails the whole
        call and nothing of it is half-logged; the error names the row (``requests[i]: ...``).
        Two rows with the same event id are refused: the second would log a decision the
        learner drops.
        """
        prepared: list[_Prepared | PolicyloopError] = []
        first_row: dict[str, int] = {}
        for i, r in enumerate(requests):
            try:
                p = self._prepare(r)
            except PolicyloopError as e:
                raise _in_row(e, i) from None
            if r.event_id:
                if r.event_id in first_row:
                    raise InvalidArgument(
                        f"requests[{i}]: event_id {shown(r.event_id)} repeats "
                        f"requests[{first_row[r.event_id]}]'s: event ids must be unique")
                first_row[r.event_id] = i
            prepared.append(p)
        return self._score(prepared, independent=False, rows_named=True)  # type: ignore

    def decide_each(self, requests: Sequence[DecideInput]
                    ) -> list[DecideOutput | PolicyloopError]:
        """Decide independent requests together (the micro-batcher's call): rows share model
        runs as in ``decide_many``, but each row succeeds or fails on its own."""
        prepared: list[_Prepared | PolicyloopError] = []
        for r in requests:
            try:
                prepared.append(self._prepare(r))
            except PolicyloopError as e:
                prepared.append(e)
        return self._score(prepared, independent=True)

    def _score(self, prepared: Sequence[_Prepared | PolicyloopError], *, independent: bool,
               rows_named: bool = False) -> list[DecideOutput | PolicyloopError]:
        """Run each group's model once and finish its rows; with ``independent`` a row's
        error becomes its result, otherwise it ends the call (naming the row when
        ``rows_named``)."""
        outputs: list = list(prepared)  # every prepared row is replaced by its output below
        groups: dict[tuple[int, int], list[tuple[int, _Prepared]]] = {}
        for i, p in enumerate(prepared):
            if not isinstance(p, PolicyloopError):
                groups.setdefault((id(p.model), p.width), []).append((i, p))
        for group in groups.values():
            rows, ready = zip(*group, strict=True)
            first = ready[0]
            scoring = first.model.manifest.policy_kind.per_action_features
            if len(ready) == 1:
                context = first.context[None]
                actions = first.action_features[None] if scoring else None
            else:
                context = np.stack([p.context for p in ready])
                actions = (np.stack([p.action_features for p in ready]) if scoring else None)
            scores, embedding = first.model.run(context, actions)
            for j, (i, p) in enumerate(zip(rows, ready, strict=True)):
                try:
                    outputs[i] = self._finish(p, scores[j], embedding[j])
                except PolicyloopError as e:
                    if not independent:
                        raise _in_row(e, i) if rows_named else e from None
                    outputs[i] = e
        return outputs

    def _prepare(self, r: DecideInput) -> _Prepared:
        model = self._store.get(r.policy)
        manifest = model.manifest
        event_id = check_event_id(r.event_id) if r.event_id else f"{getrandbits(128):032x}"
        context = _vector(r.context, manifest.features.context, model.context_index, "context",
                          manifest.features.missing, model.categorical_at["context"],
                          model.fields_at["context"])
        ids = list(r.candidate_ids)
        limit = self._config.policy(r.policy).max_candidates
        if len(ids) > limit:
            raise InvalidArgument(f"candidates: {len(ids)} given, at most {limit} allowed")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidArgument(f"candidates: duplicate action id {dup!r}")
        kind = manifest.policy_kind
        features = r.candidate_features
        if kind.per_action_features:
            with_features = len(features)  # an empty feature row is refused by _matrix
        elif isinstance(features, np.ndarray):
            with_features = max(len(features), 1)  # a dense matrix is per-action features
        else:
            with_features = sum(1 for f in features
                                if len(f.dense) or f.named or f.categorical)
        ids, allowed = kind.candidates(ids, with_features, manifest.actions,
                                       model.action_positions)
        action_features = (_matrix(features, manifest.features.action, model.action_index,
                                   manifest.features.missing, model.categorical_at["action"],
                                   model.fields_at["action"])
                           if kind.per_action_features else None)
        slots = r.slots or 1
        if slots > len(ids) or slots > MAX_SLOTS:
            raise InvalidArgument(f"slots {slots} exceeds the {len(ids)} candidates "
                                  f"(max {MAX_SLOTS})")
        apprentice = self._config.policy(r.policy).apprentice
        if apprentice:
            if not r.baseline_action:
                raise InvalidArgument(f"baseline_action is required: policy {r.policy!r} runs "
                                      "in apprentice mode")
            if r.baseline_action not in ids:
                raise InvalidArgument(f"baseline_action {r.baseline_action!r} is not a "
                                      "candidate")
        return _Prepared(r, model, event_id, context, action_features, ids, allowed, slots,
                         apprentice, len(ids) if allowed is None else -1)

    def _finish(self, p: _Prepared, scores: np.ndarray,
                embedding: np.ndarray) -> DecideOutput:
        model = p.model
        if not (np.isfinite(scores).all() and np.isfinite(embedding).all()):
            raise InvalidArgument("the model's scores for this request have NaN or infinite "
                                  "values (features far outside the range it was trained on?)")
        strategy = self._for_version(p.request.policy, self._strategy(p.request.policy, model),
                                     model)
        rng = np.random.default_rng(p.request.seed) if p.request.seed is not None else self._rng
        with self._pending_lock:  # _observe narrows the served posterior in place
            served = (self._served_posterior(p.request.policy, model)
                      if strategy.needs_posterior else None)
            posterior = served
            if p.allowed is not None:  # fixed action set: restrict to the allowed actions
                scores = scores[p.allowed]
                posterior = served.for_actions(p.allowed) if served is not None else None
                embedding = np.broadcast_to(embedding, (len(p.allowed), embedding.shape[-1]))
            decision = strategy.decide(scores, p.slots, rng, embedding=embedding,
                                       posterior=posterior)
            chosen = [Chosen(p.ids[int(i)], int(i), float(q))
                      for i, q in zip(decision.chosen, decision.propensities, strict=True)]
            if p.apprentice:  # the baseline is logged, and is what the learner fits
                chosen = [Chosen(p.request.baseline_action,
                                 p.ids.index(p.request.baseline_action), 1.0)]
            if (served is not None and self._config.pending_decisions
                    and not p.request.deferred):
                logged = chosen[0].candidate_index
                row = np.array(embedding[logged], np.float64)
                head = 0 if p.allowed is None else int(p.allowed[logged])
                predicted = self._observe(p.request.policy, model, row, head)
                if predicted is not None and p.slots == 1:  # a slate's reward is the slate's
                    self._awaited[p.event_id] = (p.request.policy, model.version, row, head,
                                                 predicted)
                    if len(self._awaited) > AWAITED_REWARDS:
                        self._awaited.popitem(last=False)
        policy_action = ""
        if p.apprentice:
            policy_action = p.ids[int(decision.chosen[0])]
            match = "true" if policy_action == p.request.baseline_action else "false"
            self._metrics.apprentice_matches.labels(p.request.policy, match).inc()
        self._log_decision(p, decision, chosen, strategy.name, policy_action)
        return DecideOutput(
            event_id=p.event_id, policy=p.request.policy, chosen=chosen,
            ranking=[p.ids[int(i)] for i in decision.ranking], strategy=strategy.name,
            model_version=model.version, active=not p.request.deferred,
            policy_action=policy_action)

    def _log_decision(self, p: _Prepared, decision: Decision, chosen: list[Chosen],
                      strategy: str, policy_action: str) -> None:
        policy = p.request.policy
        event = DecisionEvent(
            event_id=p.event_id, policy=policy, model_version=p.model.version,
            timestamp_ms=int(time.time() * 1000), context=p.context,
            action_ids=p.ids, action_features=p.action_features,
            chosen=[c.candidate_index for c in chosen],
            propensities=[c.propensity for c in chosen],
            probabilities=decision.probabilities,
            strategy=strategy, active=not p.request.deferred,
            baseline_action=p.request.baseline_action or None,
            policy_action=policy_action or None)
        self._log.submit(bus.DECISIONS, event.key, event.to_bytes())
        if p.request.event_id and self._recent_ids.add(p.event_id):
            self._metrics.reused_event_ids.labels(policy).inc()
        action = chosen[0].action_id if p.allowed is not None else "candidate"
        children = self._decision_metrics.get((policy, strategy, action))
        if children is None:
            children = self._decision_metrics[(policy, strategy, action)] = (
                self._metrics.decisions.labels(policy, strategy, action),
                self._metrics.propensity.labels(policy))
        children[0].inc()
        children[1].observe(chosen[0].propensity)

    def reward(self, r: RewardInput) -> str:
        check_event_id(r.event_id)
        if r.policy:
            self._store.get_known(r.policy)
        values = [r.value, *r.slot_rewards]
        if not all(np.isfinite(values)):
            raise InvalidArgument(f"reward value/slot_rewards must be finite, got {values[:8]}")
        limit = self._config.reward_limit
        if not all(usable_reward(v, limit) for v in values):
            raise InvalidArgument(f"reward value/slot_rewards must be within ±{limit:g} "
                                  f"(--reward-limit), got {values[:8]}")
        event = RewardEvent(event_id=r.event_id, policy=r.policy, value=float(r.value),
                            slot_rewards=[float(v) for v in r.slot_rewards],
                            timestamp_ms=r.timestamp_ms or int(time.time() * 1000))
        self._log.submit(bus.REWARDS, event.key, event.to_bytes())
        self._metrics.rewards.labels(r.policy or "unspecified").inc()
        self._metrics.reward_value.labels(r.policy or "unspecified").observe(float(r.value))
        if self._config.pending_decisions:
            self._rewarded(r.event_id, float(r.value))
        return r.event_id

    def activate(self, event_id: str, policy: str) -> str:
        check_event_id(event_id)
        if policy:
            self._store.get_known(policy)
        event = ActivationEvent(event_id=event_id, policy=policy,
                                timestamp_ms=int(time.time() * 1000))
        self._log.submit(bus.ACTIVATIONS, event.key, event.to_bytes())
        return event_id


@dataclass(frozen=True)
class _Prepared:
    request: DecideInput
    model: LoadedModel
    event_id: str
    context: np.ndarray
    action_features: np.ndarray | None
    ids: list[str]
    allowed: np.ndarray | None
    slots: int
    apprentice: bool
    width: int
