"""Run the real decision server in-process on its own event loop thread, for tests.

Tests talk to it over a real gRPC channel on a port chosen by the OS, exactly like a client
in another process would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policyloop.registry.local import LocalRegistry
from serving.config import PolicyConfig, ServeConfig
from serving.server import RunningServer, start_server
from tests.onnx_models import qnet_model, scoring_model

T = TypeVar("T")


def make_registry(root: Path) -> LocalRegistry:
    """A registry with a ranking policy ``recsys`` and a fixed-action policy ``routing``."""
    registry = LocalRegistry(root)
    registry.publish("recsys", *scoring_model())
    registry.publish("routing", *qnet_model())
    return registry


def serve_config(tmp: Path, **changes: object) -> ServeConfig:
    base = ServeConfig(
        registry=tmp / "registry", port=0, metrics_port=0, bus="local", bus_path=tmp / "bus",
        spool_dir=tmp / "spool", bus_partitions=2, watch_interval_s=0.05,
        policies={"recsys": PolicyConfig(strategy="epsilon_greedy:0.1", max_candidates=50),
                  "routing": PolicyConfig(strategy="softmax:0.5")},
        max_message_bytes=256 * 1024)
    return replace(base, **changes)  # type: ignore[arg-type]


class ServerThread:
    """A started server plus the loop it runs on."""

    def __init__(self, config: ServeConfig, seed: int | None = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(config, seed=seed))
        self.target = f"127.0.0.1:{self.running.port}"
        self.bus_path = config.bus_path

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self, grace: float = 2.0) -> bool:
        delivered = self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        return delivered


@contextmanager
def running_server(config: ServeConfig, seed: int | None = 0) -> Iterator[ServerThread]:
    server = ServerThread(config, seed)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def health_status(ch: grpc.Channel, service: str = "") -> int:
    """The standard health service's answer for ``service``: a HealthCheckResponse status
    (SERVING, NOT_SERVING); grpc.RpcError NOT_FOUND for a service the server does not know."""
    stub = health_pb2_grpc.HealthStub(ch)
    # typeshed's HealthStub declares no Check (types-grpcio-health-checking 1.0.0.20261021)
    check = stub.Check  # type: ignore[attr-defined]
    return int(check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)
