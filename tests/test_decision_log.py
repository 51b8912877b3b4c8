"""The decision log: never blocks, spools while the bus is down, delivers in order, once."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from policyloop.bus.interface import BusUnavailable
from policyloop.bus.local_log import LocalLog, LocalProducer
from policyloop.contract.errors import InvalidArgument, Unavailable
from serving.decision_log import DecisionLog

SPAWN = multiprocessing.get_context("spawn")
TOPIC = "decisions"


class SwitchableProducer:
    """A real LocalProducer the test can switch off (BusUnavailable) or hold (send blocks)."""

    def __init__(self, inner: LocalProducer) -> None:
        self.inner = inner
        self.down = False
        self.open = threading.Event()
        self.open.set()
        self.held = threading.Event()  # set while a send waits for `open`
        self.closed = False

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if not self.open.is_set():
            self.held.set()
            self.open.wait(10)
        if self.down:
            raise BusUnavailable("switched off by the test")
        if topic == "malformed":
            raise InvalidArgument("topic 'malformed' refused by the test")
        self.inner.send(topic, value, key)

    def flush(self, timeout: float = 10.0) -> None:
        if self.down:
            raise BusUnavailable("switched off by the test")
        self.inner.flush(timeout)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class DownProducer:
    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        raise BusUnavailable("always down")

    def flush(self, timeout: float = 10.0) -> None:
        raise BusUnavailable("always down")

    def close(self) -> None:
        pass


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _count(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("policyloop_decision_log_records_total",
                                      {"outcome": outcome})
    assert value is not None
    return value


def _gauge(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(f"policyloop_decision_log_{name}")
    assert value is not None
    return value


def _values(log: LocalLog, topic: str = TOPIC) -> list[bytes]:
    consumer = log.consumer("check", [topic])
    values: list[bytes] = []
    while batch := consumer.poll(1000, timeout=0.05):
        values.extend(r.value for r in batch)
    return values


def _records(start: int, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"event-{i % 7}".encode(), f"record-{i}".encode()) for i in range(start, start + n)]


@pytest.fixture
def bus_log(tmp_path: Path) -> LocalLog:
    return LocalLog(tmp_path / "bus", fsync=False)


def _decision_log(producer: object, spool: Path, **kwargs: object,
                  ) -> tuple[DecisionLog, CollectorRegistry]:
    registry = CollectorRegistry()
    log = DecisionLog(producer, spool_dir=spool, registry=registry,  # type: ignore[arg-type]
                      max_backoff_s=0.05, **kwargs)  # type: ignore[arg-type]
    return log, registry


def test_records_reach_the_bus_in_order_and_close_reports_success(bus_log: LocalLog,
                                                                  tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    log, registry = _decision_log(producer, tmp_path / "spool")
    records = _records(0, 1000)
    for key, value in records:
        log.submit(TOPIC, key, value)
    assert log.close(5.0) is True
    assert _values(bus_log) == [v for _, v in records]
    assert _count(registry, "delivered") == 1000
    assert _count(registry, "spooled") == _count(registry, "dropped") == 0
    assert _gauge(registry, "queue_depth") == 0
    assert producer.closed
    with pytest.raises(Unavailable, match="closed"):
        log.submit(TOPIC, b"k", b"late")


def test_records_submitted_while_the_bus_is_down_are_spooled_then_delivered_once_in_order(
        bus_log: LocalLog, tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    log, registry = _decision_log(producer, tmp_path / "spool")
    for key, value in _records(0, 300):
        log.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "spooled") == 300)
    assert _count(registry, "delivered") == 0
    assert _gauge(registry, "spool_bytes") > 0
    assert bus_log.end_offsets(TOPIC) == {}

    producer.down = False
    for key, value in _records(300, 50):  # behind the spool, not ahead of it
        log.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "delivered") == 350)
    assert _values(bus_log) == [v for _, v in _records(0, 350)]
    _wait(lambda: _gauge(registry, "spool_bytes") == 0)
    assert not list((tmp_path / "spool").glob("spool-*.log"))
    assert log.close(2.0) is True


def test_a_spool_of_several_segments_is_delivered_in_order_and_removed(
        bus_log: LocalLog, tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    # A 1 MiB budget makes 64 KiB segments; 600 records of ~340 bytes fill several.
    log, registry = _decision_log(producer, tmp_path / "spool", spool_budget_bytes=1 << 20)
    records = [(key, value + b"." * 300) for key, value in _records(0, 600)]
    log.submit(TOPIC, *records[0])
    _wait(lambda: _count(registry, "spooled") == 1)  # spooling: the rest append one by one
    for key, value in records[1:]:
        log.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "spooled") == 600)
    assert len(list((tmp_path / "spool").glob("spool-*.log"))) >= 2
    producer.down = False
    _wait(lambda: _count(registry, "delivered") == 600)
    assert _values(bus_log) == [v for _, v in records]
    _wait(lambda: not list((tmp_path / "spool").glob("spool-*.log")))
    assert log.close(2.0) is True


def test_a_new_decision_log_delivers_the_spool_left_by_a_closed_one_first(
        bus_log: LocalLog, tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    first, registry = _decision_log(producer, tmp_path / "spool")
    for key, value in _records(0, 50):
        first.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "spooled") == 50)
    started = time.monotonic()
    assert first.close(0.3) is False  # the bus never came back within the grace period
    assert time.monotonic() - started < 2.0

    second, registry = _decision_log(SwitchableProducer(bus_log.producer()), tmp_path / "spool")
    for key, value in _records(50, 10):
        second.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "delivered") == 60)
    assert _values(bus_log) == [v for _, v in _records(0, 60)]
    assert second.close(2.0) is True


def _crash_while_spooling(spool: str, n: int) -> None:
    """Runs in a child process: spool n records, then die without closing."""
    registry = CollectorRegistry()
    log = DecisionLog(DownProducer(), spool_dir=Path(spool), registry=registry,
                      max_backoff_s=0.05)
    for key, value in _records(0, n):
        log.submit(TOPIC, key, value)
    _wait(lambda: _count(registry, "spooled") == n)
    os._exit(0)


def test_a_crashed_process_spool_is_delivered_after_restart_despite_a_torn_tail(
        bus_log: LocalLog, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    child = SPAWN.Process(target=_crash_while_spooling, args=(str(spool), 40))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    segments = sorted(spool.glob("spool-*.log"))
    with open(segments[-1], "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # a write the crash cut short
    last = int(segments[-1].name[6:-4])
    (spool / f"spool-{last + 1:012d}.log").touch()  # a crash right after rolling

    log, registry = _decision_log(SwitchableProducer(bus_log.producer()), spool)
    _wait(lambda: _count(registry, "delivered") == 40)
    assert _values(bus_log) == [v for _, v in _records(0, 40)]
    assert log.close(2.0) is True


def test_a_full_queue_spools_instead_of_blocking_and_keeps_the_order(bus_log: LocalLog,
                                                                     tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.open.clear()  # the bus accepts nothing until released: the queue fills up
    log, registry = _decision_log(producer, tmp_path / "spool", max_queue=4)
    records = _records(0, 30)
    log.submit(TOPIC, *records[0])
    producer.held.wait(5)  # record 0 is in flight
    started = time.monotonic()
    for key, value in records[1:]:
        log.submit(TOPIC, key, value)
    assert time.monotonic() - started < 1.0  # never blocked
    assert _count(registry, "spooled") == 30  # the queue (in-flight head too) moved first
    assert _gauge(registry, "queue_depth") == 0

    producer.open.set()
    _wait(lambda: _count(registry, "delivered") == 30)
    assert _values(bus_log) == [v for _, v in records]  # the in-flight record is not resent
    assert log.close(2.0) is True


def test_exhausted_spool_budget_drops_counts_and_logs_once(bus_log: LocalLog, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           ) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    log, registry = _decision_log(producer, tmp_path / "spool", spool_budget_bytes=1000)
    with caplog.at_level(logging.ERROR, logger="serving.decision_log"):
        for key, value in _records(0, 100):
            log.submit(TOPIC, key, value + b"." * 40)
        _wait(lambda: _count(registry, "spooled") + _count(registry, "dropped") == 100)
        # the writer counts a drop before it logs it
        _wait(lambda: any("DROPPED" in r.getMessage() for r in caplog.records))
    spooled, dropped = _count(registry, "spooled"), _count(registry, "dropped")
    assert spooled > 0 and dropped > 0
    assert _gauge(registry, "spool_bytes") <= 1000
    errors = [r for r in caplog.records if "DROPPED" in r.getMessage()]
    assert len(errors) == 1  # rate-limited

    producer.down = False
    _wait(lambda: _count(registry, "delivered") == spooled)
    assert len(_values(bus_log)) == spooled
    assert log.close(2.0) is False  # some records never reached the bus


def test_a_record_the_producer_rejects_is_dropped_and_does_not_block_the_rest(
        bus_log: LocalLog, tmp_path: Path) -> None:
    log, registry = _decision_log(SwitchableProducer(bus_log.producer()), tmp_path / "spool")
    log.submit(TOPIC, b"k", b"before")
    log.submit("malformed", b"k", b"bad")
    log.submit(TOPIC, b"k", b"after")
    assert log.close(2.0) is False
    assert _values(bus_log) == [b"before", b"after"]
    assert _count(registry, "dropped") == 1


def test_one_spool_folder_serves_one_decision_log_at_a_time(bus_log: LocalLog,
                                                            tmp_path: Path) -> None:
    log, _ = _decision_log(SwitchableProducer(bus_log.producer()), tmp_path / "spool")
    with pytest.raises(Unavailable, match="in use"):
        _decision_log(SwitchableProducer(bus_log.producer()), tmp_path / "spool")
    assert log.close(1.0) is True


@pytest.mark.parametrize("kwargs", [{"max_queue": 0}, {"spool_budget_bytes": 0}])
def test_limits_are_validated(bus_log: LocalLog, tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(kwargs))):
        _decision_log(bus_log.producer(), tmp_path / "spool", **kwargs)


def test_durable_resolves_once_every_record_submitted_so_far_left_memory(
        bus_log: LocalLog, tmp_path: Path) -> None:
    log, _ = _decision_log(bus_log.producer(), tmp_path / "spool", linger_s=0.05)
    try:
        log.submit(TOPIC, b"k", b"one")
        future = log.durable(0)
        assert future is not None and not future.done()  # still lingering in memory
        future.result(timeout=5)
        assert log.durable(log.submitted) is None  # nothing left in memory
        assert _values(bus_log) == [b"one"]
    finally:
        log.close(5)


def test_durable_fails_for_a_record_dropped_because_the_spool_is_full(
        bus_log: LocalLog, tmp_path: Path) -> None:
    """The bus down and the spool's budget spent: the call whose record was dropped must not be
    acknowledged; one whose record was spooled is."""
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    log, registry = _decision_log(producer, tmp_path / "spool", spool_budget_bytes=1000,
                                  max_queue=1)
    try:
        outcomes = []
        for key, value in _records(0, 40):
            refusal = _submit_durably(log, key, value + b"." * 40)
            if refusal is not None:
                assert "not durable" in str(refusal) and "spool budget" in str(refusal)
            outcomes.append("ok" if refusal is None else "refused")
        dropped = _count(registry, "dropped")
        assert dropped > 0 and outcomes.count("refused") == dropped, (outcomes, dropped)
        assert outcomes.count("ok") == _count(registry, "spooled")
        assert outcomes[0] == "ok" and outcomes[-1] == "refused"
    finally:
        producer.down = False
        log.close(2.0)


def test_durable_fails_when_the_spool_cannot_be_written(bus_log: LocalLog,
                                                        tmp_path: Path) -> None:
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    log, registry = _decision_log(producer, tmp_path / "spool", max_queue=1)
    try:
        log._spool.append = _fail_writing  # type: ignore[method-assign]  # a full disk
        mark = log.submitted
        for key, value in _records(0, 3):
            log.submit(TOPIC, key, value)
        future = log.durable(mark)
        assert future is not None
        with pytest.raises(Unavailable, match="cannot write spool"):
            future.result(timeout=5)
        assert _count(registry, "dropped") >= 2
    finally:
        producer.down = False
        log.close(2.0)


def _submit_durably(log: DecisionLog, key: bytes, value: bytes) -> Unavailable | None:
    """Submit one record and wait for its durable acknowledgement (``--durable-ack``): None
    when acknowledged, else the refusal."""
    mark = log.submitted
    log.submit(TOPIC, key, value)
    future = log.durable(mark)
    try:
        if future is not None:
            future.result(timeout=5)
    except Unavailable as exc:
        return exc
    return None


def _fail_writing(frames: object) -> None:
    raise OSError(28, "No space left on device")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills (mounting needs root; CI runs as root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_on_a_full_disk_every_acknowledged_record_reaches_the_bus_once(
        bus_log: LocalLog, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16, finding 3 on a real full disk (not a mocked write): the bus down, the spool
    on a 64 KiB tmpfs with its budget far from reached. Calls whose records fit are
    acknowledged, the rest refused with the disk's error; space freed, five more are
    acknowledged; once the bus is back, exactly the acknowledged records are on it, each once,
    and no delivery step failed (the cursor is rewritten in place, needing no free block)."""
    producer = SwitchableProducer(bus_log.producer())
    producer.down = True
    log, registry = _decision_log(producer, small_disk / "spool", max_queue=1)
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(16 << 10))
    acknowledged, refused = [], []

    def submit(i: int) -> None:
        key = f"event-{i}".encode()
        refusal = _submit_durably(log, key, key + b"." * 1000)
        if refusal is None:
            acknowledged.append(key)
        else:
            assert "No space left on device" in str(refusal), refusal
            refused.append(key)

    try:
        for i in range(200):  # about 200 KiB into 64 KiB
            submit(i)
        assert acknowledged and len(refused) > 100, (len(acknowledged), len(refused))
        assert _count(registry, "dropped") == len(refused)
        ballast.unlink()  # room again: appends go on after the write the full disk cut short
        for i in range(200, 205):
            submit(i)
        assert acknowledged[-5:] == [f"event-{i}".encode() for i in range(200, 205)]
        producer.down = False
        _wait(lambda: _count(registry, "delivered") >= len(acknowledged), timeout=20)
    finally:
        producer.down = False
        log.close(5.0)  # False: not every record submitted was delivered (some refused)
    assert _count(registry, "delivered") == len(acknowledged)
    assert not list((small_disk / "spool").glob("spool-*.log")), "spool left undelivered"
    assert [v[:v.index(b".")] for v in _values(bus_log)] == acknowledged
    assert "delivery failed unexpectedly" not in caplog.text
