"""The decision server's configuration: one typed object, built once in ``main()``.

Sources, later ones winning: defaults here, a TOML file (``--config``), environment variables
``POLICYLOOP_*`` for the settings a deployment commonly overrides, then command-line flags.
Nothing else in ``serving/`` reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from policyloop.contract.errors import InvalidArgument


@dataclass(frozen=True)
class PolicyConfig:
    """How one named policy is served."""

    strategy: str = "epsilon_greedy:0.1"
    apprentice: bool = False
    max_candidates: int = 1000


@dataclass(frozen=True)
class ServeConfig:
    # The registry folder; with registry_kafka set, this replica's cache of the Kafka registry.
    registry: Path = Path("var/registry")
    registry_kafka: str = ""  # bootstrap HOST:PORT of a Kafka-backed registry (no shared volume)
    registry_topic: str = "models"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    # Policies to serve; empty means every policy the registry holds at start-up.
    policies: Mapping[str, PolicyConfig] = field(default_factory=dict)
    default_strategy: str = "epsilon_greedy:0.1"
    # Event bus: "local" (embedded durable log under bus_path) or "kafka" (kafka_bootstrap).
    bus: str = "local"
    bus_path: Path = Path("var/bus")
    kafka_bootstrap: str = ""
    bus_partitions: int = 4
    spool_dir: Path = Path("var/spool")
    # Who writes the decision log to the bus: "thread" (a thread of the server) or "process"
    # (a child process, outside the server's interpreter lock: serving/log_writer.py).
    log_writer: str = "thread"
    log_queue_size: int = 10_000
    spool_budget_bytes: int = 1 << 30
    # Answer Decide/Reward/Activate only once the event is on the bus or in the spool file, so
    # a killed server loses no acknowledged event (costs about the log's 5 ms linger).
    durable_ack: bool = False
    watch_interval_s: float = 1.0
    grace_period_s: float = 10.0
    max_message_bytes: int = 4 << 20
    max_batch_rows: int = 1024
    # Micro-batching of concurrent Decide calls (serving/batching.py): up to this many calls
    # share one data-plane call, waiting at most micro_batch_wait_ms (only while others join);
    # 1 turns it off. On by default: the serving benchmark shows it faster at every load.
    micro_batch_size: int = 32
    micro_batch_wait_ms: float = 1.0
    max_concurrency: int = 1024
    max_model_bytes: int = 256 << 20  # larger registry files are refused on load
    ort_threads: int = 1
    use_gpu: bool = True
    # Security (serving/auth.py): TLS on the gRPC port when tls_cert and tls_key are set;
    # mutual TLS when tls_client_ca is set too; token scopes when tokens_file is set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tokens_file: Path | None = None

    def policy(self, name: str) -> PolicyConfig:
        return self.policies.get(name) or PolicyConfig(strategy=self.default_strategy)

    def validate(self) -> ServeConfig:
        if self.bus not in ("local", "kafka"):
            raise InvalidArgument(f"bus must be 'local' or 'kafka', got {self.bus!r}")
        if self.log_writer not in ("thread", "process"):
            raise InvalidArgument(f"log_writer must be 'thread' or 'process', got "
                                  f"{self.log_writer!r}")
        if self.bus == "kafka" and not self.kafka_bootstrap:
            raise InvalidArgument("bus 'kafka' needs kafka_bootstrap (HOST:PORT)")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise InvalidArgument(f"{name} must be in 0..65535, got {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("log_queue_size", "max_message_bytes", "max_batch_rows", "max_concurrency",
                     "max_model_bytes", "ort_threads", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.micro_batch_wait_ms <= 1000:
            raise InvalidArgument("micro_batch_wait_ms must be in (0, 1000], got "
                                  f"{self.micro_batch_wait_ms}")
        return self


_ENV = {
    "POLICYLOOP_REGISTRY": "registry",
    "POLICYLOOP_REGISTRY_KAFKA": "registry_kafka",
    "POLICYLOOP_BUS": "bus",
    "POLICYLOOP_BUS_PATH": "bus_path",
    "POLICYLOOP_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "POLICYLOOP_SPOOL_DIR": "spool_dir",
    "POLICYLOOP_DURABLE_ACK": "durable_ack",
    "POLICYLOOP_LOG_WRITER": "log_writer",
    "POLICYLOOP_TLS_CERT": "tls_cert",
    "POLICYLOOP_TLS_KEY": "tls_key",
    "POLICYLOOP_TLS_CLIENT_CA": "tls_client_ca",
    "POLICYLOOP_TOKENS_FILE": "tokens_file",
}


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(ServeConfig)}[name]
    try:
        if kind == "Path":
            return Path(value)
        if kind == "Path | None":
            return Path(value) if value else None
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    except ValueError as exc:
        raise InvalidArgument(f"config {name}: {value!r} is not a valid {kind}") from exc
    return value


def load_serve_config(path: Path | None, overrides: Mapping[str, Any],
                      environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Build the config from a TOML file, ``POLICYLOOP_*`` variables and flag overrides.

    The TOML file holds top-level keys named like the fields, plus ``[policies.NAME]`` tables.
    ``overrides`` holds flag values; ``None`` means the flag was not given.
    """
    known = {f.name for f in fields(ServeConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        raw = tomllib.loads(Path(path).read_text())
        policies = raw.pop("policies", {})
        unknown = set(raw) - known
        if unknown:
            raise InvalidArgument(f"config file {path}: unknown keys {sorted(unknown)}")
        values.update(raw)
        values["policies"] = {name: PolicyConfig(**table) for name, table in policies.items()}
    env = os.environ if environ is None else environ
    values.update({attr: env[var] for var, attr in _ENV.items() if var in env})
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {k: (v if k == "policies" else _coerce(k, v)) for k, v in values.items()}
    return replace(ServeConfig(), **coerced).validate()
