"""Token authentication with scopes, checked once per call before any servicer runs.

Callers send ``authorization: Bearer <token>``. The tokens file (TOML) lists who may do what::

    [tokens.checkout-app]
    sha256 = "9f86d0...hex"          # sha256 of the token (preferred: the file holds no secret)
    scopes = ["decide", "reward"]

    [tokens.ops]
    token = "a-long-random-string"  # or the token itself, e.g. mounted from a Secret
    scopes = ["admin"]

Scopes: ``decide`` (Decide, DecideBatch, GetPolicyInfo, ListPolicies, the v2 inference service),
``reward`` (Reward, Activate), ``admin`` (AdminService). Health checks and reflection stay open,
so probes and tools work without a token. Tokens are compared as sha256 digests in constant
time and never logged; a failure is logged with the token's name when one matched, otherwise
only the method.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from policyloop.contract.errors import InvalidArgument

log = logging.getLogger(__name__)

SCOPES = ("decide", "reward", "admin")
_DECISION = "/policyloop.v1.DecisionService/"
METHOD_SCOPES = {
    _DECISION + "Decide": "decide", _DECISION + "DecideBatch": "decide",
    _DECISION + "GetPolicyInfo": "decide", _DECISION + "ListPolicies": "decide",
    _DECISION + "Reward": "reward", _DECISION + "Activate": "reward",
    "/policyloop.v1.AdminService/Pin": "admin", "/policyloop.v1.AdminService/Unpin": "admin",
    "/policyloop.v1.AdminService/Rollback": "admin",
}
_INFERENCE_PREFIX = "/inference.GRPCInferenceService/"


def required_scope(method: str) -> str | None:
    """The scope a method needs; None for the open ones (health, reflection)."""
    if method.startswith(_INFERENCE_PREFIX):
        return "decide"
    return METHOD_SCOPES.get(method)


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes  # sha256 of the token
    scopes: frozenset[str]


def load_tokens(path: Path) -> list[Token]:
    """Read a tokens file; errors name the entry and the field."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"tokens file {path}: {exc}") from exc
    tokens = []
    for name, entry in raw.get("tokens", {}).items():
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
            raise InvalidArgument(f"tokens file {path}: tokens.{name}.scopes must be a "
                                  f"non-empty list of {list(SCOPES)}, got {scopes!r}")
        if "sha256" in entry:
            try:
                digest = bytes.fromhex(entry["sha256"])
            except (TypeError, ValueError):
                digest = b""
            if len(digest) != 32:
                raise InvalidArgument(f"tokens file {path}: tokens.{name}.sha256 must be 64 "
                                      "hex digits")
        elif isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
            digest = hashlib.sha256(entry["token"].encode()).digest()
        else:
            raise InvalidArgument(f"tokens file {path}: tokens.{name} needs sha256, or a "
                                  "token of at least 16 characters")
        tokens.append(Token(name, digest, frozenset(scopes)))
    if not tokens:
        raise InvalidArgument(f"tokens file {path}: no [tokens.NAME] entries")
    return tokens


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs before the serving interceptor: a refused call never reaches a servicer."""

    def __init__(self, tokens: list[Token], on_failure: Callable[[str], None] | None = None
                 ) -> None:
        self._tokens = tokens
        self._on_failure = on_failure or (lambda reason: None)

    def _match(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for token in self._tokens:  # compare with all, so timing does not tell which matched
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        scope = required_scope(method)
        if scope is None:
            return await continuation(handler_call_details)
        headers = [value for key, value in handler_call_details.invocation_metadata or ()
                   if key == "authorization"]
        if len(headers) > 1:  # which one a proxy or the app meant is anyone's guess
            self._on_failure("duplicate")
            log.warning("refused %s: %d authorization headers", method, len(headers))
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         f"authorization: {len(headers)} authorization headers; send exactly "
                         "one 'authorization: Bearer <token>'")
        header = headers[0] if headers else ""
        # the scheme is case-insensitive (RFC 9110 section 11.1); the token is not
        if (not isinstance(header, str) or header[:7].lower() != "bearer "
                or len(header) < 8):
            self._on_failure("missing")
            log.warning("refused %s: no bearer token", method)
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         "authorization: expected metadata 'authorization: Bearer <token>'")
        token = self._match(header[7:])
        if token is None:
            self._on_failure("invalid")
            log.warning("refused %s: unknown token", method)
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token")
        if scope not in token.scopes:
            self._on_failure("scope")
            log.warning("refused %s for token %r: scope %r not granted", method, token.name,
                        scope)
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         f"authorization: token {token.name!r} lacks scope {scope!r}")
        return await continuation(handler_call_details)
