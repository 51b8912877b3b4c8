"""The framing codec: records round-trip, damage is never read as a record, and the bytes on
disk are those the local log and the spool wrote before the codec existed."""

from __future__ import annotations

import doctest
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from policyloop.bus import framing
from policyloop.bus.framing import (
    MAX_SEGMENT_RECORD_BYTES,
    PREFIX,
    SEGMENT_MAX_BODY,
    Verdict,
    check_frame,
    decode_routed_records,
    decode_segment_records,
    encode_frame,
    encode_routed_record,
    encode_routed_records,
    encode_segment_record,
)
from policyloop.bus.interface import Record
from policyloop.bus.local_log import LocalLog
from policyloop.contract.errors import InvalidArgument
from serving.decision_log import DecisionLog
from serving.log_writer import pack, unpack

LARGE = bytes(range(256)) * 12_000  # 3 MiB: more than the local log's 1 MiB read chunk

SEGMENT_RECORDS = [(0, None, b""), (1, b"", b"v"), (-5, b"key", b""),
                   (1_700_000_000_000, b"event-1", b"x" * 300), (7, None, LARGE)]
ROUTED_RECORDS = [("decisions", None, b""), ("rewards", b"", b"v"), ("t", b"key", b""),
                  ("topic-\u00fcml\u00e4ut", b"event-1", b"x" * 300), ("decisions", None, LARGE)]

# Each layout: (encode one record to a frame, decode a buffer), so one test covers both.
Encode = Callable[[tuple], bytes]
Decode = Callable[..., tuple[list, list[int], Verdict]]
LAYOUTS: dict[str, tuple[Encode, Decode, list[tuple]]] = {
    "segment": (lambda r: encode_segment_record(*r), decode_segment_records, SEGMENT_RECORDS),
    "routed": (lambda r: encode_routed_record(*r), decode_routed_records, ROUTED_RECORDS),
}
SMALL = {name: [r for r in records if len(r[2]) < 1000]
         for name, (_, _, records) in LAYOUTS.items()}


def _old_segment_frame(timestamp_ms: int, key: bytes | None, value: bytes) -> bytes:
    """A frame as policyloop/bus/local_log.py wrote it before the codec, spelled out here."""
    body = struct.pack(">qi", timestamp_ms, -1 if key is None else len(key)) + (key or b"") + value
    return struct.pack(">II", len(body), zlib.crc32(body)) + body


def _old_spool_frame(topic: str, key: bytes | None, value: bytes) -> bytes:
    """A frame as serving/decision_log.py spooled it before the codec, spelled out here."""
    name = topic.encode()
    body = (struct.pack(">Hi", len(name), -1 if key is None else len(key)) + name + (key or b"")
            + value)
    return struct.pack(">II", len(body), zlib.crc32(body)) + body


def test_the_docstring_examples_hold() -> None:
    failed, tried = doctest.testmod(framing)
    assert tried > 0 and failed == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_records_round_trip_with_and_without_key_empty_and_large_values(layout: str) -> None:
    encode, decode, records = LAYOUTS[layout]
    frames = [encode(r) for r in records]
    stream = b"".join(frames)
    decoded, ends, verdict = decode(stream)
    assert decoded == records
    assert ends == [sum(len(f) for f in frames[:i + 1]) for i in range(len(frames))]
    assert verdict is Verdict.INCOMPLETE  # nothing after the last frame yet
    assert [check_frame(stream, at, framing.MAX_BODY) for at in [0, *ends[:-1]]] == [
        (Verdict.OK, end) for end in ends]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoding_stops_at_the_limit_with_verdict_ok_and_resumes_from_an_end(layout: str,
                                                                             ) -> None:
    encode, decode, records = LAYOUTS[layout]
    stream = b"".join(encode(r) for r in records)
    first, ends, verdict = decode(stream, 0, 2)
    assert (first, verdict) == (records[:2], Verdict.OK)
    rest, _, verdict = decode(stream, ends[-1])
    assert (rest, verdict) == (records[2:], Verdict.INCOMPLETE)
    assert decode(stream, 0, 0) == ([], [], Verdict.OK)


def test_frames_are_byte_identical_to_the_local_log_and_spool_before_the_codec() -> None:
    """An existing local log and a crashed older server's spool must still read."""
    for timestamp_ms, key, value in SEGMENT_RECORDS:
        assert (encode_segment_record(timestamp_ms, key, value)
                == _old_segment_frame(timestamp_ms, key, value))
    for topic, key, value in ROUTED_RECORDS:
        assert encode_routed_record(topic, key, value) == _old_spool_frame(topic, key, value)


