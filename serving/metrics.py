"""Every Prometheus metric the decision server exports, declared once.

Each collector takes the ``registry`` it is created with, so tests use a private registry and
read values with ``registry.get_sample_value``. Label sets are bounded: policy names come from
the server's configuration or the registry it serves, methods and codes from fixed sets, actions
only for fixed-action (qnet) policies (candidate ids of ranking policies are unbounded and are
never a label).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary

NAMESPACE = "policyloop"

# Latency buckets from 100 µs to 5 s: the decision path lives in the sub-millisecond range.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                   0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROPENSITY_BUCKETS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)
# Every ``ModelRejected.reason`` (policyloop/contract/errors.py); declared up front per policy so a
# first rejection is an increase Prometheus can see (a series born at 1 has no increase).
REJECT_REASONS = ("checksum", "missing", "outside", "oversized", "corrupt", "incompatible",
                  "signature", "warmup", "posterior", "other")


@dataclass(frozen=True)
class ServingMetrics:
    requests: Counter
    latency: Histogram
    decisions: Counter
    propensity: Histogram
    model_version: Gauge
    model_info: Info
    swaps: Counter
    rejected_loads: Counter
    rewards: Counter
    reward_value: Summary
    model_created: Gauge
    model_loaded: Gauge
    apprentice_matches: Counter
    in_flight: Gauge
    auth_failures: Counter
    micro_batch_size: Histogram
    reused_event_ids: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ServingMetrics:
        ns = NAMESPACE
        return cls(
            requests=Counter(
                "requests", "gRPC requests handled, by method, policy and status code.",
                ["method", "policy", "code"], namespace=ns, registry=registry),
            latency=Histogram(
                "request_latency_seconds", "Server-side gRPC handling time.",
                ["method", "policy", "code"], namespace=ns, registry=registry,
                buckets=LATENCY_BUCKETS),
            decisions=Counter(
                "decisions", "Decisions made, by policy, strategy and (fixed-action policies) "
                "first chosen action; ranking policies report action=\"candidate\".",
                ["policy", "strategy", "action"], namespace=ns, registry=registry),
            propensity=Histogram(
                "decision_propensity", "Probability the first chosen action was chosen with.",
                ["policy"], namespace=ns, registry=registry, buckets=PROPENSITY_BUCKETS),
            model_version=Gauge(
                "model_version", "Model version currently served, per policy.",
                ["policy"], namespace=ns, registry=registry),
            model_info=Info(
                "model", "Served model per policy: version, checksum, created_at, pinned.",
                ["policy"], namespace=ns, registry=registry),
            swaps=Counter(
                "model_swaps", "Model versions swapped in while serving.",
                ["policy"], namespace=ns, registry=registry),
            rejected_loads=Counter(
                "model_rejected_loads", "Model versions rejected at load (corrupt, checksum, "
                "signature mismatch), by policy and reason.",
                ["policy", "reason"], namespace=ns, registry=registry),
            rewards=Counter(
                "rewards", "Rewards accepted, by policy.", ["policy"], namespace=ns,
                registry=registry),
            reward_value=Summary(
                "reward_value", "Accepted reward values, by policy: rate(_sum) / rate(_count) "
                "is the mean reward (rate() assumes rewards >= 0).", ["policy"],
                namespace=ns, registry=registry),
            model_created=Gauge(
                "model_created_timestamp_seconds", "Unix time the served version was created "
                "(published to the registry), per policy; time() minus it is the model's age.",
                ["policy"], namespace=ns, registry=registry),
            model_loaded=Gauge(
                "model_loaded_timestamp_seconds", "Unix time the served version was loaded "
                "(first load or swap), per policy.", ["policy"], namespace=ns,
                registry=registry),
            apprentice_matches=Counter(
                "apprentice_decisions", "Apprentice-mode decisions, by whether the policy "
                "agreed with the app's baseline action.", ["policy", "match"], namespace=ns,
                registry=registry),
            in_flight=Gauge(
                "requests_in_flight", "Requests being handled now.", namespace=ns,
                registry=registry),
            auth_failures=Counter(
                "auth_failures", "Calls refused by token authentication, by reason: missing "
                "(no bearer token), invalid (unknown token), scope (token lacks the scope), "
                "duplicate (more than one authorization header).",
                ["reason"], namespace=ns, registry=registry),
            micro_batch_size=Histogram(
                "decide_micro_batch_size", "Decide calls decided together by the "
                "micro-batcher (serving/batching.py; only when it is on).", namespace=ns,
                registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
            reused_event_ids=Counter(
                "reused_event_ids", "Decisions logged under a caller's event id that this "
                "server logged a decision for recently (a retried call, or an app reusing ids: "
                "the learner keeps the first), by policy.", ["policy"], namespace=ns,
                registry=registry),
        )

    def declare_policies(self, policies: Iterable[str]) -> None:
        """Create the per-policy swap and rejection series at zero, so their first increase
        shows in ``increase()`` and the alerts on it fire on the first bad version."""
        for policy in policies:
            self.swaps.labels(policy)
            for reason in REJECT_REASONS:
                self.rejected_loads.labels(policy, reason)

    def record_load(self, policy: str, created_at: str) -> None:
        """A version of ``policy`` created at ``created_at`` (ISO 8601, as the registry writes
        it) has just been loaded; a manifest without a readable time leaves the age unset."""
        self.model_loaded.labels(policy).set(time.time())
        try:
            created = datetime.fromisoformat(created_at)
        except ValueError:
            return
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        self.model_created.labels(policy).set(created.timestamp())
