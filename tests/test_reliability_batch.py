"""DecideBatch errors name their row, and event ids are unique (issue #16, finding 9): a batch
that repeats an event id is refused; a later call that reuses one is answered (the client
library's resend of a lost Decide does exactly that) and counted."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from tests.server_harness import ServerThread, channel, make_registry, serve_config


def routing(event_id: str = "", dims: int = 5) -> pb.DecideRequest:
    return pb.DecideRequest(policy="routing", event_id=event_id, seed=3,
                            context=pb.Features(dense=[0.1] * dims))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("batch")
    make_registry(tmp / "registry")
    running = ServerThread(serve_config(tmp))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.DecisionServiceStub]:
    with channel(server.target) as ch:
        yield pb_grpc.DecisionServiceStub(ch)


def reused(server: ServerThread) -> float:
    return server.running.metrics_registry.get_sample_value(
        "policyloop_reused_event_ids_total", {"policy": "routing"}) or 0.0


def refused(stub: pb_grpc.DecisionServiceStub, *rows: pb.DecideRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.DecideBatch(pb.DecideBatchRequest(requests=rows), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details() or ""


@pytest.mark.parametrize("bad_row", [0, 2])
def test_a_bad_row_is_named_in_the_error(stub, bad_row: int) -> None:
    rows = [routing() for _ in range(3)]
    rows[bad_row] = routing(dims=4)
    details = refused(stub, *rows)
    assert details.startswith(f"requests[{bad_row}]: ") and "context" in details


def test_a_single_decide_has_no_row_prefix(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(routing(dims=4), timeout=5)
    assert not (info.value.details() or "").startswith("requests[")


def test_a_batch_repeating_an_event_id_is_refused_and_nothing_of_it_is_counted(
        server: ServerThread, stub) -> None:
    before = reused(server)
    details = refused(stub, routing("dup-1"), routing("other-1"), routing("dup-1"))
    assert "requests[2]" in details and "'dup-1'" in details and "requests[0]" in details
    assert reused(server) == before
    # the refused batch logged nothing, so its ids are still fresh
    stub.DecideBatch(pb.DecideBatchRequest(requests=[routing("dup-1")]), timeout=5)
    assert reused(server) == before


def test_an_event_id_reused_across_calls_is_answered_and_counted(
        server: ServerThread, stub) -> None:
    before = reused(server)
    first = stub.Decide(routing("again-1"), timeout=5)
    second = stub.Decide(routing("again-1"), timeout=5)  # a resend: same id, same seed
    assert second.event_id == first.event_id == "again-1"
    assert [c.action_id for c in second.chosen] == [c.action_id for c in first.chosen]
    assert reused(server) == before + 1
    stub.Decide(routing(), timeout=5)  # server-made ids are never counted
    stub.Decide(routing(), timeout=5)
    assert reused(server) == before + 1
