"""Prometheus metrics of the learner, read from its state at scrape time, and its HTTP
endpoint (``/metrics``, and ``/healthz`` for readiness).

The joiner and the learner already count everything (``JoinStats``, published versions, gate
values); a collector reports those numbers instead of keeping a second set of counters that
could drift from them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from online.learner import Learner

_JOIN_OUTCOMES = ("rewarded", "defaulted", "late_rewards", "duplicate_rewards",
                  "duplicate_decisions", "never_activated", "evicted", "orphan_rewards",
                  "refused_rewards", "undecodable_records")


class LearnerCollector(Collector):
    def __init__(self, learner: Learner) -> None:
        self._learner = learner

    def collect(self) -> Iterator[Metric]:
        learner = self._learner
        policy = learner.config.policy
        stats = learner.joiner.stats
        pending = GaugeMetricFamily("policyloop_join_pending",
                                    "Events waiting in the reward join (bounded by max_pending).",
                                    labels=["policy"])
        pending.add_metric([policy], learner.joiner.pending)
        yield pending
        events = CounterMetricFamily("policyloop_join_events",
                                     "Reward-join outcomes: rewarded and defaulted examples, "
                                     "and what was counted but not applied.",
                                     labels=["policy", "outcome"])
        for outcome in _JOIN_OUTCOMES:
            events.add_metric([policy, outcome], getattr(stats, outcome))
        yield events
        examples = CounterMetricFamily("policyloop_learner_examples",
                                       "Examples the learner consumed (trained or held out).",
                                       labels=["policy"])
        examples.add_metric([policy], learner.examples)
        yield examples
        versions = CounterMetricFamily("policyloop_learner_versions",
                                       "Versions published, by whether the gate promoted them.",
                                       labels=["policy", "outcome"])
        promoted = sum(1 for p in learner.published if p["promoted"])
        versions.add_metric([policy, "promoted"], promoted)
        versions.add_metric([policy, "rejected"], len(learner.published) - promoted)
        yield versions
        gate = GaugeMetricFamily("policyloop_learner_gate_value",
                                 "SNIPS estimate on the held-out window at the last publish.",
                                 labels=["policy", "model"])
        if learner.published:
            last = learner.published[-1]
            for model in ("candidate", "incumbent"):
                value = last.get(f"{model}_snips")
                if value is not None:
                    gate.add_metric([policy, model], value)
        yield gate
        watermark = GaugeMetricFamily("policyloop_join_watermark_seconds",
                                      "Event time up to which reward windows are closed.",
                                      labels=["policy"])
        watermark.add_metric([policy], learner.joiner.watermark_ms / 1000)
        yield watermark
        lag = GaugeMetricFamily("policyloop_learner_lag_seconds",
                                "Wall time minus the join watermark: how far behind real time "
                                "the learner has closed reward windows (absent until the "
                                "watermark first moves).", labels=["policy"])
        if learner.joiner.watermark_ms > 0:
            lag.add_metric([policy], time.time() - learner.joiner.watermark_ms / 1000)
        yield lag
        incumbent = GaugeMetricFamily("policyloop_learner_model_version",
                                      "Version the learner trains against (the last one it "
                                      "promoted, or the registry's current at start).",
                                      labels=["policy"])
        incumbent.add_metric([policy], learner.model.version)
        yield incumbent
        for name, text, value in (
                ("position_resets", "Positions found past a partition's end (taken on another "
                 "log) and moved back to its earliest record.", learner.position_resets),
                ("damaged_records", "Records the bus passed over because they are damaged on "
                 "disk (each logged by the local log; 0 on Kafka).", learner.damaged_records)):
            counter = CounterMetricFamily(f"policyloop_learner_{name}", text, labels=["policy"])
            counter.add_metric([policy], value)
            yield counter
        assigned = GaugeMetricFamily("policyloop_learner_assigned_partitions",
                                     "Partitions of each subscribed topic this learner holds "
                                     "(0 for a topic that exists: it learns nothing from it).",
                                     labels=["policy", "topic"])
        for topic, count in sorted(learner.assigned.items()):
            assigned.add_metric([policy, topic], count)
        yield assigned


def health(learner: Learner) -> tuple[bool, str]:
    """Ready when the learner holds partitions of every subscribed topic that exists (on
    Kafka: at least one partition at all), with the reason when not."""
    if learner.unassigned:
        return False, f"no partition of {', '.join(sorted(learner.unassigned))} assigned"
    if learner.config.bus != "local" and not any(learner.assigned.values()):
        return False, "no partition assigned yet"
    return True, "ok"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def serve_metrics(learner: Learner, host: str, port: int) -> WSGIServer:
    """Start ``/metrics`` (the learner's collector) and ``/healthz`` (200 or 503 with the
    reason, from ``health``) on ``host:port`` in a daemon thread; port 0 picks one."""
    registry = CollectorRegistry()
    registry.register(LearnerCollector(learner))
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, reason = health(learner)
            start("200 OK" if ok else "503 Service Unavailable",
                  [("Content-Type", "text/plain; charset=utf-8")])
            return [reason.encode() + b"\n"]
        return metrics(environ, start)

    server = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="learner-metrics", daemon=True).start()
    return server
