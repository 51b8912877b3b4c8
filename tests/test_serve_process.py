"""``policyloop serve`` as a process: ports printed on one line, SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.contract.events import DecisionEvent
from protos import decision_pb2_grpc as pb_grpc
from tests.server_harness import channel, make_registry
from tests.test_server import recsys_request

ROOT = Path(__file__).resolve().parents[1]


def start_serve(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyloop.cli", "serve", "--registry", str(tmp / "registry"),
         "--port", "0", "--metrics-port", "0", "--bus", "local", "--bus-path", str(tmp / "bus"),
         "--spool-dir", str(tmp / "spool"), "--grace", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith("policyloop serve: grpc="), line + proc.stderr.read()
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return proc, fields["grpc"], fields["metrics"]


def test_serve_prints_its_ports_and_drains_on_sigterm(tmp_path: Path) -> None:
    make_registry(tmp_path / "registry")
    proc, target, metrics = start_serve(tmp_path)
    answered: list[str] = []
    errors: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:
        with channel(target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            while not stop.is_set():
                try:
                    answered.append(stub.Decide(recsys_request(seed=None), timeout=5).event_id)
                except grpc.RpcError as exc:
                    errors.append(exc.code())
                    return  # the server is going away

    try:
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
        assert "policyloop_model_version" in text
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        stop.set()
        worker.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(answered) > 50
    # A call arriving while the server closes is refused, never half done.
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    consumer = LocalLog(tmp_path / "bus", partitions=4).consumer("check", [bus.DECISIONS])
    logged: set[str] = set()
    while batch := consumer.poll(max_records=10_000, timeout=0.2):
        logged.update(DecisionEvent.from_bytes(r.value).event_id for r in batch)
    assert set(answered) <= logged, "a decision answered before SIGTERM is missing from the log"
