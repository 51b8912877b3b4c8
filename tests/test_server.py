"""The decision server over real gRPC: decisions, propensities, logging, validation, health."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent
from policyloop.registry.local import LocalRegistry
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.config import PolicyConfig
from tests.onnx_models import qnet_model, scoring_model
from tests.server_harness import ServerThread, channel, health_status, make_registry, serve_config

CONTEXT_DIM, ACTION_DIM = 8, 6


def recsys_request(k: int = 5, seed: int | None = 1, **fields: Any) -> pb.DecideRequest:
    rng = np.random.default_rng(seed or 0)
    request = pb.DecideRequest(
        policy="recsys", context=pb.Features(dense=rng.standard_normal(CONTEXT_DIM)),
        candidates=[pb.Candidate(id=f"item-{i}",
                                 features=pb.Features(dense=rng.standard_normal(ACTION_DIM)))
                    for i in range(k)], **fields)
    if seed is not None:
        request.seed = seed
    return request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("server")
    make_registry(tmp / "registry")
    config = serve_config(tmp, policies={
        "recsys": PolicyConfig(strategy="epsilon_greedy:0.1", max_candidates=50),
        "routing": PolicyConfig(strategy="softmax:0.5")})
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.DecisionServiceStub]:
    with channel(server.target) as ch:
        yield pb_grpc.DecisionServiceStub(ch)


def read_topic(server: ServerThread, topic: str, until: bytes) -> list[bytes]:
    """Every record of ``topic`` once one containing ``until`` arrived (the log is async)."""
    deadline = time.monotonic() + 10
    while True:
        consumer = LocalLog(server.bus_path, partitions=2).consumer(f"reader-{uuid.uuid4()}",
                                                                     [topic])
        values: list[bytes] = []
        while batch := consumer.poll(max_records=10_000, timeout=0.1):
            values.extend(r.value for r in batch)
        consumer.close()
        if any(until in v for v in values) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_decide_returns_a_ranking_and_exact_epsilon_greedy_propensity(stub) -> None:
    response = stub.Decide(recsys_request(k=5), timeout=5)
    assert response.policy == "recsys" and response.model_version == 1
    assert len(response.event_id) == 32  # generated
    assert sorted(response.ranking) == [f"item-{i}" for i in range(5)]
    assert response.strategy.startswith("epsilon_greedy")
    (chosen,) = response.chosen
    greedy = chosen.action_id == response.ranking[0]
    assert chosen.propensity == pytest.approx(0.9 + 0.1 / 5 if greedy else 0.1 / 5)
    assert response.active


def test_seeded_decisions_are_reproducible(stub) -> None:
    a = stub.Decide(recsys_request(k=10, seed=7, slots=3), timeout=5)
    b = stub.Decide(recsys_request(k=10, seed=7, slots=3), timeout=5)
    assert [c.action_id for c in a.chosen] == [c.action_id for c in b.chosen]
    assert [c.propensity for c in a.chosen] == [c.propensity for c in b.chosen]
    assert len({c.action_id for c in a.chosen}) == 3


def test_every_decision_is_logged_with_all_candidate_probabilities(server, stub) -> None:
    response = stub.Decide(recsys_request(k=4, event_id="ev-logged-1", slots=2), timeout=5)
    logged = read_topic(server, bus.DECISIONS, b"ev-logged-1")
    events = [DecisionEvent.from_bytes(v) for v in logged]
    (event,) = [e for e in events if e.event_id == "ev-logged-1"]
    assert event.model_version == response.model_version
    assert [event.action_ids[i] for i in event.chosen] == [c.action_id for c in response.chosen]
    assert event.propensities == [c.propensity for c in response.chosen]
    assert event.probabilities.shape == (2, 4)
    np.testing.assert_allclose(event.probabilities.sum(axis=1), 1.0)
    for slot, index in enumerate(event.chosen):
        assert event.probabilities[slot, index] == event.propensities[slot]
    assert event.action_features is not None and event.action_features.shape == (4, ACTION_DIM)


def test_reward_and_activation_reach_the_bus(server, stub) -> None:
    stub.Decide(recsys_request(event_id="ev-deferred", deferred=True), timeout=5)
    stub.Reward(pb.RewardRequest(event_id="ev-deferred", value=1.5, slot_rewards=[1.5],
                                 policy="recsys"), timeout=5)
    stub.Activate(pb.ActivateRequest(event_id="ev-deferred", policy="recsys"), timeout=5)
    rewards = [RewardEvent.from_bytes(v)
               for v in read_topic(server, bus.REWARDS, b"ev-deferred")]
    assert [(r.value, r.slot_rewards) for r in rewards if r.event_id == "ev-deferred"] == [
        (1.5, [1.5])]
    activations = [ActivationEvent.from_bytes(v)
                   for v in read_topic(server, bus.ACTIVATIONS, b"ev-deferred")]
    assert "ev-deferred" in {a.event_id for a in activations}
    decisions = [DecisionEvent.from_bytes(v)
                 for v in read_topic(server, bus.DECISIONS, b"ev-deferred")]
    assert [d.active for d in decisions if d.event_id == "ev-deferred"] == [False]


def test_fixed_action_policy_chooses_among_allowed_actions(stub) -> None:
    context = pb.Features(dense=[0.1, 0.2, 0.3, 0.4, 0.5])
    every = stub.Decide(pb.DecideRequest(policy="routing", context=context, seed=3), timeout=5)
    assert sorted(every.ranking) == ["queue-0", "queue-1", "queue-2"]
    subset = stub.Decide(pb.DecideRequest(
        policy="routing", context=context, seed=3,
        candidates=[pb.Candidate(id="queue-2"), pb.Candidate(id="queue-0")]), timeout=5)
    assert subset.chosen[0].action_id in {"queue-0", "queue-2"}
    assert sorted(subset.ranking) == ["queue-0", "queue-2"]
    assert 0 < subset.chosen[0].propensity < 1  # softmax over two actions


def test_named_features_fill_by_name_and_match_dense(stub) -> None:
    dense = [0.0] * 5
    dense[2] = 1.25
    by_dense = stub.Decide(pb.DecideRequest(policy="routing", seed=5,
                                            context=pb.Features(dense=dense)), timeout=5)
    by_name = stub.Decide(pb.DecideRequest(policy="routing", seed=5,
                                           context=pb.Features(named={"ticket_2": 1.25})),
                          timeout=5)
    assert by_name.ranking == by_dense.ranking
    assert by_name.chosen[0].propensity == by_dense.chosen[0].propensity


def test_decide_batch_decides_every_row(stub) -> None:
    rows = [recsys_request(k=3 + i % 4, seed=i + 1) for i in range(12)]
    response = stub.DecideBatch(pb.DecideBatchRequest(requests=rows), timeout=5)
    assert len(response.responses) == 12
    for row, out in zip(rows, response.responses, strict=True):
        assert len(out.ranking) == len(row.candidates)
        single = stub.Decide(row, timeout=5)  # same seed, same decision as alone
        assert single.chosen[0].action_id == out.chosen[0].action_id


def _bad(**changes: object) -> pb.DecideRequest:
    request = recsys_request(k=3)
    for key, value in changes.items():
        if key == "context":
            request.context.CopyFrom(value)  # type: ignore[arg-type]
        elif key == "candidates":
            del request.candidates[:]
            request.candidates.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    return request


def _cands(n: int, dim: int = ACTION_DIM, ids: list[str] | None = None) -> list[pb.Candidate]:
    ids = ids or [f"c{i}" for i in range(n)]
    return [pb.Candidate(id=i, features=pb.Features(dense=[0.5] * dim)) for i in ids]


BAD_REQUESTS = [
    ("wrong context length", _bad(context=pb.Features(dense=[1.0, 2.0])),
     grpc.StatusCode.INVALID_ARGUMENT, "context.dense has 2 values"),
    ("nan in context", _bad(context=pb.Features(dense=[float("nan")] * CONTEXT_DIM)),
     grpc.StatusCode.INVALID_ARGUMENT, "must be finite"),
    ("infinite candidate feature", _bad(candidates=[pb.Candidate(id="x", features=pb.Features(
        dense=[float("inf")] * ACTION_DIM))]), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates[0].features"),
    ("wrong candidate feature length", _bad(candidates=_cands(2, dim=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates[0].features.dense has 3"),
    ("unknown policy", _bad(policy="nope"), grpc.StatusCode.NOT_FOUND, "policy 'nope'"),
    ("empty candidates", _bad(candidates=[]), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates is empty"),
    ("too many candidates", _bad(candidates=_cands(51)), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 50"),
    ("duplicate ids", _bad(candidates=_cands(3, ids=["a", "b", "a"])),
     grpc.StatusCode.INVALID_ARGUMENT, "duplicate action id 'a'"),
    ("malformed event id", _bad(event_id="has space"), grpc.StatusCode.INVALID_ARGUMENT,
     "event_id"),
    ("too many slots", _bad(slots=4), grpc.StatusCode.INVALID_ARGUMENT, "slots 4"),
    ("unknown named feature", _bad(context=pb.Features(named={"bogus": 1.0})),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown feature 'bogus'"),
    ("dense and named", _bad(context=pb.Features(dense=[0.0] * CONTEXT_DIM,
                                                 named={"user_0": 1.0})),
     grpc.StatusCode.INVALID_ARGUMENT, "not both"),
]


@pytest.mark.parametrize("request_, code, message", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_status(stub, request_, code, message) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(request_, timeout=5)
    assert info.value.code() == code
    assert message in (info.value.details() or "")


def test_oversized_message_is_refused_with_resource_exhausted(stub) -> None:
    huge = _bad(candidates=_cands(40, dim=ACTION_DIM))
    huge.context.named.update({f"pad{i}": 0.0 for i in range(20_000)})
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(huge, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_rewards_are_refused(stub) -> None:
    for request, code in [
        (pb.RewardRequest(event_id="", value=1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RewardRequest(event_id="e1", value=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RewardRequest(event_id="e1", value=1.0, policy="nope"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Reward(request, timeout=5)
        assert info.value.code() == code


def test_policy_info_tells_a_caller_what_the_model_expects(stub) -> None:
    info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="recsys"), timeout=5)
    assert info.kind == "scoring" and info.model_version == 1
    assert list(info.context_features) == [f"user_{i}" for i in range(CONTEXT_DIM)]
    assert len(info.action_features) == ACTION_DIM and info.max_candidates == 50
    routing = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="routing"), timeout=5)
    assert list(routing.actions) == ["queue-0", "queue-1", "queue-2"]
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5)
    assert sorted(p.policy for p in listed.policies) == ["recsys", "routing"]


def test_health_turns_serving_when_the_models_arrive_after_start_up(tmp_path: Path) -> None:
    running = ServerThread(serve_config(tmp_path))  # the registry is still empty
    try:
        with channel(running.target) as ch:

            def status(service: str) -> int:
                return health_status(ch, service)

            assert status("") == status("recsys") == health_pb2.HealthCheckResponse.NOT_SERVING
            registry = LocalRegistry(tmp_path / "registry")
            registry.publish("recsys", *scoring_model())
            deadline = time.monotonic() + 10
            while status("recsys") != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING  # routing: none
            registry.publish("routing", *qnet_model())
            while status("") != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "overall health never turned SERVING"
                time.sleep(0.05)
    finally:
        running.stop()


def test_health_is_serving_overall_and_per_policy(server) -> None:
    with channel(server.target) as ch:
        for service in ("", "recsys", "routing"):
            assert health_status(ch, service) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_status(ch, "nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server) -> None:
    with channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        # typeshed's stub types ServerReflectionInfo as binascii.Incomplete, an exception class
        answers = stub.ServerReflectionInfo(iter([request]), timeout=5)  # type: ignore[operator]
        (response,) = list(answers)
        names = {s.name for s in response.list_services_response.service}
    assert {"policyloop.v1.DecisionService", "policyloop.v1.AdminService",
            "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_by_method_policy_and_code(server, stub) -> None:
    registry = server.running.metrics_registry
    labels = {"method": "Decide", "policy": "unknown", "code": "NOT_FOUND"}
    before = registry.get_sample_value("policyloop_requests_total", labels) or 0.0
    with pytest.raises(grpc.RpcError):
        stub.Decide(_bad(policy="nope"), timeout=5)
    assert registry.get_sample_value("policyloop_requests_total", labels) == before + 1
    stub.Decide(recsys_request(), timeout=5)
    assert registry.get_sample_value(
        "policyloop_requests_total", {"method": "Decide", "policy": "recsys", "code": "OK"}) >= 1
    assert registry.get_sample_value("policyloop_model_version", {"policy": "recsys"}) == 1.0


def test_apprentice_mode_returns_the_baseline_and_counts_agreement(tmp_path: Path) -> None:
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, policies={
        "recsys": PolicyConfig(strategy="greedy", apprentice=True)})
    running = ServerThread(config)
    try:
        with channel(running.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Decide(recsys_request(), timeout=5)
            assert "baseline_action is required" in (info.value.details() or "")
            response = stub.Decide(recsys_request(baseline_action="item-3"), timeout=5)
        assert response.chosen[0].action_id == "item-3"
        assert response.chosen[0].propensity == 1.0
        assert response.policy_action == response.ranking[0]  # greedy
        match = "true" if response.policy_action == "item-3" else "false"
        assert running.running.metrics_registry.get_sample_value(
            "policyloop_apprentice_decisions_total", {"policy": "recsys", "match": match}) == 1
    finally:
        running.stop()


@pytest.mark.kafka
def test_decisions_and_rewards_reach_kafka(tmp_path: Path, kafka_bootstrap: str) -> None:
    from policyloop.bus.kafka import KafkaConsumerAdapter
    from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

    create_topics(kafka_bootstrap, DEFAULT_TOPICS)
    make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path, bus="kafka", kafka_bootstrap=kafka_bootstrap))
    marker = f"kafka-{uuid.uuid4().hex[:12]}"
    try:
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            for i in range(20):
                stub.Decide(recsys_request(event_id=f"{marker}-{i}"), timeout=5)
                stub.Reward(pb.RewardRequest(event_id=f"{marker}-{i}", value=float(i)),
                            timeout=5)
    finally:
        assert server.stop(grace=10)  # everything delivered before the server stopped
    consumer = KafkaConsumerAdapter(kafka_bootstrap, f"check-{marker}",
                                    [bus.DECISIONS, bus.REWARDS])
    seen: dict[str, set[str]] = {bus.DECISIONS: set(), bus.REWARDS: set()}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(len(v) == 20 for v in seen.values()):
        for record in consumer.poll(max_records=1000, timeout=1.0):
            if record.key and record.key.startswith(marker.encode()):
                seen[record.topic].add(record.key.decode())
    consumer.close()
    assert all(len(v) == 20 for v in seen.values()), {k: len(v) for k, v in seen.items()}
