"""The one byte format of bus records outside a broker: frames of a length, a CRC32 and a body.

Three streams carry records as bytes: the local log's segment files
(``policyloop/bus/local_log.py``), the decision log's disk spool (``serving/decision_log.py``)
and the pipe from the server to its log writer process (``serving/log_writer.py``). They share
this module, so a torn write, a flipped bit or a length no writer produced means the same
thing, and is caught the same way, in all three.

A frame is ``u32 body length | u32 CRC32(body) | body`` (big-endian). A record's body is::

    [i64 timestamp_ms] [u16 topic length] i32 key length (-1: no key) | [topic] | key | value

the value running to the end of the body. Two layouts of it are in use, each with the fields
its stream needs and no more:

* segment records (``encode_segment_record``, ``decode_segment_records``): timestamp, no topic
  (the partition's folder names it). Key + value are at most ``MAX_SEGMENT_RECORD_BYTES``.
* routed records (``encode_routed_record(s)``, ``decode_routed_records``): a topic (UTF-8), no
  timestamp (the bus stamps a record when it takes it); the spool and the pipe.

Both layouts are byte for byte those the local log and the spool wrote before this module, so
existing segment files and a crashed server's spool still read. (The pipe had no CRC and an
explicit value length; it now carries routed frames too.)

Decoding the frame at an offset has one of three verdicts (``Verdict``): OK; INCOMPLETE, the
buffer ends inside the frame (a torn tail, or a write in progress: read more, or cut); CORRUPT,
a CRC mismatch, a length beyond the layout's limit, or a body whose lengths do not add up. A
frame that is not OK is never decoded into a record. A length over the limit is CORRUPT as soon
as the 8-byte prefix is read, so a reader never allocates what it claims; routed frames are
bounded only by the u32 (their readers hold the bytes already: a spool segment, a pipe message).

Every CRC here is ``binascii.crc32``: the same CRC as ``zlib.crc32``, but it keeps the
interpreter lock, where zlib's releases it for inputs over 5 KiB. The server's decision-log
thread frames and reads back hundreds of such records a batch; with zlib it would hand the lock
to the request path and wait to get it back once per record.
"""

from __future__ import annotations

import binascii
import enum
import struct
import sys
from collections.abc import Iterable

from policyloop.contract.errors import InvalidArgument

PREFIX = struct.Struct(">II")  # body length, CRC32 of the body
_SEGMENT_HEAD = struct.Struct(">qi")  # timestamp_ms, key length (-1: no key)
_ROUTED_HEAD = struct.Struct(">Hi")  # topic length, key length (-1: no key)
# The prefix and a layout's head read in one call (the decoders' fast path).
_SEGMENT_START = struct.Struct(">IIqi")
_ROUTED_START = struct.Struct(">IIHi")

MAX_SEGMENT_RECORD_BYTES = 64 << 20  # key + value of a segment record
SEGMENT_MAX_BODY = _SEGMENT_HEAD.size + MAX_SEGMENT_RECORD_BYTES
MAX_BODY = 0xFFFFFFFF  # what the u32 length can say: the limit of routed frames

# A decoded segment record: (timestamp_ms, key, value).
SegmentRecord = tuple[int, bytes | None, bytes]
# A routed record, to encode or decoded: (topic, key, value).
RoutedRecord = tuple[str, bytes | None, bytes]

_crc32 = binascii.crc32


class Verdict(enum.Enum):
    """What the bytes at an offset hold (module docstring)."""

    OK = "ok"
    INCOMPLETE = "incomplete"
    CORRUPT = "corrupt"


def encode_frame(body: bytes) -> bytes:
    """``body`` behind its length and CRC32.

    >>> encode_frame(b"abc").hex(" ", -4)
    '00000003 352441c2 616263'
    """
    if len(body) > MAX_BODY:
        raise InvalidArgument(f"a frame body is at most {MAX_BODY} bytes, got {len(body)}")
    return PREFIX.pack(len(body), _crc32(body)) + body


