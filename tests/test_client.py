"""The client library (clients/python) against a real server: decisions from named features,
batches, rewards and activations on the log, policy info, errors with the server's message,
tokens, TLS, deadlines, which calls are retried, the asyncio client, and that it imports
nothing of the server or its heavy libraries."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from policyloop_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PolicyloopClientError,
    Request,
    Retry,
    Unauthenticated,
    Unavailable,
)
from policyloop_client._proto import decision_pb2 as pb
from policyloop_client.errors import ERRORS

import tests.test_security as security
from policyloop.bus import interface as bus
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent
from serving.config import PolicyConfig
from tests.conftest import free_ports
from tests.server_harness import ServerThread, make_registry, running_server, serve_config
from tests.test_server import read_topic

pki = security.pki  # the CA and certificates of the TLS tests, made with openssl
tokens_file = security.tokens_file

USER = {f"user_{i}": 0.1 * i - 0.3 for i in range(8)}  # recsys' context, by name
TICKET = {"ticket_0": 0.4, "ticket_3": -1.0}  # routing's (ticket_1, 2 and 4 left at zero)


def items(k: int) -> list[dict]:
    return [{"id": f"item-{j}", "features": {f"item_{i}": (i - j) / 4 for i in range(6)}}
            for j in range(k)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("client")
    make_registry(tmp / "registry")
    running = ServerThread(serve_config(tmp))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target, timeout=10) as c:
        yield c


def requests_counted(server: ServerThread, method: str, policy: str, code: str) -> float:
    return server.running.metrics_registry.get_sample_value(
        "policyloop_requests_total", {"method": method, "policy": policy, "code": code}) or 0.0


def test_a_ranking_policy_decides_from_named_features_as_from_dense_ones(client: Client) -> None:
    named = client.decide("recsys", USER, items(5), slots=2, seed=7)
    assert sorted(named.ranking) == [f"item-{j}" for j in range(5)]
    assert len({s.action for s in named.chosen}) == 2 and named.action == named.chosen[0].action
    assert named.chosen[0].index == int(named.action.split("-")[1])
    assert 0 < named.propensity <= 1 and named.model_version == 1 and named.active
    assert named.strategy == "epsilon_greedy(epsilon=0.1)" and named.policy_action is None
    # the same values in schema order, candidates as (id, dense features) pairs
    dense = client.decide("recsys", list(USER.values()),
                          [(c["id"], list(c["features"].values())) for c in items(5)],
                          slots=2, seed=7)
    assert (dense.chosen, dense.ranking) == (named.chosen, named.ranking)


def test_a_fixed_action_policy_chooses_among_all_or_the_listed_actions(client: Client) -> None:
    everything = client.decide("routing", TICKET)
    assert everything.action in {"queue-0", "queue-1", "queue-2"}
    assert sorted(everything.ranking) == ["queue-0", "queue-1", "queue-2"]
    only = client.decide("routing", TICKET, ["queue-2"])
    assert (only.action, only.chosen[0].index, only.propensity) == ("queue-2", 0, 1.0)


def test_decide_batch_answers_every_row_in_order(client: Client) -> None:
    decisions = client.decide_batch([
        Request("routing", TICKET, event_id="batch-a"),
        Request("recsys", USER, items(3), event_id="batch-b", slots=3),
        Request("routing", [0.0] * 5, ["queue-0", "queue-1"], event_id="batch-c", seed=1),
    ])
    assert [d.event_id for d in decisions] == ["batch-a", "batch-b", "batch-c"]
    assert [len(d.chosen) for d in decisions] == [1, 3, 1]
    assert decisions[2].action in {"queue-0", "queue-1"}


def test_reward_and_activate_are_logged_for_a_deferred_decision(
        client: Client, server: ServerThread) -> None:
    d = client.decide("recsys", USER, items(3), event_id="client-deferred", deferred=True,
                      slots=2)
    assert not d.active
    client.activate(d.event_id, policy="recsys")
    when = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    client.reward(d.event_id, 1.0, policy="recsys", slot_rewards=[1.0, 0.0], timestamp=when)
    decisions = [DecisionEvent.from_bytes(v)
                 for v in read_topic(server, bus.DECISIONS, b"client-deferred")]
    assert any(e.event_id == d.event_id and not e.active for e in decisions)
    activations = [ActivationEvent.from_bytes(v)
                   for v in read_topic(server, bus.ACTIVATIONS, b"client-deferred")]
    assert [a.policy for a in activations if a.event_id == d.event_id] == ["recsys"]
    rewards = [RewardEvent.from_bytes(v)
               for v in read_topic(server, bus.REWARDS, b"client-deferred")]
    reward = next(r for r in rewards if r.event_id == d.event_id)
    assert (reward.value, reward.slot_rewards) == (1.0, [1.0, 0.0])
    assert reward.timestamp_ms == int(when.timestamp() * 1000)


def test_policy_info_tells_the_features_and_actions(client: Client) -> None:
    recsys = client.policy_info("recsys")
    assert recsys.kind == "scoring" and recsys.model_version == 1
    assert recsys.context_features == tuple(USER) and len(recsys.action_features) == 6
    assert recsys.max_candidates == 50 and not recsys.pinned and not recsys.apprentice
    assert [t.name for t in recsys.inputs] == ["context", "action_features"]
    assert recsys.inputs[1].shape == (-1, -1, 6)
    routing = client.policy_info("routing")
    assert routing.kind == "qnet" and routing.actions == ("queue-0", "queue-1", "queue-2")
    assert routing.strategy == "softmax(temperature=0.5)"
    assert {p.policy: p for p in client.list_policies()} == {"recsys": recsys,
                                                             "routing": routing}


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda c: c.decide("routing", {"nope": 1.0}), InvalidArgument,
     "context.named has unknown feature 'nope'"),
    (lambda c: c.decide("routing", [0.1] * 4), InvalidArgument,
     "context.dense has 4 values, the policy expects 5"),
    (lambda c: c.decide("recsys", USER, items(2) + items(1)), InvalidArgument,
     "candidates: duplicate action id 'item-0'"),
    (lambda c: c.decide("routing", TICKET, event_id="no spaces"), InvalidArgument,
     "event_id 'no spaces' is malformed"),
    (lambda c: c.decide("routing", TICKET, slots=4), InvalidArgument,
     "slots 4 exceeds the 3 candidates"),
    (lambda c: c.policy_info("missing"), NotFound, "missing"),
    (lambda c: c.reward("e-1", float("nan")), InvalidArgument, "must be finite"),
    (lambda c: c.decide_batch([]), InvalidArgument, "requests is empty"),
    (lambda c: c.decide("routing", {"ticket_0": "high"}), InvalidArgument,
     "context.categorical: 'ticket_0' is numeric: send it in named"),
    # refused before anything is sent, in the same words
    (lambda c: c.decide("routing", {"ticket_0": [1.0]}), InvalidArgument,
     "context['ticket_0'] is [1.0]: feature values must be numbers"),
    (lambda c: c.decide("recsys", USER, [("item-0", [0.1, "x"])]), InvalidArgument,
     "candidates[0].features[1] is 'x'"),
    (lambda c: c.decide("recsys", USER, [{"name": "item-0"}]), InvalidArgument,
     "candidates[0] has keys ['name']"),
    (lambda c: c.decide("routing", TICKET, seed=-1), InvalidArgument, "seed -1"),
    (lambda c: c.reward("e-1", 1.0, timestamp=datetime(2026, 1, 1)), InvalidArgument,
     "has no time zone"),
])
def test_errors_carry_their_status_and_the_server_message(
        client: Client, call: Callable[[Client], object], error: type[PolicyloopClientError],
        message: str) -> None:
    with pytest.raises(error) as raised:
        call(client)
    assert ERRORS[raised.value.code] is error
    assert message in raised.value.message and message in str(raised.value)


def test_tokens_are_sent_and_refusals_are_typed(tmp_path: Path, tokens_file: Path) -> None:
    make_registry(tmp_path / "registry")
    with running_server(serve_config(tmp_path, tokens_file=tokens_file)) as server:
        with Client(server.target, token=security.APP_TOKEN) as app:
            d = app.decide("routing", TICKET)
            app.reward(d.event_id, 1.0)
        with Client(server.target) as anonymous, pytest.raises(Unauthenticated) as missing:
            anonymous.decide("routing", TICKET)
        assert "expected metadata 'authorization: Bearer <token>'" in missing.value.message
        with Client(server.target, token=security.READ_TOKEN) as reader:
            assert reader.policy_info("routing").kind == "qnet"
            with pytest.raises(PermissionDenied, match="lacks scope 'reward'"):
                reader.reward(d.event_id, 1.0)


def test_tls_and_mutual_tls(tmp_path: Path, pki: Path) -> None:
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem")
    with running_server(config) as server:
        # paths or PEM bytes
        with Client(server.target, ca_cert=pki / "ca.pem", client_cert=pki / "client.pem",
                    client_key=(pki / "client.key").read_bytes()) as mutual:
            assert mutual.decide("routing", TICKET).event_id
        with Client(server.target, ca_cert=str(pki / "ca.pem")) as no_certificate, \
                pytest.raises(Unavailable):
            no_certificate.decide("routing", TICKET)
        with Client(server.target) as plaintext, pytest.raises(Unavailable):
            plaintext.decide("routing", TICKET)
    with pytest.raises(ValueError, match="client_cert and client_key come together"):
        Client("127.0.0.1:1", client_cert=pki / "client.pem")
    with pytest.raises(ValueError, match="ca_cert .*missing.pem' cannot be read"):
        Client("127.0.0.1:1", ca_cert=pki / "missing.pem")


@pytest.fixture
def silent_target() -> Iterator[str]:
    """An address that accepts connections and never answers: a hung server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_a_call_past_its_deadline_raises_deadline_exceeded(silent_target: str) -> None:
    with Client(silent_target, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.decide("routing", TICKET)
        once = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):  # safe to retry: three attempts of 0.2 s
            client.policy_info("routing")
        assert once >= 0.18 and time.monotonic() - started >= 0.55
        with pytest.raises(ValueError, match="timeout must be > 0"):
            client.decide("routing", TICKET, timeout=0)


