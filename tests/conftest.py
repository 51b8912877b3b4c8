"""Fixtures shared by the test modules.

Kafka: tests marked ``@pytest.mark.kafka`` use ``kafka_bootstrap``, a real single-node broker
that ``scripts/kafka.sh start`` runs from Maven Central jars (JDK 17+ and Maven needed; the
first start downloads the jars). Deselect them with ``-m "not kafka"``. With the environment
variable ``KAFKA_BOOTSTRAP`` set, that broker is used instead and never started or stopped;
``KAFKA_PORT`` picks the port of the script's broker (default 19092).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"

# Run as its own process by test_inference_v2: tritonclient's protobuf messages clash with
# protos/ in one process, so --doctest-modules must not import it.
collect_ignore = ["triton_probe.py"]


def _kafka_sh(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(KAFKA_SH), command], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``127.0.0.1:<port>`` of a running broker for the whole session.

    A broker this fixture started is stopped at the end of the session; one that was already
    running is left running. Its data folder survives either way (``scripts/kafka.sh clean``).
    """
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    was_running = _kafka_sh("status", timeout=30).returncode == 0
    started = _kafka_sh("start", timeout=600)
    if started.returncode != 0:
        pytest.fail("scripts/kafka.sh start failed (deselect broker tests with "
                    f"-m 'not kafka'):\n{started.stderr}{started.stdout}", pytrace=False)
    lines = [ln for ln in started.stdout.splitlines() if ln.startswith("KAFKA_BOOTSTRAP=")]
    assert lines, f"scripts/kafka.sh start printed no KAFKA_BOOTSTRAP line:\n{started.stdout}"
    yield lines[-1].split("=", 1)[1]
    if not was_running:
        _kafka_sh("stop", timeout=60)


@pytest.fixture
def unique_topic(kafka_bootstrap: str) -> Iterator[Callable[[str], str]]:
    """``unique_topic(base)`` gives ``<base>-<8 hex digits>``, a name no other test uses;
    the topics so named that the test created are deleted after it."""
    names: list[str] = []

    def make(base: str) -> str:
        names.append(f"{base}-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    if names:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, bootstrap_timeout_ms=10_000)
        try:
            admin.delete_topics(names, timeout_ms=10_000, raise_errors=False)
        finally:
            admin.close()


def free_ports(n: int) -> list[int]:
    """``n`` distinct local ports nothing listens on (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclasses.dataclass
class PrivateBroker:
    """A broker of one test's own on free ports, so it can be stopped and started without
    disturbing the session's."""

    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, command: str) -> None:
        """``scripts/kafka.sh <command>`` for this broker."""
        env = {**os.environ, "KAFKA_PORT": str(self.port),
               "KAFKA_CONTROLLER_PORT": str(self.controller_port)}
        done = subprocess.run(["bash", str(KAFKA_SH), command], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    """A started ``PrivateBroker``, wiped (data, settings, log) after the test."""
    broker = PrivateBroker(*free_ports(2))
    broker.run("start")
    try:
        yield broker
    finally:
        broker.run("clean")
