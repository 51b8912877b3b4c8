"""policyloop's Python client: ask for decisions, report their rewards.

>>> from policyloop_client import Client
>>> with Client("127.0.0.1:50051", token="...") as client:  # doctest: +SKIP
...     d = client.decide("recsys", {"age": 31, "mobile": 1},
...                       [{"id": "shoes-1", "features": {"price": 9.9}},
...                        {"id": "shoes-2", "features": {"price": 19.0}}])
...     show(d.action)  # remember d.event_id
...     client.reward(d.event_id, 1.0)  # later, when the outcome is known

Needs only grpcio and protobuf; its stubs of ``protos/decision.proto`` live in
``policyloop_client._proto``, so it never imports the server's packages.
"""

from policyloop_client.client import AsyncClient, Client
from policyloop_client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PolicyloopClientError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from policyloop_client.retry import Retry
from policyloop_client.types import Categorical, Decision, PolicyInfo, Request, Slot, TensorSpec

__all__ = [
    "AsyncClient", "Categorical", "Client", "Decision", "DeadlineExceeded", "FailedPrecondition",
    "InvalidArgument", "NotFound", "PermissionDenied", "PolicyInfo", "PolicyloopClientError",
    "Request", "ResourceExhausted", "Retry", "Slot", "TensorSpec", "Unauthenticated",
    "Unavailable",
]