def check_frame(buf: bytes, at: int, max_body: int) -> tuple[Verdict, int]:
    """The verdict on the frame at ``buf[at]`` (its envelope: length and CRC), with a position.

    OK: the frame's end. INCOMPLETE: the end the frame needs (``at + PREFIX.size`` while even
    the prefix is cut), so a reader of a file knows how much to read. CORRUPT: ``at``; a length
    over ``max_body`` is CORRUPT before anything else is looked at. Whether the body fits its
    layout is the decoders' part.

    >>> frame = encode_frame(b"abc")
    >>> check_frame(frame, 0, 3)
    (<Verdict.OK: 'ok'>, 11)
    >>> check_frame(frame[:9], 0, 3)
    (<Verdict.INCOMPLETE: 'incomplete'>, 11)
    >>> check_frame(frame, 0, 2)
    (<Verdict.CORRUPT: 'corrupt'>, 0)
    """
    if len(buf) - at < PREFIX.size:
        return Verdict.INCOMPLETE, at + PREFIX.size
    length, crc = PREFIX.unpack_from(buf, at)
    end = at + PREFIX.size + length
    if length > max_body:
        return Verdict.CORRUPT, at
    if end > len(buf):
        return Verdict.INCOMPLETE, end
    if _crc32(memoryview(buf)[at + PREFIX.size:end]) != crc:
        return Verdict.CORRUPT, at
    return Verdict.OK, end


def _stopped(buf: bytes, at: int, full: bool, max_body: int) -> Verdict:
    """Why a decoder stopped at ``at``: OK when it decoded all it was asked for, else the
    frame's verdict, where an envelope that checks out means its body does not."""
    if full:
        return Verdict.OK
    verdict, _ = check_frame(buf, at, max_body)
    return Verdict.CORRUPT if verdict is Verdict.OK else verdict


def encode_segment_record(timestamp_ms: int, key: bytes | None, value: bytes) -> bytes:
    """The frame of one segment record; InvalidArgument past ``MAX_SEGMENT_RECORD_BYTES``.

    >>> frame = encode_segment_record(1, b"k", b"v")
    >>> len(frame), decode_segment_records(frame)
    (22, ([(1, b'k', b'v')], [22], <Verdict.INCOMPLETE: 'incomplete'>))
    """
    size = len(value) + (0 if key is None else len(key))
    if size > MAX_SEGMENT_RECORD_BYTES:
        raise InvalidArgument(
            f"record is {size} bytes (key + value), more than {MAX_SEGMENT_RECORD_BYTES}")
    body = b"".join((_SEGMENT_HEAD.pack(timestamp_ms, -1 if key is None else len(key)),
                     key or b"", value))
    return PREFIX.pack(len(body), _crc32(body)) + body


def decode_segment_records(buf: bytes, at: int = 0, limit: int = sys.maxsize,
                           ) -> tuple[list[SegmentRecord], list[int], Verdict]:
    """Up to ``limit`` consecutive good segment records from ``buf[at]`` on.

    Returns (records, ends, verdict): ``ends[i]`` is the position in ``buf`` just after
    ``records[i]``; the verdict is on the frame where decoding stopped (``ends[-1]``, or
    ``at``): OK only when ``limit`` records were decoded (that frame was not looked at), else
    INCOMPLETE (also when the buffer ends exactly there) or CORRUPT.
    """
    records: list[SegmentRecord] = []
    ends: list[int] = []
    view = memoryview(buf)
    size = len(buf)
    unpack = _SEGMENT_START.unpack_from
    head = _SEGMENT_HEAD.size
    while len(records) < limit and size - at >= _SEGMENT_START.size:
        length, crc, timestamp_ms, key_len = unpack(buf, at)
        start = at + PREFIX.size
        end = start + length
        key_start = start + head
        value_start = key_start + (key_len if key_len > 0 else 0)
        if (not (head <= length <= SEGMENT_MAX_BODY and end <= size and key_len >= -1
                 and value_start <= end) or _crc32(view[start:end]) != crc):
            break
        records.append((timestamp_ms, None if key_len < 0 else buf[key_start:value_start],
                        buf[value_start:end]))
        ends.append(end)
        at = end
    return records, ends, _stopped(buf, at, len(records) >= limit, SEGMENT_MAX_BODY)


