"""One place where domain errors become gRPC status codes, and where every call is counted.

Unknown errors become INTERNAL with a generic message and a full log entry: a stack trace is
for the operator, not for the caller. The concurrency limit (``max_concurrency``) is kept here
too: a call beyond it gets RESOURCE_EXHAUSTED at once, with a message saying why, and is counted
like any other call (grpc's own limiter answers a bare "Concurrent RPC limit exceeded!" and
counts nothing; ``serving/server.py`` keeps it only as a backstop above ours, for the streaming
calls this interceptor passes through).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from policyloop.contract.errors import (
    InvalidArgument,
    ModelRejected,
    NotFound,
    PolicyloopError,
    ResourceExhausted,
    Unavailable,
)
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ModelRejected: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: PolicyloopError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _policy_label(request: Any, served: Callable[[str], bool]) -> str:
    """A bounded label: a served policy's name, or "-" / "unknown"."""
    name = getattr(request, "policy", None)
    if name is None:
        name = getattr(request, "model_name", None)
        if name is None:
            rows = getattr(request, "requests", None)
            name = rows[0].policy if rows else ""
    if not name:
        return "-"
    return name if served(name) else "unknown"


class _Malformed:
    """Stands in for a request whose bytes did not parse, so it gets a clear status."""

    policy = ""

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc answers UNKNOWN to bytes that do not parse; we answer INVALID_ARGUMENT."""
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(name, str(exc))

    return parse


HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Status mapping, per-call metrics, the concurrency limit and the deadline check."""

    def __init__(self, metrics: ServingMetrics, served: Callable[[str], bool],
                 max_concurrency: int) -> None:
        """``served(name)``: whether a policy is served, asked at each call (the model store
        may discover policies while the server runs). ``max_concurrency``: the most unary
        calls handled at once; the count is a plain int, as every call runs on the one event
        loop."""
        self._metrics = metrics
        self._served = served
        self._max_concurrency = max_concurrency
        self._active = 0
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        cached = self._handlers.get(details.method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming health Watch, reflection: passed through untouched
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(details.method.rsplit("/", 1)[-1], handler.unary_unary,
                       limited=not details.method.startswith(HEALTH_PREFIX)),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer)
        self._handlers[details.method] = wrapped
        return wrapped

    def _wrap(self, method: str, inner: Callable[..., Awaitable[Any]], *,
              limited: bool = True) -> Callable[..., Any]:
        """``limited``: whether the call counts against ``max_concurrency`` (not a health
        check: a loaded server must still answer its probes)."""
        metrics = self._metrics
        # labelled children by (policy, code): a ``labels()`` lookup per call costs more than
        # the count itself; the label values are bounded, and so is this cache
        children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            metrics.in_flight.inc()
            self._active += limited
            try:
                if limited and self._active > self._max_concurrency:
                    raise ResourceExhausted(
                        f"the server is handling {self._max_concurrency} calls, its "
                        "max_concurrency: retry with backoff")
                if isinstance(request, _Malformed):
                    raise InvalidArgument(f"request body is not a valid {request.type_name} "
                                          f"message: {request.error}")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed"
                else:
                    return await inner(request, context)
            except PolicyloopError as exc:
                code, message = status_of(exc), str(exc)
            except grpc.aio.AbortError:  # the servicer answered with a status (health: an
                # unknown service is NOT_FOUND): count that status; it is no server fault
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                log.exception("unhandled error in %s", method, extra={
                    "policy": getattr(request, "policy", None) or None,
                    "event_id": getattr(request, "event_id", None) or None})
                code, message = grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
            finally:
                metrics.in_flight.dec()
                self._active -= limited
                policy = _policy_label(request, self._served)
                child = children.get((policy, code))
                if child is None:
                    child = children[(policy, code)] = (
                        metrics.requests.labels(method, policy, code.name),
                        metrics.latency.labels(method, policy, code.name))
                child[0].inc()
                child[1].observe(time.perf_counter() - start)
            await context.abort(code, message)

        return call
