"""The decision log's producer in a child process: batches become durable at flush, failures
read as a bus failure, and a server configured with it logs its decisions."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.contract.errors import InvalidArgument
from protos import decision_pb2_grpc as pb_grpc
from serving.log_writer import ProcessProducer, pack, unpack
from tests.server_harness import ServerThread, channel, make_registry, serve_config
from tests.test_server import read_topic, recsys_request


def _read(root: Path, topic: str = "t") -> list[tuple[bytes | None, bytes]]:
    consumer = LocalLog(root, partitions=2).consumer(f"r-{uuid.uuid4()}", [topic])
    out: list[tuple[bytes | None, bytes]] = []
    while batch := consumer.poll(max_records=10_000, timeout=0.1):
        out.extend((r.key, r.value) for r in batch)
    consumer.close()
    return out


def test_pack_and_unpack_round_trip() -> None:
    batch = [("t", b"k", b"v" * 3), ("decisions", None, b""), ("t", b"", b"\x00\xff")]
    assert unpack(pack(batch)) == batch


def test_records_are_on_the_bus_once_flush_returns(tmp_path: Path) -> None:
    producer = ProcessProducer("local", path=tmp_path, partitions=2)
    try:
        for i in range(50):
            producer.send("t", f"v{i}".encode(), f"k{i % 5}".encode())
        assert _read(tmp_path) == []
        producer.flush()
        records = _read(tmp_path)
        assert sorted(v for _, v in records) == sorted(f"v{i}".encode() for i in range(50))
        per_key = [v for k, v in records if k == b"k3"]
        assert per_key == [f"v{i}".encode() for i in range(3, 50, 5)]  # order kept per key
        with pytest.raises(InvalidArgument, match="value must be bytes"):
            producer.send("t", "text", None)  # type: ignore[arg-type]
    finally:
        producer.close()


def test_a_dead_or_stuck_writer_is_replaced(tmp_path: Path) -> None:
    """Dead between batches: the next flush starts a new child and delivers. Stuck on a batch
    (stopped): the flush fails like a bus failure after its timeout, and the next one goes to
    a new child."""
    producer = ProcessProducer("local", path=tmp_path, partitions=2)
    try:
        producer.send("t", b"first", b"k")
        producer.flush()
        first = producer._process
        assert first is not None and first.pid is not None
        first.kill()
        first.join()
        producer.send("t", b"second", b"k")
        producer.flush()
        second = producer._process
        assert second is not None and second.pid not in (None, first.pid)
        os.kill(second.pid, signal.SIGSTOP)
        producer.send("t", b"stuck", b"k")
        with pytest.raises(bus.BusUnavailable, match="did not confirm a batch within 0.5 s"):
            producer.flush(timeout=0.5)
        assert not second.is_alive()
        producer.send("t", b"third", b"k")
        producer.flush()
        assert [v for _, v in _read(tmp_path)] == [b"first", b"second", b"third"]
    finally:
        producer.close()


def test_a_producer_error_in_the_writer_reaches_the_caller(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    producer = ProcessProducer("local", path=tmp_path / "file" / "bus", partitions=2)
    try:
        producer.send("t", b"x", b"k")
        with pytest.raises(bus.BusUnavailable):
            producer.flush()
    finally:
        producer.close()


def test_a_server_with_the_process_writer_logs_its_decisions(tmp_path: Path) -> None:
    make_registry(tmp_path / "registry")
    server = ServerThread(serve_config(tmp_path, log_writer="process"))
    try:
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            ids = [stub.Decide(recsys_request(k=4, seed=i + 1), timeout=5).event_id
                   for i in range(20)]
        values = read_topic(server, bus.DECISIONS, until=ids[-1].encode())
        assert all(any(i.encode() in v for v in values) for i in ids)
    finally:
        assert server.stop()


def test_close_delivers_the_last_batch_and_stops_the_writer_even_if_a_record_is_refused(
        tmp_path: Path) -> None:
    producer = ProcessProducer("local", path=tmp_path, partitions=2)
    child = producer._process
    producer.send("t", b"last", b"k")
    producer.send("not a topic!", b"refused", b"k")
    producer.close()  # logs the refusal instead of raising, and still stops the child
    assert child is not None and not child.is_alive()
    assert [v for _, v in _read(tmp_path)] == [b"last"]
    with pytest.raises(bus.BusUnavailable, match="closed"):
        producer.send("t", b"after", b"k")


def test_a_record_the_writer_refuses_is_dropped_and_counted_and_the_rest_delivered(
        tmp_path: Path) -> None:
    """A refused record must not fail its whole batch: the decision log would retry that
    batch from the spool for ever, and nothing after it would reach the bus."""
    import time

    from prometheus_client import CollectorRegistry

    from serving.decision_log import DecisionLog

    producer = ProcessProducer("local", path=tmp_path / "bus", partitions=2)
    producer.send("t", b"a", b"k")
    producer.send("not a topic!", b"b", b"k")
    producer.send("t", b"c", b"k")
    with pytest.raises(bus.RecordsRejected, match="'not a topic!'"):
        producer.flush()
    assert [v for _, v in _read(tmp_path / "bus")] == [b"a", b"c"]

    registry = CollectorRegistry()
    log = DecisionLog(producer, spool_dir=tmp_path / "spool", registry=registry)
    log.submit("t", b"k", b"d")
    log.submit("not a topic!", b"k", b"e")
    log.submit("t", b"k", b"f")
    deadline = time.monotonic() + 10
    while len(_read(tmp_path / "bus")) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.close(5) is False  # close reports success only when nothing was dropped
    assert [v for _, v in _read(tmp_path / "bus")] == [b"a", b"c", b"d", b"f"]
    outcome = "policyloop_decision_log_records_total"
    assert registry.get_sample_value(outcome, {"outcome": "dropped"}) == 1
    assert registry.get_sample_value(outcome, {"outcome": "delivered"}) == 2
