"""Every Prometheus metric the decision server exports, declared once.

Each collector takes the ``registry`` it is created with, so tests use a private registry and
read values with ``registry.get_sample_value``. Label sets are bounded: policy names come from
the server's configuration, methods and codes from fixed sets, actions only for fixed-action
(qnet) policies (candidate ids of ranking policies are unbounded and are never a label).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

NAMESPACE = "policyloop"

# Latency buckets from 100 µs to 5 s: the decision path lives in the sub-millisecond range.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                   0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROPENSITY_BUCKETS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


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
    apprentice_matches: Counter
    in_flight: Gauge
    auth_failures: Counter

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
            apprentice_matches=Counter(
                "apprentice_decisions", "Apprentice-mode decisions, by whether the policy "
                "agreed with the app's baseline action.", ["policy", "match"], namespace=ns,
                registry=registry),
            in_flight=Gauge(
                "requests_in_flight", "Requests being handled now.", namespace=ns,
                registry=registry),
            auth_failures=Counter(
                "auth_failures", "Calls refused by token authentication, by reason: missing "
                "(no bearer token), invalid (unknown token), scope (token lacks the scope).",
                ["reason"], namespace=ns, registry=registry),
        )
