"""The client's errors, defined once: one base class and one subclass per gRPC status an app
may want to handle on its own.

Every failed call raises a ``PolicyloopClientError``; ``message`` is the server's own text
(which names the field and the bad value), ``code`` the gRPC status and ``method`` the call.
Codes without a subclass here (UNKNOWN, INTERNAL, ...) raise the base class itself.

>>> from_status(grpc.StatusCode.NOT_FOUND, "unknown policy 'x'", "GetPolicyInfo")
NotFound("GetPolicyInfo: NOT_FOUND: unknown policy 'x'")
>>> isinstance(_, PolicyloopClientError)
True
"""

from __future__ import annotations

import grpc


class PolicyloopClientError(Exception):
    """Base of every error the client raises."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{method}: {code.name}: {message}" if method
                         else f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method

    def __reduce__(self) -> tuple[type[PolicyloopClientError], tuple[grpc.StatusCode, str, str]]:
        return type(self), (self.code, self.message, self.method)


class InvalidArgument(PolicyloopClientError):
    """The request is malformed: wrong feature names or lengths, NaN, duplicate or unknown
    action ids, a malformed event id, ... Never retried: the same request fails again."""


class NotFound(PolicyloopClientError):
    """The policy is not served."""


class ResourceExhausted(PolicyloopClientError):
    """A size limit (candidates, batch rows, message bytes) or the server's concurrency limit
    was exceeded."""


class FailedPrecondition(PolicyloopClientError):
    """The server refused a model version (admin calls)."""


class Unauthenticated(PolicyloopClientError):
    """No token, or one the server does not know."""


class PermissionDenied(PolicyloopClientError):
    """The token lacks the scope the call needs (``decide``, ``reward``)."""


class Unavailable(PolicyloopClientError):
    """The server cannot be reached, or cannot answer yet (no model loaded)."""


class DeadlineExceeded(PolicyloopClientError):
    """No answer within the call's timeout."""


ERRORS: dict[grpc.StatusCode, type[PolicyloopClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_status(code: grpc.StatusCode, message: str, method: str = "") -> PolicyloopClientError:
    """The error for a status code: its subclass, or the base class for the others."""
    return ERRORS.get(code, PolicyloopClientError)(code, message, method)


def from_rpc_error(exc: grpc.RpcError, method: str) -> PolicyloopClientError:
    """The error for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else None
    return from_status(code, details or str(exc), method)
