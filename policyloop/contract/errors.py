"""The project's error types, defined once.

Transports map them to their own status codes in one place (``serving/interceptors.py`` for
gRPC); domain code raises these and never a transport type. Messages name the field and the
bad value, because the caller reads them.
"""

from __future__ import annotations


class PolicyloopError(Exception):
    """Base of every error policyloop raises on purpose."""


class InvalidArgument(PolicyloopError):
    """The caller sent something malformed (gRPC INVALID_ARGUMENT)."""


class NotFound(PolicyloopError):
    """A named policy, model version or event does not exist (gRPC NOT_FOUND)."""


class ResourceExhausted(PolicyloopError):
    """A size or concurrency limit was exceeded (gRPC RESOURCE_EXHAUSTED)."""


class Unavailable(PolicyloopError):
    """The server cannot answer now, e.g. no model is loaded yet (gRPC UNAVAILABLE)."""


class ModelRejected(PolicyloopError):
    """A model version failed validation: corrupt file, checksum or signature mismatch.

    ``reason`` is a short fixed word (a metric label): checksum, missing, outside (a link out
    of the registry or not a regular file), oversized, corrupt, incompatible, signature,
    warmup, posterior or other.
    """

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class ExportParityError(PolicyloopError):
    """torch and onnxruntime disagree on an exported model beyond the tolerance."""


def shown(value: object, limit: int = 100) -> str:
    """``value`` as an error message echoes it: its repr, cut to ``limit`` characters plus the
    full length, so a multi-megabyte caller value gives a short message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} chars)"
