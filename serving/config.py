"""The decision server's configuration: one typed object, built once in ``main()``.

Sources, later ones winning: defaults here, a TOML file (``--config``), environment variables
``POLICYLOOP_<FIELD>``, then command-line flags, as for every command
(``policyloop/contract/settings.py``). Nothing else in ``serving/`` reads the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import REWARD_LIMIT
from policyloop.contract.settings import read_file, resolve, setting


@dataclass(frozen=True)
class PolicyConfig:
    """How one named policy is served. ``strategy`` empty: the one its version's spec names
    (``[exploration]``), else the server's ``default_strategy``."""

    strategy: str = ""
    apprentice: bool = False
    max_candidates: int = 1000


MODEL_CONTROL_MODES = ("auto", "poll", "explicit")


@dataclass(frozen=True)
class ServeConfig:
    registry: Path = setting(Path("var/registry"), "model registry folder (with "
                             "--registry-kafka: this replica's cache of it)")
    registry_kafka: str = setting("", "read models from the Kafka-backed registry at this "
                                  "bootstrap, no shared volume; empty: the folder alone",
                                  metavar="HOST:PORT")
    registry_topic: str = setting("models", "the Kafka-backed registry's compacted topic")
    host: str = setting("127.0.0.1", "address the gRPC port binds")
    port: int = setting(50051, "gRPC port (0 = any free port)")
    metrics_port: int = setting(9464, "Prometheus port (0 = any free port)")
    # Policies configured by name; which policies are served follows from them and
    # model_control_mode (``discovers_policies``). Not a setting: [policies.NAME] tables in
    # the file, --policy and --apprentice flags.
    policies: Mapping[str, PolicyConfig] = field(default_factory=dict)
    model_control_mode: str = setting(
        "auto", "which policies are served: poll = the configured ones and every policy in the "
        "registry, one published later as soon as its first version loads (one without a "
        "[policies.NAME] table gets --strategy and the defaults); explicit = the configured "
        "ones alone (none configured: the registry's at start-up); auto = explicit when "
        "policies are configured (--policy, [policies.NAME]), poll otherwise",
        choices=MODEL_CONTROL_MODES)
    default_strategy: str = setting("epsilon_greedy:0.1", "exploration strategy of a policy "
                                    "named without one or served from the registry without "
                                    "a [policies.NAME] table, when its spec names none "
                                    "([exploration] strategy)", flag="--strategy")
    bus: str = setting("local", "event bus: the embedded durable log under --bus-path, or "
                       "Kafka", choices=("local", "kafka"))
    bus_path: Path = setting(Path("var/bus"), "embedded event log folder (bus local)")
    kafka_bootstrap: str = setting("", "Kafka bootstrap (bus kafka)", flag="--kafka",
                                   metavar="HOST:PORT")
    bus_partitions: int = setting(4, "partitions of the embedded log's topics (bus local)")
    spool_dir: Path = setting(Path("var/spool"), "where decisions wait while the bus is down")
    log_writer: str = setting("thread", "who writes the decision log: a thread of the server, "
                              "or a child process outside its interpreter lock "
                              "(serving/log_writer.py)", choices=("thread", "process"))
    log_queue_size: int = setting(10_000, "events held in memory for the bus; more go to the "
                                  "spool")
    spool_budget_bytes: int = setting(1 << 30, "largest the spool may grow, bytes (beyond: "
                                      "events dropped, counted)")
    durable_ack: bool = setting(False, "answer Decide/Reward/Activate only once the event is "
                                "on the bus or in the spool file, so a killed server loses no "
                                "acknowledged event (costs about the log's 5 ms linger)")
    watch_interval_s: float = setting(1.0, "registry poll interval, seconds",
                                      flag="--watch-interval")
    grace_period_s: float = setting(10.0, "drain period on SIGTERM, seconds", flag="--grace")
    max_message_bytes: int = setting(4 << 20, "largest gRPC message, bytes")
    max_batch_rows: int = setting(1024, "most rows of one batch request")
    reward_limit: float = setting(REWARD_LIMIT, "largest |value| of a reward (and of each "
                                  "slot reward); larger ones are refused with INVALID_ARGUMENT")
    pending_decisions: bool = setting(True, "between two versions, narrow the posterior UCB "
                                      "and Thompson sampling explore with by each decision "
                                      "made, as the learner's will once it fits it, and move "
                                      "its mean by each reward that reaches this replica; "
                                      "--no-pending-decisions: explore with the version's "
                                      "posterior as published")
    # Micro-batching of concurrent Decide calls (serving/batching.py). On by default: the
    # serving benchmark shows it faster at every load.
    micro_batch_size: int = setting(32, "decide up to N concurrent Decide calls together (1 "
                                    "turns micro-batching off)", flag="--micro-batch",
                                    metavar="N")
    micro_batch_wait_ms: float = setting(1.0, "longest a Decide call waits for its micro-batch "
                                         "to fill; while waiting batches stay near one call, "
                                         "calls do not wait", metavar="MS")
    max_concurrency: int = setting(1024, "most RPCs handled at once")
    max_model_bytes: int = setting(256 << 20, "larger registry files are refused on load")
    ort_threads: int = setting(1, "onnxruntime intra-op threads")
    use_gpu: bool = setting(True, "use onnxruntime's CUDA provider when it and a GPU are "
                            "present")
    # Security (serving/auth.py): TLS on the gRPC port when tls_cert and tls_key are set;
    # mutual TLS when tls_client_ca is set too; token scopes when tokens_file is set.
    tls_cert: Path | None = setting(None, "PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: require client certificates "
                                         "it signed (mutual TLS)")
    tokens_file: Path | None = setting(None, "TOML file of bearer tokens and their scopes "
                                       "(decide, reward, admin)")

    def policy(self, name: str) -> PolicyConfig:
        """How ``name`` is served: its ``[policies.NAME]`` table, or the defaults for a policy
        without one, e.g. one served from the registry (strategy: ``DataPlane.strategy``)."""
        return self.policies.get(name) or PolicyConfig()

    @property
    def discovers_policies(self) -> bool:
        """Whether the server serves every policy of the registry, including those published
        after start-up (``model_control_mode`` poll, or auto with no policy configured)."""
        return self.model_control_mode == "poll" or (self.model_control_mode == "auto"
                                                     and not self.policies)

    def validate(self) -> ServeConfig:
        if self.bus not in ("local", "kafka"):
            raise InvalidArgument(f"bus must be 'local' or 'kafka', got {self.bus!r}")
        if self.log_writer not in ("thread", "process"):
            raise InvalidArgument(f"log_writer must be 'thread' or 'process', got "
                                  f"{self.log_writer!r}")
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise InvalidArgument(f"model_control_mode must be one of "
                                  f"{list(MODEL_CONTROL_MODES)}, got {self.model_control_mode!r}")
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
        if not (math.isfinite(self.reward_limit) and self.reward_limit > 0):
            raise InvalidArgument(f"reward_limit must be positive and finite, got "
                                  f"{self.reward_limit}")
        if not 0 < self.micro_batch_wait_ms <= 1000:
            raise InvalidArgument("micro_batch_wait_ms must be in (0, 1000], got "
                                  f"{self.micro_batch_wait_ms}")
        return self


def load_serve_config(path: Path | None, overrides: Mapping[str, Any],
                      environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Build the config from a TOML file, ``POLICYLOOP_<FIELD>`` variables and flag overrides
    (``policyloop/contract/settings.py``, as every command does).

    The TOML file holds top-level keys named like the fields, plus ``[policies.NAME]`` tables.
    ``overrides`` maps field names to flag values; ``None`` means the flag was not given.
    """
    raw = read_file(path)
    policies = raw.pop("policies", {})
    values = resolve(ServeConfig, file=raw, environ=os.environ if environ is None else environ,
                     flags=overrides, source=f"config file {path}")
    try:
        values["policies"] = {name: PolicyConfig(**table) for name, table in policies.items()}
    except TypeError as exc:
        raise InvalidArgument(f"config file {path}: [policies]: {exc}") from exc
    if overrides.get("policies") is not None:
        values["policies"] = overrides["policies"]
    return ServeConfig(**values).validate()
