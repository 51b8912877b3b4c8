import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Features(_message.Message):
    __slots__ = ("dense", "named", "categorical")
    class NamedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoricalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DENSE_FIELD_NUMBER: _ClassVar[int]
    NAMED_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    dense: _containers.RepeatedScalarFieldContainer[float]
    named: _containers.ScalarMap[str, float]
    categorical: _containers.ScalarMap[str, str]
    def __init__(self, dense: _Optional[_Iterable[float]] = ..., named: _Optional[_Mapping[str, float]] = ..., categorical: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "features")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    id: str
    features: Features
    def __init__(self, id: _Optional[str] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("policy", "event_id", "context", "candidates", "slots", "deadline_ms", "seed", "deferred", "baseline_action")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACTION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    event_id: str
    context: Features
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    slots: int
    deadline_ms: int
    seed: int
    deferred: bool
    baseline_action: str
    def __init__(self, policy: _Optional[str] = ..., event_id: _Optional[str] = ..., context: _Optional[_Union[Features, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., slots: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., seed: _Optional[int] = ..., deferred: _Optional[bool] = ..., baseline_action: _Optional[str] = ...) -> None: ...

class SlotDecision(_message.Message):
    __slots__ = ("action_id", "candidate_index", "propensity")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    candidate_index: int
    propensity: float
    def __init__(self, action_id: _Optional[str] = ..., candidate_index: _Optional[int] = ..., propensity: _Optional[float] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("event_id", "policy", "chosen", "ranking", "strategy", "model_version", "active", "policy_action")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    policy: str
    chosen: _containers.RepeatedCompositeFieldContainer[SlotDecision]
    ranking: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    model_version: int
    active: bool
    policy_action: str
    def __init__(self, event_id: _Optional[str] = ..., policy: _Optional[str] = ..., chosen: _Optional[_Iterable[_Union[SlotDecision, _Mapping]]] = ..., ranking: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., model_version: _Optional[int] = ..., active: _Optional[bool] = ..., policy_action: _Optional[str] = ...) -> None: ...

class DecideBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DecideRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[DecideRequest, _Mapping]]] = ...) -> None: ...

class DecideBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[DecideResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[DecideResponse, _Mapping]]] = ...) -> None: ...

class RewardRequest(_message.Message):
    __slots__ = ("event_id", "value", "slot_rewards", "timestamp", "policy")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SLOT_REWARDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    value: float
    slot_rewards: _containers.RepeatedScalarFieldContainer[float]
    timestamp: _timestamp_pb2.Timestamp
    policy: str
    def __init__(self, event_id: _Optional[str] = ..., value: _Optional[float] = ..., slot_rewards: _Optional[_Iterable[float]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy: _Optional[str] = ...) -> None: ...

class RewardResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("event_id", "policy")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    policy: str
    def __init__(self, event_id: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class GetPolicyInfoRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    def __init__(self, policy: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("policy", "model_version", "pinned", "strategy", "kind", "context_features", "action_features", "actions", "feature_schema_hash", "inputs", "outputs", "max_candidates", "apprentice", "damage", "categorical")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    APPRENTICE_FIELD_NUMBER: _ClassVar[int]
    DAMAGE_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    policy: str
    model_version: int
    pinned: bool
    strategy: str
    kind: str
    context_features: _containers.RepeatedScalarFieldContainer[str]
    action_features: _containers.RepeatedScalarFieldContainer[str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    feature_schema_hash: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_candidates: int
    apprentice: bool
    damage: str
    categorical: _containers.RepeatedCompositeFieldContainer[CategoricalFeature]
    def __init__(self, policy: _Optional[str] = ..., model_version: _Optional[int] = ..., pinned: _Optional[bool] = ..., strategy: _Optional[str] = ..., kind: _Optional[str] = ..., context_features: _Optional[_Iterable[str]] = ..., action_features: _Optional[_Iterable[str]] = ..., actions: _Optional[_Iterable[str]] = ..., feature_schema_hash: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_candidates: _Optional[int] = ..., apprentice: _Optional[bool] = ..., damage: _Optional[str] = ..., categorical: _Optional[_Iterable[_Union[CategoricalFeature, _Mapping]]] = ...) -> None: ...

class CategoricalFeature(_message.Message):
    __slots__ = ("name", "vocabulary", "buckets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    buckets: int
    def __init__(self, name: _Optional[str] = ..., vocabulary: _Optional[_Iterable[str]] = ..., buckets: _Optional[int] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("policy", "version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    version: int
    def __init__(self, policy: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    def __init__(self, policy: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("policy", "version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    version: int
    def __init__(self, policy: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