def _decide(**fields: Any) -> pb.DecideRequest:
    return pb.DecideRequest(policy="p", **fields)


@pytest.mark.parametrize(("method", "request_", "retried"), [
    ("GetPolicyInfo", pb.GetPolicyInfoRequest(policy="p"), True),
    ("ListPolicies", pb.ListPoliciesRequest(), True),
    ("Activate", pb.ActivateRequest(event_id="e"), True),
    ("Reward", pb.RewardRequest(event_id="e", value=1), False),  # unless Retry(rewards=True)
    ("Decide", _decide(), False),
    ("Decide", _decide(event_id="e"), False),  # a fresh sample may differ from the logged one
    ("Decide", _decide(seed=3), False),  # a second event id: a second logged decision
    ("Decide", _decide(event_id="e", seed=3), True),
    ("Decide", _decide(deferred=True), True),  # the lost attempt is never activated
    ("Decide", _decide(deferred=True, event_id="e"), False),
    ("DecideBatch", pb.DecideBatchRequest(requests=[_decide(event_id="e", seed=1)]), True),
    ("DecideBatch", pb.DecideBatchRequest(requests=[_decide(event_id="e", seed=1),
                                                    _decide()]), False),
])
def test_only_calls_safe_to_send_twice_are_retried(method: str, request_: Message,
                                                   retried: bool) -> None:
    assert Retry().allows(method, request_) is retried
    assert Retry(rewards=True).allows(method, request_) is (retried or method == "Reward")


