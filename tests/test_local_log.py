"""The embedded local log (durable, cross-process, torn-tail tolerant) and the event codec."""

from __future__ import annotations

import multiprocessing
import os
import time
import zlib
from pathlib import Path

import pytest

from policyloop.bus import interface as bus
from policyloop.bus import local_log
from policyloop.bus.interface import Record
from policyloop.bus.local_log import LocalConsumer, LocalLog, partition_for
from policyloop.contract.errors import InvalidArgument

SPAWN = multiprocessing.get_context("spawn")


def _write(root: str, topic: str, prefix: str, n: int, partitions: int) -> None:
    """Runs in a child process: n keyed records '<prefix>-<i>'."""
    producer = LocalLog(Path(root), partitions=partitions, fsync=False).producer()
    for i in range(n):
        producer.send(topic, f"{prefix}-{i}".encode(), key=f"{prefix}-{i % 7}".encode())
        if i % 25 == 24:  # many small appends, so the writers' appends interleave
            producer.flush()
    producer.close()


def _drain(consumer: LocalConsumer, n: int, timeout: float = 10.0) -> list[Record]:
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        records.extend(consumer.poll(500, timeout=0.05))
    return records


def _drain_all(consumer: LocalConsumer) -> list[Record]:
    """Everything readable now (all writers have finished)."""
    records: list[Record] = []
    while batch := consumer.poll(500, timeout=0.05):
        records.extend(batch)
    return records


def _index(value: bytes) -> int:
    return int(value.decode().rsplit("-", 1)[1])


def test_records_written_by_another_process_are_read_in_offset_order(tmp_path: Path) -> None:
    consumer = LocalLog(tmp_path, partitions=3).consumer("g", ["decisions"])
    assert consumer.assignment() == set()  # the topic does not exist yet
    writer = SPAWN.Process(target=_write, args=(str(tmp_path), "decisions", "w", 300, 3))
    writer.start()
    records = _drain(consumer, 300)
    writer.join(10)
    assert writer.exitcode == 0
    assert consumer.poll(timeout=0.05) == []
    assert consumer.assignment() == {("decisions", p) for p in range(3)}
    assert sorted(_index(r.value) for r in records) == list(range(300))
    for p in range(3):
        mine = [r for r in records if r.partition == p]
        assert [r.offset for r in mine] == list(range(len(mine)))
        assert [_index(r.value) for r in mine] == sorted(_index(r.value) for r in mine)
        assert all(partition_for(r.key, 3) == p for r in mine if r.key is not None)
    assert LocalLog(tmp_path).end_offsets("decisions") == {
        p: sum(r.partition == p for r in records) for p in range(3)}


