"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the same methods over one channel.

Both take plain values (``types.py``), return frozen dataclasses, raise the errors of
``errors.py``, and retry only what ``retry.py`` says is safe. What differs is only how they
wait: the blocking client in the calling thread, the async one on the event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from policyloop_client import _wire
from policyloop_client._proto import decision_pb2 as pb
from policyloop_client._proto import decision_pb2_grpc as pb_grpc
from policyloop_client.errors import Unavailable, from_rpc_error
from policyloop_client.retry import DEFAULT as DEFAULT_RETRY
from policyloop_client.retry import RETRYABLE, Retry
from policyloop_client.types import Candidate, Decision, Features, PolicyInfo, Request

Pem = bytes | str | Path


def _pem(value: Pem | None, name: str) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name} {str(value)!r} cannot be read: {exc.strerror}") from None


class _Settings:
    """What both clients are configured with, checked once."""

    def __init__(self, target: str, *, token: str | None, tls: bool, ca_cert: Pem | None,
                 client_cert: Pem | None, client_key: Pem | None, timeout: float | None,
                 retry: Retry, options: Sequence[tuple[str, Any]]) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target must be 'host:port', got {target!r}")
        if token is not None and (not isinstance(token, str) or not token
                                  or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty string on one line")
        if (client_cert is None) != (client_key is None):
            missing = "client_key" if client_key is None else "client_cert"
            raise ValueError(f"client_cert and client_key come together (mutual TLS): "
                             f"{missing} is missing")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None (no deadline), got "
                             f"{timeout!r}")
        if not isinstance(retry, Retry):
            raise ValueError(f"retry must be a Retry, got {retry!r}")
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials = None
        if tls or ca_cert is not None or client_cert is not None:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca_cert, "ca_cert"),
                private_key=_pem(client_key, "client_key"),
                certificate_chain=_pem(client_cert, "client_cert"))
        # the channel reconnects as patiently as calls are retried (gRPC's own default waits
        # a second, then up to two minutes, before it tries a refused address again)
        self.options = [("grpc.initial_reconnect_backoff_ms", max(10, int(retry.backoff_s * 1e3))),
                        ("grpc.max_reconnect_backoff_ms", max(10, int(retry.max_backoff_s * 1e3))),
                        *options]

    def deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            return self.timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        return timeout


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if hasattr(exc, "code") else None


