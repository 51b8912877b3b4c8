"""The ``policyloop`` subcommands that wrap tested code: registry, admin and topics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from policyloop.registry.local import LocalRegistry
from tests.onnx_models import scoring_model
from tests.server_harness import ServerThread, make_registry, serve_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policyloop.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_registry_list_show_and_rollback(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    registry.publish("recsys", *scoring_model(seed=1))
    listed = json.loads(cli("registry", "list", "--registry", str(tmp_path / "reg")).stdout)
    assert {"policy": "recsys", "current": 2, "versions": [1, 2]} in listed
    shown = json.loads(cli("registry", "show", "--registry", str(tmp_path / "reg"),
                           "--policy", "recsys").stdout)
    assert shown["version"] == 2 and shown["parent_version"] == 1
    out = cli("registry", "rollback", "--registry", str(tmp_path / "reg"), "--policy", "recsys")
    assert out.returncode == 0 and registry.current("recsys").version == 1
    missing = cli("registry", "show", "--registry", str(tmp_path / "reg"), "--policy", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_admin_pins_a_running_servers_version(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry")
    registry.publish("recsys", *scoring_model(seed=1))
    server = ServerThread(serve_config(tmp_path))
    try:
        out = cli("admin", "pin", "--target", server.target, "--policy", "recsys",
                  "--version", "1")
        assert out.returncode == 0, out.stderr
        assert "serving version 1 (pinned=True)" in out.stdout
        assert server.running.store.get("recsys").version == 1
        assert LocalRegistry(tmp_path / "registry").current("recsys").version == 2
    finally:
        server.stop()


@pytest.mark.kafka
def test_topics_are_created_idempotently(kafka_bootstrap: str) -> None:
    first = cli("topics", "--kafka", kafka_bootstrap)
    again = cli("topics", "--kafka", kafka_bootstrap)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert "models: partitions=1" in again.stdout and "compact=True (exists)" in again.stdout
    assert "decisions: partitions=4" in again.stdout