def test_the_batch_encoder_writes_the_bytes_of_the_single_one() -> None:
    batch = [*ROUTED_RECORDS, ("decisions", b"event-2", b"y"), ("rewards", b"k", b"z"),
             ("decisions", None, b"w"), ("t", b"ab", b"")]
    assert encode_routed_records(batch) == b"".join(encode_routed_record(*r) for r in batch)
    assert encode_routed_records([]) == b""
    assert unpack(pack(batch)) == batch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_single_byte_flip_is_reported_and_never_decoded_into_a_record(layout: str,
                                                                            ) -> None:
    """In a stream of two frames, a flip in the first yields no record, a flip in the second
    only the first: damage reads as CORRUPT or INCOMPLETE, never as a different record."""
    encode, decode, _ = LAYOUTS[layout]
    for first, second in zip(SMALL[layout], SMALL[layout][1:], strict=False):
        frame = encode(first)
        stream = frame + encode(second)
        for i in range(len(stream)):
            for mask in (0x01, 0x80, 0xFF):
                damaged = bytearray(stream)
                damaged[i] ^= mask
                decoded, _, verdict = decode(bytes(damaged))
                assert decoded == ([] if i < len(frame) else [first]), (first, second, i, mask)
                assert verdict in (Verdict.CORRUPT, Verdict.INCOMPLETE)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_truncation_point_is_incomplete(layout: str) -> None:
    encode, decode, _ = LAYOUTS[layout]
    for first, second in zip(SMALL[layout], SMALL[layout][1:], strict=False):
        frame, torn = encode(first), encode(second)
        for cut in range(len(torn)):
            decoded, ends, verdict = decode(frame + torn[:cut])
            assert (decoded, verdict) == ([first], Verdict.INCOMPLETE), (second, cut)
            needed = len(torn) if cut >= PREFIX.size else PREFIX.size
            assert check_frame(frame + torn[:cut], ends[0], framing.MAX_BODY) == (
                Verdict.INCOMPLETE, len(frame) + needed)


