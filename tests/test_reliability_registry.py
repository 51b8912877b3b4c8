"""A damaged registry version never becomes current, and a server or learner that finds the
current version damaged at start-up serves the newest intact one before it, says so, and keeps
the other policies serving (issue 16, finding 5)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from policyloop_client import Client

from online.config import LearnConfig
from online.learner import Learner
from policyloop.contract.errors import ModelRejected
from policyloop.registry.interface import ModelVersion
from policyloop.registry.local import LocalRegistry
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from tests.bandit_stream import register_untrained_routing
from tests.onnx_models import scoring_model
from tests.server_harness import channel, health_status, make_registry, running_server, serve_config
from tests.test_server import recsys_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _flip_model_byte(version: ModelVersion) -> None:
    data = bytearray(version.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    version.model_path.write_bytes(bytes(data))


def _current_text(registry: LocalRegistry, policy: str) -> str:
    return (registry.root / policy / "CURRENT").read_text()


# ---- the registry refuses to point CURRENT at a damaged version


@pytest.mark.parametrize("damage", ["model byte", "extra file byte", "extra file gone"])
def test_set_current_refuses_a_damaged_version_and_current_stays(tmp_path: Path,
                                                                 damage: str) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    model, manifest = scoring_model()
    old = registry.publish("recsys", model, manifest, {"head.npz": b"posterior v1"})
    registry.publish("recsys", model, manifest, {"head.npz": b"posterior v2"})
    if damage == "model byte":
        _flip_model_byte(old)
    elif damage == "extra file byte":
        (old.path / "head.npz").write_bytes(b"posterior v9")
    else:
        (old.path / "head.npz").unlink()
    with pytest.raises(ModelRejected, match="version 1") as err:
        registry.set_current("recsys", 1)
    assert err.value.reason == "checksum"
    with pytest.raises(ModelRejected):
        registry.rollback("recsys")  # the default target, the previous version, is v1 too
    assert _current_text(registry, "recsys") == "2\n"


def test_an_intact_extra_file_reads_back_and_versions_without_digests_still_load(
        tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    model, manifest = scoring_model()
    version = registry.publish("recsys", model, manifest, {"head.npz": b"posterior"})
    assert set(version.manifest.file_sha256) == {"head.npz"}
    assert version.read_file("head.npz") == b"posterior"
    # a manifest written before file digests existed: its extra files are read unchecked
    old = dataclasses.replace(version.manifest, file_sha256={})
    (version.path / "manifest.json").write_text(old.to_json())
    (version.path / "head.npz").write_bytes(b"changed")
    assert registry.get("recsys", 1).read_file("head.npz") == b"changed"
    registry.set_current("recsys", 1)


# ---- the server


def test_admin_rollback_onto_a_damaged_version_leaves_current_and_serving(
        tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model(seed=1))  # v2, current
    _flip_model_byte(registry.get("recsys", 1))
    with running_server(serve_config(tmp_path)) as server, channel(server.target) as ch:
        admin = pb_grpc.AdminServiceStub(ch)
        for request in (pb.RollbackRequest(policy="recsys"),
                        pb.RollbackRequest(policy="recsys", version=1)):
            with pytest.raises(grpc.RpcError) as err:
                admin.Rollback(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "sha256" in (err.value.details() or "")
            assert _current_text(registry, "recsys") == "2\n"
            decide = pb_grpc.DecisionServiceStub(ch).Decide(recsys_request(), timeout=5)
            assert decide.model_version == 2


def _refused_candidate(registry: LocalRegistry, seed: int) -> None:
    """A version the learner's gate refused: published, never current, never served."""
    model, manifest = scoring_model(seed=seed)
    registry.publish("recsys", model,
                     dataclasses.replace(manifest, evaluation={"promoted": False}),
                     make_current=False)


def test_a_server_started_on_a_damaged_current_version_serves_the_newest_intact_one(
        tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")  # recsys v1
    registry.publish("recsys", *scoring_model(seed=1))  # v2: intact, was current
    _refused_candidate(registry, seed=2)  # v3: intact, refused by the gate
    damaged = registry.publish("recsys", *scoring_model(seed=3))  # v4: current
    _flip_model_byte(damaged)
    with running_server(serve_config(tmp_path)) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 2
        info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="recsys"), timeout=5)
        assert info.model_version == 2 and "version 4" in info.damage, info.damage
        routing = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="routing"), timeout=5)
        assert routing.damage == ""
        assert health_status(ch, "recsys") == SERVING and health_status(ch) == SERVING
        assert _current_text(registry, "recsys") == "4\n"  # left for the operator
        metrics = server.running.metrics_registry
        assert metrics.get_sample_value("policyloop_model_rejected_loads_total",
                                        {"policy": "recsys", "reason": "checksum"}) == 1
        time.sleep(0.3)  # the watcher does not retry the damaged version every poll
        assert metrics.get_sample_value("policyloop_model_rejected_loads_total",
                                        {"policy": "recsys", "reason": "checksum"}) == 1
        registry.publish("recsys", *scoring_model(seed=4))  # v5 moves CURRENT past the damage
        deadline = time.monotonic() + 10
        while stub.Decide(recsys_request(), timeout=5).model_version != 5:
            assert time.monotonic() < deadline, "v5 was never served"
            time.sleep(0.02)
        info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="recsys"), timeout=5)
        assert info.damage == ""


def test_an_unreadable_current_file_falls_back_to_the_newest_intact_version(
        tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model(seed=1))  # v2
    (registry.root / "recsys" / "CURRENT").write_text("two\n")
    with running_server(serve_config(tmp_path)) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 2
        info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy="recsys"), timeout=5)
        assert "not a version number" in info.damage


def test_a_policy_with_no_intact_version_is_not_serving_alone(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")  # recsys v1, routing v1
    _flip_model_byte(registry.get("recsys", 1))
    with running_server(serve_config(tmp_path)) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert health_status(ch, "recsys") == NOT_SERVING
        assert health_status(ch, "routing") == SERVING
        assert health_status(ch) == SERVING  # the server as a whole stays in rotation
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(recsys_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = {p.policy: p for p in stub.ListPolicies(pb.ListPoliciesRequest(),
                                                         timeout=5).policies}
        assert "no intact version" in listed["recsys"].damage
        assert listed["routing"].damage == "" and listed["routing"].model_version == 1
        with Client(server.target, timeout=10) as client:  # the client library shows it too
            damages = {p.policy: p.damage for p in client.list_policies()}
        assert damages["recsys"] == listed["recsys"].damage and damages["routing"] == ""
        registry.publish("recsys", *scoring_model(seed=1))  # a good v2 brings it back
        deadline = time.monotonic() + 10
        while health_status(ch, "recsys") != SERVING:
            assert time.monotonic() < deadline, "recsys never came back"
            time.sleep(0.02)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 2


# ---- the learner


def test_a_learner_started_on_a_damaged_current_version_learns_on_the_intact_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register_untrained_routing(registry)  # v1
    register_untrained_routing(registry)  # v2, current
    config = LearnConfig(registry=tmp_path / "registry", policy="routing",
                         bus_path=tmp_path / "bus", partitions=1,
                         checkpoint=tmp_path / "learner.json", gate=False)
    Learner(config).checkpoint()  # it learned on v2
    _flip_model_byte(registry.get("routing", 2))
    with caplog.at_level("WARNING"):
        learner = Learner(config)  # restarts from its checkpoint, which names v2
    assert learner.model.version == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("current version of routing is damaged" in m and "learning on v1" in m
               for m in messages), messages
    assert any("checkpointed routing v2 is damaged" in m and "embedding with v1" in m
               for m in messages), messages
