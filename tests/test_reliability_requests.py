"""Requests that must be refused at entry (issue #16 findings 1 and 8): an absurd reward, an
out-of-range timestamp, a huge echoed policy name, calls beyond ``max_concurrency``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from policyloop.contract.errors import InvalidArgument, shown
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.config import ServeConfig, load_serve_config
from tests.server_harness import (
    ServerThread,
    channel,
    health_status,
    make_registry,
    serve_config,
)
from tests.test_server import recsys_request


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.DecisionServiceStub]:
    tmp = tmp_path_factory.mktemp("reliability")
    make_registry(tmp / "registry")
    running = ServerThread(serve_config(tmp, reward_limit=1000.0))
    try:
        with channel(running.target) as ch:
            yield pb_grpc.DecisionServiceStub(ch)
    finally:
        running.stop()


def refused(call, request) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    return info.value.code(), info.value.details() or ""


@pytest.mark.parametrize("value, slots", [(1e300, []), (-1001.0, []), (1.0, [2.0, 1e300])])
def test_a_reward_beyond_the_limit_is_refused(stub, value: float, slots: list[float]) -> None:
    code, details = refused(stub.Reward, pb.RewardRequest(event_id="e1", value=value,
                                                          slot_rewards=slots))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reward value" in details and "1000" in details and "--reward-limit" in details


def test_a_reward_within_the_limit_is_accepted(stub) -> None:
    assert stub.Reward(pb.RewardRequest(event_id="e2", value=-1000.0), timeout=5).event_id


@pytest.mark.parametrize("seconds", [10**15, -(10**15), 253_402_300_800])
def test_a_timestamp_out_of_range_is_invalid_argument(stub, seconds: int) -> None:
    request = pb.RewardRequest(event_id="e3", value=1.0)
    request.timestamp.seconds = seconds
    code, details = refused(stub.Reward, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "timestamp" in details


def test_a_huge_policy_name_gives_a_short_message(stub) -> None:
    name = "p" * 200_000
    for call, request in [(stub.Reward, pb.RewardRequest(event_id="e4", value=1.0, policy=name)),
                          (stub.Activate, pb.ActivateRequest(event_id="e4", policy=name)),
                          (stub.GetPolicyInfo, pb.GetPolicyInfoRequest(policy=name))]:
        code, details = refused(call, request)
        assert code == grpc.StatusCode.NOT_FOUND
        assert len(details) < 300 and "200002 chars" in details


def test_shown_cuts_long_values() -> None:
    assert shown("abc") == "'abc'"
    assert shown("x" * 500) == "'" + "x" * 99 + "…(502 chars)"


@pytest.mark.parametrize("limit", [0.0, -1.0, float("inf"), float("nan")])
def test_reward_limit_must_be_positive_and_finite(limit: float) -> None:
    with pytest.raises(InvalidArgument, match="reward_limit"):
        ServeConfig(reward_limit=limit).validate()


def test_reward_limit_is_a_flag_with_a_default(tmp_path: Path) -> None:
    assert ServeConfig().reward_limit == 1e6
    assert load_serve_config(None, {"reward_limit": 5.0}, environ={}).reward_limit == 5.0


def test_an_unknown_health_service_is_not_found_counted_as_such_not_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.server_harness import health_status

    make_registry(tmp_path / "registry")
    running = ServerThread(serve_config(tmp_path))
    try:
        with channel(running.target) as ch, pytest.raises(grpc.RpcError) as info:
            health_status(ch, "no-such-policy")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        samples = {(s.labels["method"], s.labels["code"]): s.value
                   for m in running.running.metrics_registry.collect()
                   if m.name == "policyloop_requests" for s in m.samples
                   if s.name.endswith("_total")}
        checks = {code: n for (method, code), n in samples.items() if method.endswith("Check")}
        assert checks == {"NOT_FOUND": 1.0}, samples
        assert "unhandled error" not in caplog.text
    finally:
        running.stop()


def test_calls_beyond_max_concurrency_are_resource_exhausted_and_counted(tmp_path: Path) -> None:
    """Two calls are held in flight by a micro-batch that waits a second for company; the
    four sent meanwhile are refused at once, say why, and appear in the request counter."""
    make_registry(tmp_path / "registry")
    running = ServerThread(serve_config(tmp_path, max_concurrency=2, micro_batch_size=100,
                                        micro_batch_wait_ms=1000))
    try:
        with channel(running.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)

            def decide(seed: int) -> tuple[grpc.StatusCode, str]:
                try:
                    stub.Decide(recsys_request(seed=seed), timeout=10)
                except grpc.RpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""

            with ThreadPoolExecutor(2) as held:
                first = [held.submit(decide, seed) for seed in (1, 2)]
                until = time.monotonic() + 5
                while (running.running.metrics_registry.get_sample_value(
                        "policyloop_requests_in_flight") != 2 and time.monotonic() < until):
                    time.sleep(0.005)
                late = [decide(seed) for seed in range(3, 7)]
                probe = health_status(ch, "")  # probes are not held to the limit
                answers = [f.result() for f in first]
        assert answers == [(grpc.StatusCode.OK, "")] * 2
        assert probe == health_pb2.HealthCheckResponse.SERVING
        assert [code for code, _ in late] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        assert all("max_concurrency" in details for _, details in late), late
        counted = {s.labels["code"]: s.value for m in running.running.metrics_registry.collect()
                   if m.name == "policyloop_requests" for s in m.samples
                   if s.name.endswith("_total") and s.labels["method"] == "Decide"}
        assert counted == {"OK": 2.0, "RESOURCE_EXHAUSTED": 4.0}
    finally:
        running.stop()