class Client:
    """A blocking client of the decision service. Thread-safe; open one per process and share
    it, and close it (or use ``with``) when done.

    ``target`` is ``host:port``. ``token`` is sent as ``authorization: Bearer <token>``.
    TLS is on with ``tls=True`` (the system's root certificates) or when ``ca_cert`` is given
    (PEM bytes or a path); add ``client_cert`` and ``client_key`` for mutual TLS. ``timeout``
    is each attempt's deadline in seconds (None: none), overridable per call. ``retry`` says
    how safe calls are retried (``policyloop_client.retry`` lists which are); ``Retry(attempts=1)``
    never retries. ``options`` are extra gRPC channel options, e.g.
    ``[("grpc.ssl_target_name_override", "decisions.internal")]``.

    Errors are ``PolicyloopClientError`` subclasses carrying the server's message.
    """

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 ca_cert: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None, timeout: float | None = 1.0,
                 retry: Retry = DEFAULT_RETRY, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._settings = _Settings(target, token=token, tls=tls, ca_cert=ca_cert,
                                   client_cert=client_cert, client_key=client_key,
                                   timeout=timeout, retry=retry, options=options)
        s = self._settings
        self._channel = (grpc.secure_channel(target, s.credentials, s.options)
                         if s.credentials is not None
                         else grpc.insecure_channel(target, s.options))
        self._stub = pb_grpc.DecisionServiceStub(self._channel)
        self._rng = random.Random()

    def decide(self, policy: str, context: Features, candidates: Sequence[Candidate] | None = None,
               *, slots: int | None = None, event_id: str | None = None, deferred: bool = False,
               seed: int | None = None, baseline_action: str | None = None,
               timeout: float | None = None) -> Decision:
        """Choose (and rank) actions for one event.

        ``context``: a dict of named features or the dense values in schema order.
        ``candidates``: action ids (fixed-action policies; none means every action) or, for
        ranking policies, ``{"id": ..., "features": ...}`` / ``(id, features)`` per action.
        ``slots``: how many to fill (top-k; default 1). ``event_id``: yours (1-128 of
        ``A-Za-z0-9._:-``), or the server makes one. ``deferred``: logged inactive until
        ``activate``. ``seed``: a reproducible choice. ``baseline_action``: your own choice
        for a policy in apprentice mode.
        """
        deadline = self._settings.deadline(timeout)
        request = _wire.decide_request(
            Request(policy, context, candidates, slots, event_id, deferred, seed,
                    baseline_action), deadline)
        return _wire.decision(self._call("Decide", request, deadline))

    def decide_batch(self, requests: Sequence[Request], *,
                     timeout: float | None = None) -> list[Decision]:
        """Decide many events in one call, answers in request order. Each row is decided and
        logged as its own event; a row that fails validation fails the whole call before any
        row is logged."""
        deadline = self._settings.deadline(timeout)
        request = pb.DecideBatchRequest(
            requests=[_wire.decide_request(r, deadline, "DecideBatch") for r in requests])
        response = self._call("DecideBatch", request, deadline)
        return [_wire.decision(r) for r in response.responses]

    def reward(self, event_id: str, value: float, *, policy: str | None = None,
               slot_rewards: Sequence[float] | None = None, timestamp: datetime | None = None,
               timeout: float | None = None) -> None:
        """Report the outcome of a decision. ``slot_rewards``: one per slot, for slates.
        ``timestamp``: when the outcome happened (an aware datetime; default: when the server
        receives it), which is the time the reward join's window is judged by. ``policy``
        lets the server check the policy exists."""
        request = _wire.reward_request(event_id, value, policy, slot_rewards, timestamp)
        self._call("Reward", request, self._settings.deadline(timeout))

    def activate(self, event_id: str, *, policy: str | None = None,
                 timeout: float | None = None) -> None:
        """Confirm that a deferred decision was really shown; only then is it learned from."""
        request = pb.ActivateRequest(event_id=event_id, policy=policy or "")
        self._call("Activate", request, self._settings.deadline(timeout))

    def policy_info(self, policy: str, *, timeout: float | None = None) -> PolicyInfo:
        """What ``policy`` expects: feature names and order, kind, actions, version, limits."""
        request = pb.GetPolicyInfoRequest(policy=policy)
        return _wire.policy_info(self._call("GetPolicyInfo", request,
                                            self._settings.deadline(timeout)))

    def list_policies(self, *, timeout: float | None = None) -> list[PolicyInfo]:
        """Every served policy."""
        response = self._call("ListPolicies", pb.ListPoliciesRequest(),
                              self._settings.deadline(timeout))
        return [_wire.policy_info(p) for p in response.policies]

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel is connected; ``Unavailable`` after ``timeout`` seconds."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"{self._settings.target} not ready within {timeout} s",
                              "wait_ready") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Message, timeout: float | None) -> Any:
        rpc = getattr(self._stub, method)
        retry = self._settings.retry
        waits: Iterator[float] | None = None
        while True:
            try:
                return rpc(request, timeout=timeout, metadata=self._settings.metadata)
            except grpc.RpcError as exc:
                wait = None
                if _code(exc) in RETRYABLE:
                    if waits is None:  # the first failure: is this call safe to send again?
                        waits = retry.waits(self._rng) if retry.allows(method, request) else None
                    wait = next(waits, None) if waits is not None else None
                if wait is None:
                    raise from_rpc_error(exc, method) from exc
            time.sleep(wait)