def _topic_bytes(topic: str) -> bytes:
    name = topic.encode("utf-8")
    if len(name) > 0xFFFF:
        raise InvalidArgument(f"topic is {len(name)} bytes in UTF-8, more than 65535: "
                              f"{topic[:40]!r}...")
    return name


def encode_routed_record(topic: str, key: bytes | None, value: bytes) -> bytes:
    """The frame of one routed record.

    >>> frame = encode_routed_record("t", None, b"v")
    >>> len(frame), decode_routed_records(frame)[0]
    (16, [('t', None, b'v')])
    """
    name = _topic_bytes(topic)
    key_len = -1 if key is None else len(key)
    if key_len > 0x7FFFFFFF:
        raise InvalidArgument(f"key for topic {topic!r} is {key_len} bytes, more than 2 GiB")
    return encode_frame(b"".join((_ROUTED_HEAD.pack(len(name), key_len), name, key or b"",
                                  value)))


def encode_routed_records(items: Iterable[RoutedRecord]) -> bytes:
    """The frames of ``items``, concatenated: the bytes of ``encode_routed_record`` of each,
    made for the log writer's pipe, where the server frames every record it logs.

    The head and topic of a frame depend only on (topic, key length), so their bytes and CRC
    are made once per pair, and each frame's CRC continues from there (``crc32(data, crc)``):
    per record, one prefix and a list append of the parts, no body assembled.
    """
    parts: list[bytes] = []
    starts: dict[tuple[str, int], tuple[bytes, int, int]] = {}
    pack = PREFIX.pack
    try:
        for topic, key, value in items:
            key_len = -1 if key is None else len(key)
            start = starts.get((topic, key_len))
            if start is None:
                name = _topic_bytes(topic)
                head = _ROUTED_HEAD.pack(len(name), key_len) + name
                start = starts[(topic, key_len)] = (head, _crc32(head),
                                                    len(head) + max(key_len, 0))
            head, crc, fixed = start
            if key is None:
                parts += (pack(fixed + len(value), _crc32(value, crc)), head, value)
            else:
                parts += (pack(fixed + len(value), _crc32(value, _crc32(key, crc))), head, key,
                          value)
    except struct.error as e:  # a key over 2 GiB, or a body over 4 GiB
        raise InvalidArgument(f"record too large to frame: {e}") from None
    return b"".join(parts)


def decode_routed_records(buf: bytes, at: int = 0, limit: int = sys.maxsize,
                          ) -> tuple[list[RoutedRecord], list[int], Verdict]:
    """Up to ``limit`` consecutive good routed records from ``buf[at]`` on: (records, ends,
    verdict) as ``decode_segment_records`` returns them. A topic that is not UTF-8 is
    CORRUPT."""
    records: list[RoutedRecord] = []
    ends: list[int] = []
    view = memoryview(buf)
    size = len(buf)
    unpack = _ROUTED_START.unpack_from
    head = _ROUTED_HEAD.size
    while len(records) < limit and size - at >= _ROUTED_START.size:
        length, crc, topic_len, key_len = unpack(buf, at)
        start = at + PREFIX.size
        end = start + length
        key_start = start + head + topic_len
        value_start = key_start + (key_len if key_len > 0 else 0)
        if (not (head <= length and end <= size and key_len >= -1 and value_start <= end)
                or _crc32(view[start:end]) != crc):
            break
        try:
            topic = buf[start + head:key_start].decode("utf-8")
        except UnicodeDecodeError:
            break
        records.append((topic, None if key_len < 0 else buf[key_start:value_start],
                        buf[value_start:end]))
        ends.append(end)
        at = end
    return records, ends, _stopped(buf, at, len(records) >= limit, MAX_BODY)
