"""Thousands of random and malformed requests against a running server: every one is answered
with a result or a deliberate status (never INTERNAL or UNKNOWN), and the server stays up."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import decision_pb2 as pb
from tests.server_harness import ServerThread, channel, health_status, make_registry, serve_config

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0]))
names = st.one_of(st.sampled_from([f"user_{i}" for i in range(10)] + ["ticket_1", "item_2"]),
                  st.text(max_size=8))
features = st.builds(
    lambda dense, named: pb.Features(dense=dense, named=named),
    st.one_of(st.lists(floats, max_size=12), st.lists(floats, min_size=6, max_size=8)),
    st.dictionaries(names, floats, max_size=3))
candidates = st.lists(
    st.builds(lambda i, f: pb.Candidate(id=i, features=f),
              st.one_of(st.sampled_from(["a", "b", "queue-0", "queue-1", "queue-2"]),
                        st.text(max_size=6)), features), max_size=8)
requests = st.builds(
    lambda policy, event_id, context, cands, slots, seed, deferred, baseline: pb.DecideRequest(
        policy=policy, event_id=event_id, context=context, candidates=cands, slots=slots,
        seed=seed, deferred=deferred, baseline_action=baseline),
    st.sampled_from(["recsys", "routing", "", "nope"]),
    st.one_of(st.just(""), st.text(max_size=140)),
    features, candidates, st.integers(0, 12), st.integers(0, 2**64 - 1), st.booleans(),
    st.one_of(st.just(""), st.text(max_size=4)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("fuzz")
    make_registry(tmp / "registry")
    running = ServerThread(serve_config(tmp))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ch(server: ServerThread) -> Iterator[grpc.Channel]:
    with channel(server.target) as c:
        yield c


def _call(ch: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
        f"/policyloop.v1.DecisionService/{method}", request_serializer=None,
        response_deserializer=None)
    try:
        call(payload, timeout=10)
    except grpc.RpcError as exc:
        assert exc.details(), "an error status must say what was wrong"
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_random_decide_requests_are_answered_deliberately(ch, request) -> None:
    assert _call(ch, "Decide", request.SerializeToString()) in ALLOWED


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(requests, max_size=5))
def test_random_batches_are_answered_deliberately(ch, rows) -> None:
    payload = pb.DecideBatchRequest(requests=rows).SerializeToString()
    assert _call(ch, "DecideBatch", payload) in ALLOWED


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["Decide", "DecideBatch", "Reward", "Activate", "GetPolicyInfo"]),
       payload=st.binary(max_size=200))
def test_malformed_bytes_never_take_the_server_down(ch, method, payload) -> None:
    # Bytes that do not parse get INVALID_ARGUMENT; bytes that happen to parse are answered
    # like any other request.
    assert _call(ch, method, payload) in ALLOWED


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(event_id=st.text(max_size=140), value=st.floats(), slots=st.lists(st.floats(),
                                                                          max_size=3),
       policy=st.sampled_from(["", "recsys", "nope"]))
def test_random_rewards_are_answered_deliberately(ch, event_id, value, slots, policy) -> None:
    payload = pb.RewardRequest(event_id=event_id, value=value, slot_rewards=slots,
                               policy=policy).SerializeToString()
    assert _call(ch, "Reward", payload) in ALLOWED


def test_the_server_is_still_serving_after_the_fuzzing(ch) -> None:
    assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
