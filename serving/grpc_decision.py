"""gRPC servicers of ``policyloop.v1``: protobuf in, data-plane types, protobuf out.

Nothing here decides anything; errors raised below are mapped to status codes by
``serving/interceptors.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np

from policyloop.contract.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from policyloop.contract.signature import POLICY_NAME_MAX
from policyloop.registry.onnx_model import LoadedModel
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.batching import DecideBatcher
from serving.dataplane import DataPlane, DecideInput, DecideOutput, Features, RewardInput
from serving.decision_log import DecisionLog


def _features(message: pb.Features) -> Features:
    return Features(dense=message.dense, named=dict(message.named) if message.named else {},
                    categorical=dict(message.categorical) if message.categorical else {})


def dense_rows(rows: Sequence[pb.Features]) -> np.ndarray | None:
    """float32[K, n] read straight from the wire bytes when every row holds exactly n dense
    values and nothing else; None otherwise, and the general path converts row by row.

    A row serialises as tag, length, then its packed little-endian floats (named values and
    unknown fields would follow them). Rows of one length that all start with the same tag and
    length header hold nothing but those floats. Building a matrix from protobuf's repeated
    containers element by element costs more than the model run; this costs a copy.
    """
    parts = [f.SerializeToString() for f in rows]
    if not parts:
        return None
    first = parts[0]
    size = len(first)
    if size < 3 or first[0] != 0x0A:  # field 1 (dense), length-delimited
        return None
    length, header = 0, 1
    for shift in range(0, 35, 7):
        byte = first[header]
        header += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80 or header >= size:
            break
    if header + length != size or length % 4 or len(set(map(len, parts))) != 1:
        return None
    wire = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(len(parts), size)
    if not (wire[:, :header] == wire[0, :header]).all():
        return None
    return wire[:, header:].copy().view("<f4").astype(np.float32, copy=False)


def decide_input(request: pb.DecideRequest) -> DecideInput:
    candidates = request.candidates
    matrix = dense_rows([c.features for c in candidates])
    return DecideInput(
        policy=request.policy,
        event_id=request.event_id,
        context=_features(request.context),
        candidate_ids=[c.id for c in candidates],
        candidate_features=(matrix if matrix is not None
                            else [_features(c.features) for c in candidates]),
        slots=request.slots,
        seed=request.seed if request.HasField("seed") else None,
        deferred=request.deferred,
        baseline_action=request.baseline_action,
    )


def decide_response(out: DecideOutput) -> pb.DecideResponse:
    return pb.DecideResponse(
        event_id=out.event_id, policy=out.policy,
        chosen=[pb.SlotDecision(action_id=c.action_id, candidate_index=c.candidate_index,
                                propensity=c.propensity) for c in out.chosen],
        ranking=out.ranking, strategy=out.strategy, model_version=out.model_version,
        active=out.active, policy_action=out.policy_action)


def policy_info(plane: DataPlane, policy: str) -> pb.PolicyInfo:
    model: LoadedModel = plane.store.get(policy)
    m = model.manifest
    return pb.PolicyInfo(
        policy=policy, model_version=m.version, pinned=plane.store.is_pinned(policy),
        strategy=plane.strategy(policy).name, kind=m.kind,
        context_features=m.features.context, action_features=m.features.action,
        actions=m.actions, feature_schema_hash=m.features.hash,
        inputs=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in m.inputs],
        outputs=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in m.outputs],
        max_candidates=plane.max_candidates(policy), apprentice=plane.apprentice(policy),
        damage=plane.store.damage(policy),
        categorical=[pb.CategoricalFeature(name=c.name, vocabulary=c.vocabulary,
                                           buckets=c.buckets) for c in m.features.categorical])


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


def _known_length(policy: str) -> None:
    """A policy name longer than any valid one is not served; say so without echoing it all."""
    if len(policy) > POLICY_NAME_MAX:
        raise NotFound(f"policy {shown(policy)} is not served here")


def _timestamp_ms(request: pb.RewardRequest) -> int:
    if not request.HasField("timestamp"):
        return 0
    ts = request.timestamp
    if not (_TIMESTAMP_SECONDS[0] <= ts.seconds <= _TIMESTAMP_SECONDS[1]
            and 0 <= ts.nanos <= 999_999_999):
        raise InvalidArgument(f"timestamp out of range (seconds {ts.seconds}, nanos "
                              f"{ts.nanos}): must be 0001-01-01..9999-12-31 UTC")
    return int(ts.ToMilliseconds())


class DecisionServicer(pb_grpc.DecisionServiceServicer):
    def __init__(self, plane: DataPlane, max_batch_rows: int,
                 log: DecisionLog | None = None, batcher: DecideBatcher | None = None) -> None:
        """``log`` given: durable acknowledgement, each answer waits until its event has left
        the server's memory (``DecisionLog.durable``). ``batcher`` given: Decide calls are
        micro-batched."""
        self._plane = plane
        self._max_batch_rows = max_batch_rows
        self._log = log
        self._batcher = batcher

    def _mark(self) -> int:
        """Where the decision log stands before this call submits anything."""
        return self._log.submitted if self._log is not None else 0

    async def _durable(self, mark: int) -> None:
        """With durable acknowledgement, wait until this call's records left memory; fails
        with UNAVAILABLE if one was dropped instead."""
        if self._log is not None and (future := self._log.durable(mark)) is not None:
            await asyncio.wrap_future(future)

    async def Decide(self, request: pb.DecideRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        mark = self._mark()
        _known_length(request.policy)
        if self._batcher is not None:
            response = decide_response(await self._batcher.decide(decide_input(request)))
        else:
            response = decide_response(self._plane.decide(decide_input(request)))
        await self._durable(mark)
        return response

    async def DecideBatch(self, request: pb.DecideBatchRequest,
                          context: grpc.aio.ServicerContext) -> pb.DecideBatchResponse:
        mark = self._mark()
        rows = len(request.requests)
        if rows == 0:
            raise InvalidArgument("requests is empty")
        if rows > self._max_batch_rows:
            raise ResourceExhausted(f"requests: {rows} rows, at most {self._max_batch_rows}")
        for r in request.requests:
            _known_length(r.policy)
        outputs = self._plane.decide_many([decide_input(r) for r in request.requests])
        await self._durable(mark)
        return pb.DecideBatchResponse(responses=[decide_response(o) for o in outputs])

    async def Reward(self, request: pb.RewardRequest,
                     context: grpc.aio.ServicerContext) -> pb.RewardResponse:
        mark = self._mark()
        _known_length(request.policy)
        timestamp_ms = _timestamp_ms(request)
        event_id = self._plane.reward(RewardInput(
            event_id=request.event_id, value=request.value,
            slot_rewards=list(request.slot_rewards), timestamp_ms=timestamp_ms,
            policy=request.policy))
        await self._durable(mark)
        return pb.RewardResponse(event_id=event_id)

    async def Activate(self, request: pb.ActivateRequest,
                       context: grpc.aio.ServicerContext) -> pb.ActivateResponse:
        mark = self._mark()
        _known_length(request.policy)
        event_id = self._plane.activate(request.event_id, request.policy)
        await self._durable(mark)
        return pb.ActivateResponse(event_id=event_id)

    async def GetPolicyInfo(self, request: pb.GetPolicyInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.PolicyInfo:
        _known_length(request.policy)
        return policy_info(self._plane, request.policy)

    async def ListPolicies(self, request: pb.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListPoliciesResponse:
        infos = []
        for policy in self._plane.store.policies:
            try:
                infos.append(policy_info(self._plane, policy))
            except Exception:  # a policy without a loaded model: its name and its damage
                infos.append(pb.PolicyInfo(policy=policy,
                                           damage=self._plane.store.damage(policy)))
        return pb.ListPoliciesResponse(policies=infos)


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Pin, unpin and roll back served versions. Loading happens off the event loop."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def Pin(self, request: pb.PinRequest,
                  context: grpc.aio.ServicerContext) -> pb.PolicyInfo:
        await asyncio.to_thread(self._plane.store.pin, request.policy, request.version)
        return policy_info(self._plane, request.policy)

    async def Unpin(self, request: pb.UnpinRequest,
                    context: grpc.aio.ServicerContext) -> pb.PolicyInfo:
        await asyncio.to_thread(self._plane.store.unpin, request.policy)
        return policy_info(self._plane, request.policy)

    async def Rollback(self, request: pb.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> pb.PolicyInfo:
        await asyncio.to_thread(self._plane.store.rollback, request.policy,
                                request.version or None)
        return policy_info(self._plane, request.policy)