def test_unavailable_is_retried_only_for_safe_calls_and_invalid_argument_never(
        tmp_path: Path, server: ServerThread) -> None:
    # thompson on a version without a posterior: the server answers UNAVAILABLE every time,
    # before logging anything
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, policies={"routing": PolicyConfig(strategy="thompson")})
    retry = Retry(attempts=4, backoff_s=0.01, max_backoff_s=0.02)
    with running_server(config) as down, Client(down.target, retry=retry) as client:
        cases: list[tuple[dict[str, Any], int]] = [
            ({}, 1), ({"event_id": "e-1", "seed": 1}, 4), ({"deferred": True}, 4),
            ({"event_id": "e-2"}, 1)]
        for fields, attempts in cases:
            before = requests_counted(down, "Decide", "routing", "UNAVAILABLE")
            with pytest.raises(Unavailable, match="needs the neural-linear posterior"):
                client.decide("routing", TICKET, **fields)
            after = requests_counted(down, "Decide", "routing", "UNAVAILABLE")
            assert after - before == attempts, fields
    before = requests_counted(server, "Decide", "routing", "INVALID_ARGUMENT")
    with Client(server.target, retry=retry) as client, pytest.raises(InvalidArgument):
        client.decide("routing", {"nope": 1.0}, event_id="e-3", seed=1)
    assert requests_counted(server, "Decide", "routing", "INVALID_ARGUMENT") - before == 1