def test_a_length_over_the_limit_is_corrupt_from_the_prefix_alone_without_allocating_it() -> None:
    prefix = PREFIX.pack(SEGMENT_MAX_BODY + 1, 0)
    tracemalloc.start()
    try:
        assert check_frame(prefix, 0, SEGMENT_MAX_BODY) == (Verdict.CORRUPT, 0)
        assert decode_segment_records(prefix + b"\0" * 20) == ([], [], Verdict.CORRUPT)
        # Routed frames are bounded only by the u32: the claim is incomplete, not allocated.
        huge = PREFIX.pack(0xFFFFFFFF, 0) + b"\0" * 20
        assert decode_routed_records(huge) == ([], [], Verdict.INCOMPLETE)
        assert check_frame(huge, 0, framing.MAX_BODY) == (Verdict.INCOMPLETE, 8 + 0xFFFFFFFF)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_local_log_reads_past_a_frame_claiming_gigabytes_without_allocating_them(
        tmp_path: Path) -> None:
    log = LocalLog(tmp_path, fsync=False)
    producer = log.producer()
    producer.send("t", b"good", key=b"k")
    producer.close()
    (segment,) = (tmp_path / "topics" / "t" / "0").glob("*.log")
    (index,) = (tmp_path / "topics" / "t" / "0").glob("*.idx")
    size = segment.stat().st_size
    with open(segment, "ab") as f:  # a second record whose length field is garbage
        f.write(PREFIX.pack(0xFFFFFFF0, 0) + b"\0" * 16)
    with open(index, "ab") as f:
        f.write(struct.pack(">Q", size))
    consumer = log.consumer("g", ["t"])
    tracemalloc.start()
    try:
        records = consumer.poll(timeout=0.05) + consumer.poll(timeout=0.05)
        producer = log.producer()
        producer.send("t", b"after", key=b"k")  # repairs the tail first
        producer.close()
        records += consumer.poll(timeout=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the corrupt record keeps offset 1 (counted lost); no offset is ever given twice
    assert [(r.offset, r.value) for r in records] == [(0, b"good"), (2, b"after")]
    assert peak < 16 << 20


@pytest.mark.parametrize("body, why", [
    (struct.pack(">qi", 1, -2) + b"v", "key length below -1"),
    (struct.pack(">qi", 1, 5) + b"abc", "key longer than the body"),
    (b"\0" * 11, "body shorter than its head"),
])
def test_a_crc_valid_segment_body_whose_lengths_do_not_add_up_is_corrupt(body: bytes,
                                                                         why: str) -> None:
    good = encode_segment_record(1, b"k", b"v")
    decoded, ends, verdict = decode_segment_records(good + encode_frame(body))
    assert (decoded, verdict) == ([(1, b"k", b"v")], Verdict.CORRUPT), why


@pytest.mark.parametrize("body, why", [
    (struct.pack(">Hi", 1, -2) + b"tv", "key length below -1"),
    (struct.pack(">Hi", 9, 0) + b"t", "topic longer than the body"),
    (struct.pack(">Hi", 1, 4) + b"tab", "key longer than the body"),
    (struct.pack(">Hi", 2, -1) + b"\xff\xfev", "topic not UTF-8"),
    (b"\0" * 5, "body shorter than its head"),
])
def test_a_crc_valid_routed_body_whose_lengths_do_not_add_up_is_corrupt(body: bytes,
                                                                        why: str) -> None:
    good = encode_routed_record("t", None, b"v")
    decoded, ends, verdict = decode_routed_records(good + encode_frame(body))
    assert (decoded, verdict) == ([("t", None, b"v")], Verdict.CORRUPT), why


def test_records_the_layouts_cannot_hold_are_refused_at_encoding() -> None:
    with pytest.raises(InvalidArgument, match="more than 67108864"):
        encode_segment_record(1, b"k", b"\0" * MAX_SEGMENT_RECORD_BYTES)
    with pytest.raises(InvalidArgument, match="topic is 70000 bytes"):
        encode_routed_record("t" * 70_000, None, b"v")
    with pytest.raises(InvalidArgument, match="topic is 70000 bytes"):
        encode_routed_records([("t" * 70_000, None, b"v")])


def test_the_local_log_refuses_a_record_over_the_limit_before_creating_its_topic(
        tmp_path: Path) -> None:
    log = LocalLog(tmp_path, fsync=False)
    with pytest.raises(InvalidArgument, match=r"record for topic 't': record is 67108865 bytes"):
        log.producer().send("t", b"\0" * MAX_SEGMENT_RECORD_BYTES, key=b"k")
    assert log.topics() == []


def test_the_log_writer_refuses_a_damaged_batch_instead_of_guessing() -> None:
    data = pack([("t", b"k", b"v"), ("t", None, b"w")])
    assert unpack(data) == [("t", b"k", b"v"), ("t", None, b"w")]
    with pytest.raises(ValueError, match="incomplete frame after 1 records"):
        unpack(data[:-1])
    with pytest.raises(ValueError, match="corrupt frame after 0 records"):
        unpack(data[:10] + bytes([data[10] ^ 1]) + data[11:])


def _write_old_partition(folder: Path, frames: list[bytes]) -> None:
    folder.mkdir(parents=True)
    positions = [sum(len(f) for f in frames[:i]) for i in range(len(frames))]
    (folder / f"{0:020d}.log").write_bytes(b"".join(frames))
    (folder / f"{0:020d}.idx").write_bytes(struct.pack(f">{len(frames)}Q", *positions))


def test_a_local_log_written_before_the_codec_opens_reads_and_appends(tmp_path: Path) -> None:
    """Files spelled out in the old format, one record larger than the 1 MiB read chunk."""
    topic = tmp_path / "topics" / "t"
    _write_old_partition(topic / "0", [_old_segment_frame(*r) for r in SEGMENT_RECORDS])
    (topic / "meta.json").write_text(json.dumps({"partitions": 1, "segment_bytes": 64 << 20}))
    log = LocalLog(tmp_path, fsync=False)
    producer = log.producer()
    producer.send("t", b"new", key=b"k")
    producer.close()
    consumer = log.consumer("g", ["t"])
    records: list[Record] = []
    deadline = time.monotonic() + 10
    while len(records) < len(SEGMENT_RECORDS) + 1 and time.monotonic() < deadline:
        records += consumer.poll(timeout=0.1)
    assert [(r.timestamp_ms, r.key, r.value) for r in records[:-1]] == SEGMENT_RECORDS
    assert (records[-1].offset, records[-1].key, records[-1].value) == (5, b"k", b"new")


class _Collect:
    """A producer that keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent.append((topic, key, value))

    def flush(self, timeout: float = 10.0) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_spool_an_older_server_left_behind_is_delivered_and_its_torn_tail_cut(
        tmp_path: Path) -> None:
    records = [("decisions", f"event-{i}".encode() if i % 3 else None, f"d{i}".encode())
               for i in range(20)]
    spool = tmp_path / "spool"
    spool.mkdir()
    old = b"".join(_old_spool_frame(*r) for r in records)
    (spool / "spool-000000000003.log").write_bytes(old + _old_spool_frame("t", b"k", b"x")[:9])
    (spool / "cursor").write_text(json.dumps({"segment": 3, "position": 0}))
    producer = _Collect()
    log = DecisionLog(producer, spool_dir=spool)
    assert log.close(5.0) is True
    assert producer.sent == records