class AsyncClient:
    """The asyncio client: the same constructor and methods as ``Client``, awaited. Create it
    inside the event loop that uses it; close it with ``await client.close()`` or
    ``async with``."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 ca_cert: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None, timeout: float | None = 1.0,
                 retry: Retry = DEFAULT_RETRY, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._settings = _Settings(target, token=token, tls=tls, ca_cert=ca_cert,
                                   client_cert=client_cert, client_key=client_key,
                                   timeout=timeout, retry=retry, options=options)
        s = self._settings
        self._channel = (grpc.aio.secure_channel(target, s.credentials, s.options)
                         if s.credentials is not None
                         else grpc.aio.insecure_channel(target, s.options))
        self._stub = pb_grpc.DecisionServiceStub(self._channel)
        self._rng = random.Random()

    async def decide(self, policy: str, context: Features,
                     candidates: Sequence[Candidate] | None = None, *,
                     slots: int | None = None, event_id: str | None = None,
                     deferred: bool = False, seed: int | None = None,
                     baseline_action: str | None = None,
                     timeout: float | None = None) -> Decision:
        """``Client.decide``, awaited."""
        deadline = self._settings.deadline(timeout)
        request = _wire.decide_request(
            Request(policy, context, candidates, slots, event_id, deferred, seed,
                    baseline_action), deadline)
        return _wire.decision(await self._call("Decide", request, deadline))

    async def decide_batch(self, requests: Sequence[Request], *,
                           timeout: float | None = None) -> list[Decision]:
        """``Client.decide_batch``, awaited."""
        deadline = self._settings.deadline(timeout)
        request = pb.DecideBatchRequest(
            requests=[_wire.decide_request(r, deadline, "DecideBatch") for r in requests])
        response = await self._call("DecideBatch", request, deadline)
        return [_wire.decision(r) for r in response.responses]

    async def reward(self, event_id: str, value: float, *, policy: str | None = None,
                     slot_rewards: Sequence[float] | None = None,
                     timestamp: datetime | None = None, timeout: float | None = None) -> None:
        """``Client.reward``, awaited."""
        request = _wire.reward_request(event_id, value, policy, slot_rewards, timestamp)
        await self._call("Reward", request, self._settings.deadline(timeout))

    async def activate(self, event_id: str, *, policy: str | None = None,
                       timeout: float | None = None) -> None:
        """``Client.activate``, awaited."""
        request = pb.ActivateRequest(event_id=event_id, policy=policy or "")
        await self._call("Activate", request, self._settings.deadline(timeout))

    async def policy_info(self, policy: str, *, timeout: float | None = None) -> PolicyInfo:
        """``Client.policy_info``, awaited."""
        request = pb.GetPolicyInfoRequest(policy=policy)
        return _wire.policy_info(await self._call("GetPolicyInfo", request,
                                                  self._settings.deadline(timeout)))

    async def list_policies(self, *, timeout: float | None = None) -> list[PolicyInfo]:
        """``Client.list_policies``, awaited."""
        response = await self._call("ListPolicies", pb.ListPoliciesRequest(),
                                    self._settings.deadline(timeout))
        return [_wire.policy_info(p) for p in response.policies]

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected; ``Unavailable`` after ``timeout`` seconds."""
        # polled: a cancelled state watch would complete after its event loop has closed
        deadline = time.monotonic() + timeout
        while self._channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            if time.monotonic() >= deadline:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  f"{self._settings.target} not ready within {timeout} s",
                                  "wait_ready")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Message, timeout: float | None) -> Any:
        rpc = getattr(self._stub, method)
        retry = self._settings.retry
        waits: Iterator[float] | None = None
        while True:
            try:
                return await rpc(request, timeout=timeout, metadata=self._settings.metadata)
            except grpc.RpcError as exc:
                wait = None
                if _code(exc) in RETRYABLE:
                    if waits is None:  # the first failure: is this call safe to send again?
                        waits = retry.waits(self._rng) if retry.allows(method, request) else None
                    wait = next(waits, None) if waits is not None else None
                if wait is None:
                    raise from_rpc_error(exc, method) from exc
            await asyncio.sleep(wait)