def test_a_safe_call_reaches_a_server_that_comes_up_within_the_retry_budget(
        tmp_path: Path) -> None:
    make_registry(tmp_path / "registry")
    port = free_ports(1)[0]
    retry = Retry(attempts=40, backoff_s=0.05, max_backoff_s=0.2)
    with Client(f"127.0.0.1:{port}", retry=retry) as client, ThreadPoolExecutor(2) as pool:
        with pytest.raises(Unavailable):  # a plain decide is never sent twice
            client.decide("routing", TICKET)
        with pytest.raises(Unavailable, match="not ready within 0.1 s"):
            client.wait_ready(0.1)
        info = pool.submit(client.policy_info, "routing")
        replayed = pool.submit(client.decide, "routing", TICKET, event_id="late-1", seed=5)
        time.sleep(0.5)
        assert not info.done()
        with running_server(serve_config(tmp_path, port=port)):
            assert info.result(timeout=30).kind == "qnet"
            assert replayed.result(timeout=30).event_id == "late-1"
    with Client(f"127.0.0.1:{port}", retry=Retry(attempts=3, backoff_s=0.01)) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):  # the budget spent on a server that stays down
            client.policy_info("routing")
        assert time.monotonic() - started < 5


def test_the_async_client_has_the_same_calls(server: ServerThread, silent_target: str) -> None:
    async def run() -> None:
        async with AsyncClient(server.target, timeout=10) as client:
            await client.wait_ready(5)
            d = await client.decide("recsys", USER, items(4), slots=2, event_id="async-1")
            assert d.event_id == "async-1" and len(d.chosen) == 2
            batch = await client.decide_batch([Request("routing", TICKET),
                                               Request("routing", TICKET, ["queue-1"])])
            assert batch[1].action == "queue-1"
            deferred = await client.decide("routing", TICKET, deferred=True)
            await client.activate(deferred.event_id)
            await client.reward(deferred.event_id, 0.5, policy="routing")
            assert (await client.policy_info("routing")).kind == "qnet"
            assert len(await client.list_policies()) == 2
            with pytest.raises(InvalidArgument, match="unknown feature 'nope'"):
                await client.decide("routing", {"nope": 1.0})
            with pytest.raises(NotFound):
                await client.policy_info("missing")
        async with AsyncClient(silent_target, timeout=0.2) as hung:
            with pytest.raises(DeadlineExceeded):
                await hung.decide("routing", TICKET)
        port = free_ports(1)[0]
        async with AsyncClient(f"127.0.0.1:{port}", retry=Retry(attempts=2)) as down:
            with pytest.raises(Unavailable, match=f"127.0.0.1:{port} not ready"):
                await down.wait_ready(0.2)
            with pytest.raises(Unavailable):
                await down.list_policies()

    asyncio.run(run())


def test_errors_survive_pickling() -> None:
    import pickle

    error = NotFound(grpc.StatusCode.NOT_FOUND, "unknown policy 'x'", "GetPolicyInfo")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.code, copy.message, str(copy)) == (
        NotFound, error.code, error.message, str(error))


_BLOCKED = """
import importlib.abc, sys

BLOCKED = {"onnxruntime", "numpy", "kafka", "torch", "onnx", "prometheus_client",
           "serving", "online", "models", "protos", "policyloop"}

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(name + " is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
import json
import grpc, google.protobuf.message
def top_level():
    return {m.split(".")[0] for m in sys.modules}
runtime = top_level()
import policyloop_client
from policyloop_client import _wire, Client, Request
from policyloop_client._proto import decision_pb2 as pb
_wire.decide_request(Request("p", {"a": 1.0}, [("x", [1.0]), "y"], seed=1), 0.1)
assert _wire.decision(pb.DecideResponse(chosen=[pb.SlotDecision(action_id="x")])).action == "x"
Client("127.0.0.1:1").close()
assert not top_level() & BLOCKED, top_level() & BLOCKED
print(json.dumps(sorted(top_level() - runtime - set(sys.stdlib_module_names))))
"""


def test_the_client_imports_nothing_of_the_server_nor_its_heavy_libraries(
        tmp_path: Path) -> None:
    """Apps install only grpcio and protobuf: with the server's packages, numpy, onnxruntime,
    kafka and torch blocked the client still imports and builds its messages, and loads no
    module that grpc and protobuf have not loaded already but its own."""
    result = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["policyloop_client"]


def test_the_blocker_really_blocks() -> None:
    result = subprocess.run([sys.executable, "-c", _BLOCKED.replace(
        "import policyloop_client\n", "import policyloop_client\nimport numpy\n", 1)],
        capture_output=True, text=True)
    assert result.returncode != 0 and "numpy is blocked" in result.stderr
