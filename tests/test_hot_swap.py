"""Model versions change under a running server without a restart and without a failed call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from policyloop.registry.local import LocalRegistry
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from tests.onnx_models import qnet_model, scoring_model
from tests.server_harness import ServerThread, channel, make_registry, serve_config
from tests.test_server import recsys_request


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, LocalRegistry]]:
    registry = make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path, max_model_bytes=64 * 1024))
    yield server, registry
    server.stop()


def wait_for_version(stub: pb_grpc.DecisionServiceStub, version: int,
                     timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stub.Decide(recsys_request(), timeout=5).model_version == version:
            return
        time.sleep(0.02)
    raise AssertionError(f"server never served version {version}")


def test_a_published_version_is_served_without_restart(served) -> None:
    server, registry = served
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 1
        registry.publish("recsys", *scoring_model(seed=1))
        wait_for_version(stub, 2)
    swaps = server.running.metrics_registry.get_sample_value(
        "policyloop_model_swaps_total", {"policy": "recsys"})
    assert swaps == 1


def test_fifty_swaps_under_concurrent_load_fail_no_request(served) -> None:
    server, registry = served
    failures: list[str] = []
    versions: set[int] = set()
    done = threading.Event()
    calls = [0]

    def load() -> None:
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            while not done.is_set():
                try:
                    versions.add(stub.Decide(recsys_request(seed=None), timeout=5).model_version)
                    calls[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        for i in range(50):
            version = registry.publish("recsys", *scoring_model(seed=100 + i)).version
            wait_for_version(stub, version)
    done.set()
    for t in threads:
        t.join()
    assert failures == []
    assert calls[0] > 100
    assert max(versions) == 51 and len(versions) > 10


@pytest.mark.parametrize("damage, reason", [
    ("corrupt", "checksum"),
    ("truncated", "checksum"),
    ("oversized", "oversized"),  # the server's max_model_bytes is 64 KiB here
    ("link out of the registry", "outside"),
    ("incompatible", "incompatible"),
])
def test_a_bad_version_is_rejected_and_the_old_one_keeps_serving(served, tmp_path: Path,
                                                                  damage, reason) -> None:
    server, registry = served
    if damage == "incompatible":  # a model trained on another feature layout
        registry.publish("recsys", *scoring_model(seed=2, context_dim=9))
    else:
        bad = registry.publish("recsys", *scoring_model(seed=2))
        good = bad.model_path.read_bytes()
        if damage == "corrupt":
            bad.model_path.write_bytes(b"\x08garbage" + good[8:])
        elif damage == "truncated":
            bad.model_path.write_bytes(good[: len(good) // 2])
        elif damage == "oversized":
            bad.model_path.write_bytes(good + b"\0" * (64 * 1024))
        else:  # the same bytes, but outside: the checksum alone would pass
            (tmp_path / "elsewhere.onnx").write_bytes(good)
            bad.model_path.unlink()
            bad.model_path.symlink_to(tmp_path / "elsewhere.onnx")
    labels = {"policy": "recsys", "reason": reason}
    deadline = time.monotonic() + 10
    metrics = server.running.metrics_registry
    while not metrics.get_sample_value("policyloop_model_rejected_loads_total", labels):
        assert time.monotonic() < deadline, "rejection was never counted"
        time.sleep(0.02)
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 1
        registry.publish("recsys", *scoring_model(seed=3))  # a good one after it is taken
        wait_for_version(stub, 3)


def test_a_model_with_the_wrong_signature_is_rejected(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path))
    try:
        model, manifest = qnet_model(policy="recsys", context_dim=8)  # qnet bytes, ...
        _, scoring_manifest = scoring_model()
        registry.publish("recsys", model, scoring_manifest)  # ... under a scoring manifest
        labels = {"policy": "recsys", "reason": "signature"}
        deadline = time.monotonic() + 10
        metrics = server.running.metrics_registry
        while not metrics.get_sample_value("policyloop_model_rejected_loads_total", labels):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        server.stop()


def test_pin_and_rollback_through_the_admin_service(served) -> None:
    server, registry = served
    registry.publish("recsys", *scoring_model(seed=1))
    with channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        admin = pb_grpc.AdminServiceStub(ch)
        wait_for_version(stub, 2)
        info = admin.Pin(pb.PinRequest(policy="recsys", version=1), timeout=10)
        assert info.pinned and info.model_version == 1
        registry.publish("recsys", *scoring_model(seed=2))  # v3 appears but is not served
        time.sleep(0.3)
        assert stub.Decide(recsys_request(), timeout=5).model_version == 1
        info = admin.Unpin(pb.UnpinRequest(policy="recsys"), timeout=10)
        assert not info.pinned
        wait_for_version(stub, 3)
        info = admin.Rollback(pb.RollbackRequest(policy="recsys"), timeout=10)
        assert info.model_version == 2 and registry.current("recsys").version == 2
        assert stub.Decide(recsys_request(), timeout=5).model_version == 2
        with pytest.raises(grpc.RpcError) as err:
            admin.Pin(pb.PinRequest(policy="recsys", version=99), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_pin_is_not_undone_by_a_watcher_that_read_the_registry_just_before(
        tmp_path: Path) -> None:
    """The watcher reads the registry's current version (2) and is held there; meanwhile an
    admin pins version 1. When the watcher goes on, version 1 must stay served and pinned (it
    used to swap in version 2 over the pin, for good)."""
    from prometheus_client import CollectorRegistry

    from serving.metrics import ServingMetrics
    from serving.model_store import ModelStore

    local = make_registry(tmp_path / "registry")
    local.publish("recsys", *scoring_model(seed=1))
    entered, release = threading.Event(), threading.Event()

    class HeldRegistry:
        hold = False

        def __getattr__(self, name: str):
            return getattr(local, name)

        def current(self, policy: str):
            version = local.current(policy)
            if self.hold and policy == "recsys":
                entered.set()
                release.wait(10)
            return version

    registry = HeldRegistry()
    store = ModelStore(registry, ["recsys"],
                       ServingMetrics.create(CollectorRegistry()),
                       providers=["CPUExecutionProvider"], watch_interval_s=0.01)
    store.start()
    try:
        assert store.get("recsys").version == 2
        registry.hold = True
        assert entered.wait(10)  # the watcher has read version 2 and is held
        pinning = threading.Thread(target=store.pin, args=("recsys", 1))
        pinning.start()
        time.sleep(0.2)
        registry.hold = False
        release.set()
        pinning.join(10)
        time.sleep(0.2)  # more watcher iterations
        assert store.is_pinned("recsys") and store.get("recsys").version == 1
    finally:
        release.set()
        store.stop()
