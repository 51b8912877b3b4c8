"""``policyloop serve``: the decision server process.

Wires the pieces together: registry -> model store (hot swap) -> data plane -> gRPC services
(decisions, admin, v2 inference, health, reflection), the decision log on the event bus, and
Prometheus metrics on their own HTTP port. SIGTERM drains: health turns NOT_SERVING, in-flight
calls finish within the grace period, the decision log is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from policyloop.bus.interface import open_producer
from policyloop.contract.errors import InvalidArgument
from policyloop.registry.interface import Registry, open_registry
from policyloop.registry.onnx_model import LoadedModel, choose_providers
from protos import decision_pb2, decision_pb2_grpc, grpc_inference_pb2, grpc_inference_pb2_grpc
from serving.auth import AuthInterceptor, load_tokens
from serving.batching import DecideBatcher
from serving.config import ServeConfig
from serving.dataplane import DataPlane
from serving.decision_log import DecisionLog
from serving.grpc_decision import AdminServicer, DecisionServicer
from serving.grpc_inference import InferenceServicer
from serving.interceptors import ServingInterceptor
from serving.log_writer import ProcessProducer
from serving.metrics import ServingMetrics
from serving.model_store import ModelStore

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """Handles of a started server, for the CLI and for in-process tests."""

    server: grpc.aio.Server
    port: int
    metrics_port: int
    registry: Registry
    store: ModelStore
    decision_log: DecisionLog
    health: health.aio.HealthServicer
    metrics_registry: CollectorRegistry
    plane: DataPlane
    _http: object

    async def stop(self, grace: float) -> bool:
        """Drain and flush; True when every logged record reached the bus."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.store.stop()
        self.registry.close()  # a Kafka-backed one has a consumer thread to end
        delivered = await asyncio.to_thread(self.decision_log.close, grace)
        shutdown = getattr(self._http, "shutdown", None)
        if shutdown is not None:
            shutdown()
        return delivered


def _tls_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = (None if config.tls_client_ca is None
                 else _read_pem("tls_client_ca", config.tls_client_ca))
    key, cert = _read_pem("tls_key", config.tls_key), _read_pem("tls_cert", config.tls_cert)
    _check_pair(config.tls_cert, config.tls_key)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _check_pair(cert: Path, key: Path) -> None:
    """grpc reports a key that does not belong to its certificate (or one it cannot parse)
    only as "Failed to bind to address" when the port is added; OpenSSL, asked first, says
    what is wrong."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"tls_cert {cert} and tls_key {key} are not a usable pair: "
                              f"{exc.reason or exc}") from exc


def _read_pem(name: str, path: Path) -> bytes:
    """A TLS file's bytes, or InvalidArgument naming the setting and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{name} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{name} {path}: not a PEM file (no -----BEGIN line)")
    return data


async def start_server(config: ServeConfig, *, seed: int | None = None) -> RunningServer:
    # the files a start can fail on are read before anything is opened, so a bad one leaves
    # no spool lock, bus writer or model watcher behind
    credentials = _tls_credentials(config)
    tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
    registry = open_registry(config.registry, kafka=config.registry_kafka,
                             topic=config.registry_topic, sync_timeout_s=0.05,
                             max_model_bytes=config.max_model_bytes)
    # Named from the start: the configured policies, plus the registry's when it is polled or
    # nothing is configured. With discovery the store adds later ones as they load.
    discover = config.discovers_policies
    named = set(config.policies)
    if discover or not named:
        named.update(registry.policies())
    policies = sorted(named)
    if not policies:
        log.warning("registry %s holds no policy yet; serving none%s", config.registry,
                    " until one is published" if discover else "")
    metrics_registry = CollectorRegistry()
    metrics = ServingMetrics.create(metrics_registry)
    health_servicer = health.aio.HealthServicer()
    loop = asyncio.get_running_loop()

    def ready() -> bool:
        """Every policy named has a model (true with none), except those found damaged with
        no intact version: they are NOT_SERVING on their own and never take the others
        down."""
        return all(_loaded(store, p) or store.damage(p) for p in store.policies)

    def on_change(policy: str, model: LoadedModel) -> None:
        async def update() -> None:
            await health_servicer.set(policy, SERVING)
            # a model that arrives after start-up (an empty registry then) makes the server
            # ready as a whole once every policy has one (ignored after a SIGTERM); a
            # discovered policy is named only once loaded, so it never holds readiness back
            if ready():
                await health_servicer.set("", SERVING)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(update()))

    providers = choose_providers(config.use_gpu)
    log.info("onnxruntime providers: %s", providers)
    store = ModelStore(registry, policies, metrics, providers=providers,
                       threads=config.ort_threads, watch_interval_s=config.watch_interval_s,
                       discover=discover, on_change=on_change)
    open_bus = functools.partial(
        ProcessProducer if config.log_writer == "process" else open_producer, config.bus,
        path=config.bus_path, bootstrap=config.kafka_bootstrap, partitions=config.bus_partitions,
        client_id="policyloop-serve")
    # the process writer starts a child and waits for it: not on the event loop
    producer = (await asyncio.to_thread(open_bus) if config.log_writer == "process"
                else open_bus())
    decision_log = DecisionLog(producer,
                               spool_dir=config.spool_dir, max_queue=config.log_queue_size,
                               spool_budget_bytes=config.spool_budget_bytes,
                               registry=metrics_registry)
    for policy in policies:
        await health_servicer.set(policy, NOT_SERVING)
    await asyncio.to_thread(store.start)
    plane = DataPlane(config, store, decision_log, metrics, seed=seed)

    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tokens is not None:
        interceptors.append(AuthInterceptor(
            tokens,
            on_failure=lambda reason: metrics.auth_failures.labels(reason).inc()))
    interceptors.append(ServingInterceptor(metrics, store.serves, config.max_concurrency))
    # the interceptor enforces max_concurrency on unary calls (counted, with a clear message);
    # grpc's limiter sits above it only to bound streams (health Watch, reflection) as well
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=2 * config.max_concurrency)
    batcher = (DecideBatcher(plane, config.micro_batch_size, config.micro_batch_wait_ms / 1000,
                             metrics.micro_batch_size)
               if config.micro_batch_size > 1 else None)
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(
        DecisionServicer(plane, config.max_batch_rows,
                         decision_log if config.durable_ack else None, batcher), server)
    decision_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(plane), server)

    grpc_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(store, ready), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
             decision_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
             grpc_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
        log.info("gRPC with TLS%s", " and client certificates (mTLS)" if config.tls_client_ca
                 else "")
    else:
        port = server.add_insecure_port(address)
    http, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics_registry)
    await server.start()
    await health_servicer.set("", SERVING if ready() else NOT_SERVING)
    for policy in policies:
        await health_servicer.set(policy, SERVING if _loaded(store, policy) else NOT_SERVING)
    return RunningServer(server, port, http.server_port, registry, store, decision_log,
                         health_servicer, metrics_registry, plane, http)


def _loaded(store: ModelStore, policy: str) -> bool:
    try:
        store.get(policy)
    except Exception:
        return False
    return True


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process exit code."""
    running = await start_server(config)
    policies = ",".join(running.store.policies)
    print(f"policyloop serve: grpc={config.host}:{running.port} "
          f"metrics={config.host}:{running.metrics_port} policies={policies}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (grace %.1fs)", config.grace_period_s)
    delivered = await running.stop(config.grace_period_s)
    if not delivered:
        print("policyloop serve: decision log not fully delivered; the rest stays spooled in "
              f"{config.spool_dir}", file=sys.stderr, flush=True)
    return 0