def test_concurrent_writers_in_two_processes_do_not_corrupt_frames(tmp_path: Path) -> None:
    writers = [SPAWN.Process(target=_write, args=(str(tmp_path), "t", name, 1000, 1))
               for name in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(20)
        assert w.exitcode == 0
    records = _drain(LocalLog(tmp_path).consumer("g", ["t"]), 2000)
    assert [r.offset for r in records] == list(range(2000))
    for name in ("a", "b"):
        mine = [_index(r.value) for r in records if r.value.startswith(name.encode())]
        assert mine == list(range(1000))  # each writer's records, complete and in order


def _segment(root: Path, topic: str, ext: str) -> Path:
    (path,) = (root / "topics" / topic / "0").glob(f"*.{ext}")
    return path


@pytest.mark.parametrize("damage", ["log cut mid-frame", "log last byte flipped",
                                    "index cut mid-entry"])
def test_torn_tail_is_skipped_and_the_next_append_repairs_it(tmp_path: Path,
                                                             damage: str) -> None:
    log = LocalLog(tmp_path)
    producer = log.producer()
    for i in range(5):
        producer.send("t", f"v{i}".encode(), key=b"k")
    producer.close()
    if damage == "log cut mid-frame":
        path = _segment(tmp_path, "t", "log")
        os.truncate(path, path.stat().st_size - 3)
    elif damage == "log last byte flipped":
        path = _segment(tmp_path, "t", "log")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path = _segment(tmp_path, "t", "idx")
        os.truncate(path, path.stat().st_size - 4)

    consumer = log.consumer("g", ["t"])
    assert [r.value for r in _drain_all(consumer)] == [b"v0", b"v1", b"v2", b"v3"]
    assert consumer.poll(timeout=0.05) == []

    producer = log.producer()
    producer.send("t", b"after", key=b"k")
    producer.flush()
    (record,) = consumer.poll(timeout=1.0)
    # a committed record (its index entry whole) keeps its offset even though its frame is
    # lost; an entry cut short never committed, so its offset was never handed out
    committed = damage != "index cut mid-entry"
    after = 5 if committed else 4
    assert (record.offset, record.value) == (after, b"after")
    assert consumer.damaged_records == int(committed)
    assert log.end_offsets("t") == {0: after + 1}
    fresh = log.consumer("fresh", ["t"])
    assert [(r.offset, r.value) for r in _drain(fresh, 5)] == [
        (0, b"v0"), (1, b"v1"), (2, b"v2"), (3, b"v3"), (after, b"after")]


def _ten_records(root: Path) -> tuple[LocalLog, list[int]]:
    """A log whose topic "t" holds value-0 .. value-9 in one segment, and each record's byte
    position in it (from the index)."""
    log = LocalLog(root)
    producer = log.producer()
    for i in range(10):
        producer.send("t", f"value-{i}".encode(), key=b"k")
    producer.close()
    index = _segment(root, "t", "idx").read_bytes()
    return log, [p for (p,) in local_log._POS.iter_unpack(index)]


@pytest.mark.parametrize("damage", ["value byte flipped", "length zeroed", "two in a row"])
def test_a_damaged_record_mid_log_is_skipped_counted_and_the_rest_read(
        tmp_path: Path, damage: str) -> None:
    log, positions = _ten_records(tmp_path)
    pos, nxt = positions[4], positions[5]
    path = _segment(tmp_path, "t", "log")
    data = bytearray(path.read_bytes())
    if damage == "value byte flipped":
        data[nxt - 1] ^= 0xFF
    elif damage == "length zeroed":
        data[pos:pos + 4] = bytes(4)
    else:  # records 4 and 5
        data[pos + 10] ^= 0xFF
        data[nxt + 10] ^= 0xFF
    path.write_bytes(bytes(data))

    consumer = log.consumer("g", ["t"])
    records = _drain_all(consumer)
    lost = {4, 5} if damage == "two in a row" else {4}
    assert [(r.offset, _index(r.value)) for r in records] == [
        (i, i) for i in range(10) if i not in lost]
    assert consumer.damaged_records == len(lost)
    producer = log.producer()  # the tail is intact: appending goes on at offset 10
    producer.send("t", b"value-10", key=b"k")
    producer.flush()
    (record,) = _drain(consumer, 1)
    assert record.offset == 10 and log.end_offsets("t") == {0: 11}


def test_an_index_entry_pointing_at_another_record_never_hands_that_record_out_twice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frames carry no offset, so the index alone would believe an entry damaged into the
    position of record 3: a reader from the start follows the frames instead; one that seeks
    to the entry waits rather than take record 3 again; the next append mends the entry
    (found by tests/test_local_log_corruption.py)."""
    log, positions = _ten_records(tmp_path)
    index = _segment(tmp_path, "t", "idx")
    data = bytearray(index.read_bytes())
    data[9 * 8:10 * 8] = local_log._POS.pack(positions[3])
    index.write_bytes(bytes(data))
    assert [(r.offset, _index(r.value)) for r in _drain_all(log.consumer("g", ["t"]))] == [
        (i, i) for i in range(10)]
    seeker = log.consumer("seek", ["t"])
    seeker.commit({("t", 0): 9})
    seeker = log.consumer("seek", ["t"])
    assert _drain_all(seeker) == []
    producer = log.producer()
    producer.send("t", b"value-10", key=b"k")
    producer.flush()
    assert [(r.offset, r.value) for r in _drain(seeker, 2)] == [(9, b"value-9"),
                                                                (10, b"value-10")]
    assert "the entry of offset 9 was damaged" in caplog.text
    assert local_log._POS.unpack(index.read_bytes()[72:80]) == (positions[9],)


def test_offsets_of_a_torn_tail_are_never_reused_so_a_consumer_past_them_misses_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A machine crash can lose the frames of records a consumer already read (from the page
    cache) while their index entries persist. The repair must not hand their offsets out
    again: the consumer's committed position (10) lies past them, and it would skip the new
    records that reused 7, 8, 9 (issue 16, finding 4)."""
    log, positions = _ten_records(tmp_path)
    before = log.consumer("before", ["t"])
    assert len(_drain_all(before)) == 10
    before.commit({("t", 0): 10})
    os.truncate(_segment(tmp_path, "t", "log"), positions[7] + 5)  # records 7, 8, 9 torn
    consumer = log.consumer("g", ["t"])
    assert [_index(r.value) for r in _drain_all(consumer)] == list(range(7))
    assert consumer.damaged_records == 0  # at the tail: waits for the repair, skips nothing
    producer = log.producer()
    producer.send("t", b"value-70", key=b"k")
    producer.flush()
    (record,) = _drain(consumer, 1)
    assert (record.offset, record.value) == (10, b"value-70")
    assert consumer.damaged_records == 3  # now sealed in the old segment: skipped, counted
    assert "3 committed records lost (offsets 7..9, not reused)" in caplog.text
    resumed = log.consumer("before", ["t"])  # from its committed position, 10
    assert [(r.offset, r.value) for r in _drain(resumed, 1)] == [(10, b"value-70")]
    assert log.end_offsets("t") == {0: 11}


def test_a_position_past_the_end_is_reported_and_reads_from_the_earliest_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A group's position kept from another log (this one deleted and recreated): by the
    documented rule it reads this log from the start instead of waiting for ever."""
    log, _ = _ten_records(tmp_path)
    log.consumer("old", ["t"]).commit({("t", 0): 50})
    consumer = log.consumer("old", ["t"])
    assert [r.offset for r in _drain_all(consumer)] == list(range(10))
    assert consumer.position_resets == 1 and consumer.position(("t", 0)) == 10
    assert "position 50 is past the end 10" in caplog.text
    at_end = log.consumer("at-end", ["t"])
    at_end.commit({("t", 0): 10})
    at_end = log.consumer("at-end", ["t"])
    assert _drain_all(at_end) == [] and at_end.position_resets == 0  # the end is no reset


def test_the_damaged_tail_of_a_sealed_segment_is_skipped(tmp_path: Path) -> None:
    """Only the newest segment is ever repaired, so damage at the end of an older one is
    passed over to the next segment."""
    log = LocalLog(tmp_path, fsync=False, segment_bytes=512)
    producer = log.producer()
    for i in range(40):
        producer.send("t", f"value-{i}".encode(), key=b"k")
        producer.flush()
    producer.close()
    first = sorted((tmp_path / "topics" / "t" / "0").glob("*.log"))[0]
    kept = first.stat().st_size
    os.truncate(first, kept - 3)
    records = _drain_all(log.consumer("g", ["t"]))
    got = [_index(r.value) for r in records]
    assert len(got) == 39 and got == sorted(got) and 39 == max(got)
    assert [r.offset for r in records] == got  # offsets unchanged


def test_keys_go_to_crc32_modulo_partitions_and_keyless_records_round_robin(
        tmp_path: Path) -> None:
    """The local log's own partitioner (test_bus_conformance.py pins what both buses share)."""
    log = LocalLog(tmp_path, partitions=4, fsync=False)
    producer = log.producer()
    for i in range(40):
        producer.send(bus.DECISIONS, b"d", key=f"event-{i}".encode())
    for _ in range(8):
        producer.send(bus.ACTIVATIONS, b"no key")
    producer.flush()
    records = _drain(log.consumer("g", [bus.DECISIONS, bus.ACTIVATIONS]), 48)
    keyed = [(r.partition, r.key) for r in records if r.key is not None]
    assert len(keyed) == 40
    assert all(p == zlib.crc32(key) % 4 == partition_for(key, 4) for p, key in keyed)
    keyless = [r.partition for r in records if r.key is None]
    assert sorted(keyless) == [0, 0, 1, 1, 2, 2, 3, 3]  # round-robin
    assert log.topics() == [bus.ACTIVATIONS, bus.DECISIONS]


def test_segments_roll_and_retention_keeps_offsets_global(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, fsync=False, segment_bytes=512, retention_bytes=2048)
    producer = log.producer()
    early = log.consumer("early", ["t"])
    for i in range(10):
        producer.send("t", f"value-{i:04d}".encode())
    producer.flush()
    assert [_index(r.value) for r in _drain(early, 10)] == list(range(10))
    for i in range(10, 300):
        producer.send("t", f"value-{i:04d}".encode())
    producer.flush()
    folder = tmp_path / "topics" / "t" / "0"
    assert len(list(folder.glob("*.log"))) > 1
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 2048 + 600
    assert log.end_offsets("t") == {0: 300}

    late = _drain_all(log.consumer("late", ["t"]))
    assert 0 < late[0].offset and late[-1].offset == 299
    assert [r.offset for r in late] == list(range(late[0].offset, 300))
    assert all(_index(r.value) == r.offset for r in late)
    # The early reader finishes the segment it holds open, then moves up to the oldest kept.
    resumed = [r.offset for r in _drain_all(early)]
    assert resumed[0] == 10 and resumed == sorted(set(resumed))
    assert resumed[-len(late):] == [r.offset for r in late]


@pytest.mark.parametrize("kwargs", [{"partitions": 0}, {"segment_bytes": 0},
                                    {"retention_bytes": -1}])
def test_log_settings_are_validated(tmp_path: Path, kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=name):
        LocalLog(tmp_path, **kwargs)


@pytest.mark.parametrize("topic", [".hidden", "t" * 201])  # both fine on Kafka
def test_topic_names_that_are_not_plain_file_names_are_refused(tmp_path: Path,
                                                               topic: str) -> None:
    with pytest.raises(InvalidArgument, match="topic"):
        LocalLog(tmp_path).producer().send(topic, b"x")


def test_sent_records_are_buffered_until_flush_or_a_full_buffer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = LocalLog(tmp_path, partitions=2, fsync=False)
    producer = log.producer()
    consumer = log.consumer("g", ["t"])
    for i in range(5):
        producer.send("t", f"v{i}".encode(), key=f"k{i}".encode())
    assert consumer.poll(timeout=0.05) == []
    producer.flush()
    assert sorted(r.value for r in _drain(consumer, 5)) == [f"v{i}".encode() for i in range(5)]
    monkeypatch.setattr(local_log, "_MAX_BUFFERED_BYTES", 60)
    for i in range(5, 10):  # each frame is 24 bytes: the third send writes out three
        producer.send("t", f"v{i}".encode(), key=f"k{i}".encode())
    assert sorted(r.value for r in _drain(consumer, 3)) == [b"v5", b"v6", b"v7"]
    assert consumer.poll(timeout=0.05) == []
    producer.close()
    assert sorted(r.value for r in _drain(consumer, 2)) == [b"v8", b"v9"]
