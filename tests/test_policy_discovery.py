"""Policies published to the registry while the server runs are served without a restart,
when the server serves the registry's policies (``model_control_mode`` poll, or auto with none
configured); configured policies alone stay exactly the set named."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from policyloop.registry.local import LocalRegistry
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from protos import grpc_inference_pb2 as v2
from protos import grpc_inference_pb2_grpc as v2_grpc
from serving.config import PolicyConfig
from serving.metrics import ServingMetrics
from serving.model_store import ModelStore
from tests.onnx_models import qnet_model, scoring_model
from tests.server_harness import ServerThread, channel, health_status, serve_config
from tests.test_server import recsys_request

SERVING = health_pb2.HealthCheckResponse.SERVING


def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait until ``check()`` is truthy (an RpcError counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def routing_request(policy: str) -> pb.DecideRequest:
    return pb.DecideRequest(policy=policy, context=pb.Features(dense=[0.1, -0.2, 0.3, 0.0, 1.0]),
                            seed=7)


def published_broken(registry: LocalRegistry, policy: str) -> int:
    """Publish a version of ``policy`` whose model file no longer matches its checksum."""
    version = registry.publish(policy, *qnet_model(policy=policy))
    good = version.model_path.read_bytes()
    version.model_path.write_bytes(b"\x08garbage" + good[8:])
    return version.version


@pytest.fixture()
def polled(tmp_path: Path) -> Iterator[tuple[ServerThread, LocalRegistry]]:
    """A server on a registry holding only ``recsys``, no policy configured (auto: poll)."""
    registry = LocalRegistry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model())
    server = ServerThread(serve_config(tmp_path, policies={}, default_strategy="softmax:0.5"))
    yield server, registry
    server.stop()


def test_a_policy_published_while_serving_is_served_listed_healthy_and_labelled(
        polled) -> None:
    server, registry = polled
    metrics = server.running.metrics_registry
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert [p.policy for p in stub.ListPolicies(pb.ListPoliciesRequest()).policies] == [
            "recsys"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(routing_request("routing"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        registry.publish("routing", *qnet_model())
        eventually(lambda: stub.Decide(routing_request("routing"), timeout=5),
                   "Decide served the new policy")

        response = stub.Decide(routing_request("routing"), timeout=5)
        assert response.model_version == 1 and response.chosen[0].action_id.startswith("queue-")
        assert response.strategy.startswith("softmax")  # default_strategy: no table for it
        batch = stub.DecideBatch(pb.DecideBatchRequest(
            requests=[routing_request("routing"), recsys_request()]), timeout=5)
        assert [r.policy for r in batch.responses] == ["routing", "recsys"]
        listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5).policies
        assert [(p.policy, p.model_version) for p in listed] == [("recsys", 1), ("routing", 1)]
        info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="routing"), timeout=5)
        assert info.kind == "qnet" and info.max_candidates == PolicyConfig().max_candidates
        assert not info.apprentice
        eventually(lambda: health_status(ch, "routing") == SERVING, "health SERVING for it")
        assert health_status(ch, "") == health_status(ch, "recsys") == SERVING

        inference = v2_grpc.GRPCInferenceServiceStub(ch)
        context = np.zeros((1, 5), dtype=np.float32)
        scored = inference.ModelInfer(v2.ModelInferRequest(
            model_name="routing",
            inputs=[v2.ModelInferRequest.InferInputTensor(name="context", datatype="FP32",
                                                          shape=[1, 5])],
            raw_input_contents=[context.tobytes()]), timeout=5)
        assert scored.model_version == "1" and list(scored.outputs[0].shape) == [1, 3]

    assert metrics.get_sample_value("policyloop_requests_total", {
        "method": "Decide", "policy": "routing", "code": "OK"}) >= 2
    assert metrics.get_sample_value("policyloop_model_version", {"policy": "routing"}) == 1
    assert metrics.get_sample_value("policyloop_model_swaps_total", {"policy": "routing"}) == 0


def test_a_broken_first_version_is_reported_not_served_and_a_good_one_then_is(polled) -> None:
    server, registry = polled
    metrics = server.running.metrics_registry
    rejected = {"policy": "triage", "reason": "checksum"}
    published_broken(registry, "triage")
    eventually(lambda: metrics.get_sample_value("policyloop_model_rejected_loads_total",
                                                rejected), "the rejection counted")
    registry.publish("routing", *qnet_model())  # a good policy after it is not held back
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        eventually(lambda: stub.Decide(routing_request("routing"), timeout=5),
                   "the other new policy served")
        time.sleep(0.2)  # more polls: the rejected version is not retried
        assert metrics.get_sample_value("policyloop_model_rejected_loads_total", rejected) == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(routing_request("triage"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5).policies
        assert "triage" not in [p.policy for p in listed]
        with pytest.raises(grpc.RpcError) as err:
            health_status(ch, "triage")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert health_status(ch, "") == SERVING  # the others are unaffected

        registry.publish("triage", *qnet_model(policy="triage", seed=1))
        eventually(lambda: stub.Decide(routing_request("triage"), timeout=5).model_version == 2,
                   "the good second version served")
        eventually(lambda: health_status(ch, "triage") == SERVING, "health SERVING for it")
        assert health_status(ch, "") == SERVING


@pytest.mark.parametrize("mode, served", [
    ("auto", ["recsys"]), ("explicit", ["recsys"]), ("poll", ["recsys", "routing"])])
def test_configured_policies_alone_are_served_unless_the_registry_is_polled(
        tmp_path: Path, mode: str, served: list[str]) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model())
    configured = {"recsys": PolicyConfig(strategy="greedy", max_candidates=50)}
    server = ServerThread(serve_config(tmp_path, policies=configured, model_control_mode=mode))
    try:
        registry.publish("routing", *qnet_model())
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            if mode == "poll":
                eventually(lambda: stub.Decide(routing_request("routing"), timeout=5),
                           "poll serves the registry's other policy")
            else:
                time.sleep(0.3)  # several polls
            listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=5).policies
            assert [p.policy for p in listed] == served
            assert stub.Decide(recsys_request(), timeout=5).strategy == "greedy"  # its table
    finally:
        server.stop()


def test_a_policy_whose_versions_vanish_from_the_registry_keeps_serving(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model())
    store = ModelStore(registry, [], ServingMetrics.create(CollectorRegistry()),
                       providers=["CPUExecutionProvider"], watch_interval_s=0.01, discover=True)
    store.start()
    try:
        registry.publish("routing", *qnet_model())
        eventually(lambda: store.serves("routing"), "routing discovered")
        with caplog.at_level(logging.WARNING, logger="serving.model_store"):
            shutil.rmtree(registry.root / "routing")
            eventually(lambda: "no current version in the registry any more" in caplog.text,
                       "the disappearance logged")
            time.sleep(0.1)  # more polls
        assert caplog.text.count("routing has no current version") == 1
        assert store.policies == ["recsys", "routing"] and store.get("routing").version == 1
    finally:
        store.stop()
