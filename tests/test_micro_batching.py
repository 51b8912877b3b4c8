"""Micro-batched Decide calls decide exactly as unbatched ones, fail one by one, and the
transport's one-copy feature matrix equals the row-by-row conversion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.grpc_decision import dense_rows
from tests.server_harness import ServerThread, channel, make_registry, serve_config
from tests.test_server import CONTEXT_DIM, recsys_request


def test_dense_rows_equal_the_row_by_row_matrix() -> None:
    rng = np.random.default_rng(3)
    for width in (1, 6, 31, 64, 300):  # 300 floats: a two-byte length header
        rows = [pb.Features(dense=rng.standard_normal(width)) for _ in range(7)]
        expected = np.array([list(f.dense) for f in rows], dtype=np.float32)
        got = dense_rows(rows)
        assert got is not None and got.dtype == np.float32 and got.shape == (7, width)
        np.testing.assert_array_equal(got, expected)


def _with_unknown_field(features: pb.Features) -> pb.Features:
    return pb.Features.FromString(features.SerializeToString() + b"\x78\x01")  # field 15 = 1


@pytest.mark.parametrize("rows", [
    [],
    [pb.Features(), pb.Features()],
    [pb.Features(dense=[1.0, 2.0]), pb.Features(dense=[1.0])],
    [pb.Features(dense=[1.0, 2.0]), pb.Features(dense=[1.0], named={"a": 2.0})],
    [pb.Features(dense=[1.0, 2.0]), _with_unknown_field(pb.Features(dense=[3.0, 4.0]))],
], ids=["none", "empty", "ragged", "named", "unknown-field"])
def test_dense_rows_leave_anything_but_plain_equal_rows_to_the_general_path(rows) -> None:
    assert dense_rows(rows) is None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerThread]]:
    """The same registry served unbatched and with micro-batches of up to 8 (20 ms wait)."""
    tmp = tmp_path_factory.mktemp("batching")
    make_registry(tmp / "registry")
    plain = ServerThread(serve_config(tmp, bus_path=tmp / "bus-plain", micro_batch_size=1))
    batched = ServerThread(serve_config(tmp, bus_path=tmp / "bus-batched",
                                        spool_dir=tmp / "spool-batched", micro_batch_size=8,
                                        micro_batch_wait_ms=20.0))
    yield plain.target, batched
    plain.stop()
    batched.stop()


def test_batched_calls_decide_as_alone_and_fail_one_by_one(servers) -> None:
    plain_target, batched = servers
    good = [recsys_request(k=3 + i % 5, seed=i + 1) for i in range(14)]
    bad = recsys_request(k=3, seed=99)
    bad.context.dense[:] = [float("nan")] * CONTEXT_DIM
    unknown = recsys_request(k=3, seed=98)
    unknown.policy = "nope"
    with channel(plain_target) as ch:
        expected = [pb_grpc.DecisionServiceStub(ch).Decide(r, timeout=5) for r in good]
    with channel(batched.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        calls = [stub.Decide.future(r, timeout=5) for r in [*good[:7], bad, *good[7:], unknown]]
        results = []
        for call in calls:
            try:
                results.append(call.result())
            except grpc.RpcError as e:
                results.append(e)
    failed = [results.pop(7), results.pop()]
    assert failed[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be finite" in failed[0].details()
    assert failed[1].code() == grpc.StatusCode.NOT_FOUND
    for alone, together in zip(expected, results, strict=True):
        assert together.ranking == alone.ranking
        assert [(c.action_id, c.propensity) for c in together.chosen] == [
            (c.action_id, c.propensity) for c in alone.chosen]
        assert together.event_id != alone.event_id
    registry = batched.running.metrics_registry
    count = registry.get_sample_value("policyloop_decide_micro_batch_size_count")
    total = registry.get_sample_value("policyloop_decide_micro_batch_size_sum")
    assert count is not None and total == 16 and count < 16  # some calls shared a batch


def test_micro_batch_settings_are_checked(tmp_path: Path) -> None:
    from policyloop.contract.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="micro_batch_size must be >= 1"):
        serve_config(tmp_path, micro_batch_size=0).validate()
    with pytest.raises(InvalidArgument, match=r"micro_batch_wait_ms must be in \(0, 1000\]"):
        serve_config(tmp_path, micro_batch_wait_ms=0.0).validate()


def test_a_lone_caller_does_not_wait_and_concurrent_callers_batch_again(
        tmp_path: Path) -> None:
    """Calls one after another: the first waits alone, and from then on calls are decided at
    once (with a 500 ms wait, ten sequential calls that waited would take five seconds). A
    second later, the probe finds concurrent calls again, and they share batches."""
    import time

    make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path, micro_batch_size=8, micro_batch_wait_ms=500.0))
    registry = server.running.metrics_registry

    def batches() -> tuple[float, float]:
        count = registry.get_sample_value("policyloop_decide_micro_batch_size_count")
        total = registry.get_sample_value("policyloop_decide_micro_batch_size_sum")
        assert count is not None and total is not None
        return count, total

    try:
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            stub.Decide(recsys_request(k=3), timeout=5)
            start = time.monotonic()
            for i in range(10):
                stub.Decide(recsys_request(k=3, seed=i + 1), timeout=5)
            assert time.monotonic() - start < 2.5
            assert batches() == (11, 11)  # every call alone
            time.sleep(1.1)
            calls = [stub.Decide.future(recsys_request(k=3, seed=i + 1), timeout=5)
                     for i in range(16)]
            for call in calls:
                call.result()
            count, total = batches()
            assert total == 27 and count - 11 < 16  # some of the 16 shared a batch
    finally:
        server.stop()
