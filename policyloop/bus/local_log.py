"""The embedded durable event log: the default bus, plain files on local disk, no broker.

Layout under ``root``::

    topics/<topic>/meta.json          {"partitions": P, "segment_bytes": S}, fixed at creation
    topics/<topic>/<p>/lock           flock'ed by every append to partition p
    topics/<topic>/<p>/<base>.log     frames of the records base, base+1, ... (base: 20 digits)
    topics/<topic>/<p>/<base>.idx     one big-endian u64 byte position per record
    groups/<group>.json               committed offsets {"<topic>:<p>": next offset to read}

A record is a segment-record frame of ``policyloop/bus/framing.py``, ``u32 body length |
u32 CRC32(body) | i64 timestamp_ms | i32 key length (-1: no key) | key | value``, with at most
64 MiB of key and value; logs written before that module have the same bytes. An append writes
the frame, then its index entry, under an exclusive ``fcntl.flock`` on the partition's lock
file, so any number of processes may produce. The index is the commit point: readers return
only records with an index entry and a complete, CRC-valid frame, and stop before the first
that is not (a crash's torn tail, or a write in progress) without raising; the next poll picks
up from there. The next append repairs a torn tail first. Bytes after the last committed
record (a frame whose index entry was never written, or an entry cut short) are cut off. Index
entries whose frames a machine crash did not persist stay where they are, and appends go on in
a new segment starting after them: an offset is never handed out twice, so a consumer that
moved past one never misses the record that would have reused it. Offsets are 0, 1, 2, ... per
partition, with a gap only where records were lost. A damaged frame with a good committed
record after it (a bad disk), or in a segment that is no longer the newest (a repaired tail),
is skipped by readers with an error in the log and counted
(``LocalConsumer.damaged_records``); the records after it keep their offsets.

Frames carry no offset: the ``n``-th frame of a segment is the record ``base + n``, and the
frames are the truth. A reader reads on by following them; an index entry it seeks to is
believed only when a neighbour agrees (its frame ends where the next entry begins), so a
damaged entry never hands a record out under a second offset; the next append mends an entry
near the tail that disagrees with the frames (logged) instead of taking it for a torn write.

Since offsets are never reused, a position past a partition's end (a group or a checkpoint
kept from a log that was deleted and recreated, or restored from an older copy) names no
record this log will ever hold: the reader logs an error, counts it
(``LocalConsumer.position_resets``) and reads the partition from its earliest record, as
Kafka does with ``auto.offset.reset=earliest``.

Seeking to any offset is O(1): its index entry, once a neighbour agrees, gives the byte
position. A segment rolls to a
new file once it holds ``segment_bytes``; with ``retention_bytes`` set, a producer deletes the
partition's oldest whole segments after a roll while the partition holds more than that.
Offsets stay global; a consumer positioned before the oldest kept record moves up to it.

Limits: one consumer per group (it is assigned every partition of its topics; no rebalancing);
a consumer without a committed offset starts at the earliest record. A producer buffers what it
is sent; ``flush`` appends it (then readers see it) and makes it survive a machine crash
(fsync).
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from policyloop.bus.framing import (
    PREFIX,
    SEGMENT_MAX_BODY,
    SegmentRecord,
    Verdict,
    check_frame,
    decode_segment_records,
    encode_segment_record,
)
from policyloop.bus.interface import (
    BusUnavailable,
    Record,
    Shard,
    TopicPartition,
    check_offset,
    check_record,
    check_shard,
    check_topic_partition,
)
from policyloop.contract.errors import InvalidArgument

log = logging.getLogger(__name__)

_POS = struct.Struct(">Q")  # index entry: byte position of a frame in its segment
_FAR = 1 << 62  # no segment is this long: an index entry past it is damaged (pread's off_t)
_MAX_BUFFERED_BYTES = 4 << 20
_READ_CHUNK = 1 << 20
_IDLE_SLEEP_S = 0.02
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of a keyed record: CRC32 of the key modulo the partition count."""
    return zlib.crc32(key) % partitions


def _frame_end(fd: int, pos: int) -> int | None:
    """The file position after the good frame at byte ``pos``; None if torn or corrupt.

    Reads the prefix first, so a corrupt length is refused before its bytes are read."""
    if pos >= _FAR:
        return None
    head = os.pread(fd, PREFIX.size, pos)
    verdict, end = check_frame(head, 0, SEGMENT_MAX_BODY)
    if verdict is Verdict.CORRUPT or len(head) < PREFIX.size:
        return None
    records, ends, _ = decode_segment_records(os.pread(fd, end, pos), 0, 1)
    return pos + ends[0] if records else None


def _read_frames(fd: int, pos: int, n: int) -> tuple[list[SegmentRecord], int]:
    """Up to ``n`` consecutive good records from byte ``pos`` on, and the byte after them."""
    if pos >= _FAR:
        return [], pos
    buf = os.pread(fd, _READ_CHUNK, pos)
    records, ends, verdict = decode_segment_records(buf, 0, n)
    if not records and verdict is Verdict.INCOMPLETE and len(buf) == _READ_CHUNK:
        _, end = check_frame(buf, 0, SEGMENT_MAX_BODY)  # a frame larger than one chunk
        records, ends, _ = decode_segment_records(os.pread(fd, end, pos), 0, 1)
    return records, pos + (ends[-1] if ends else 0)


def _entry(idx_fd: int, j: int) -> int:
    """Index entry ``j``: the byte position of the segment's ``j``-th record."""
    (pos,) = _POS.unpack(os.pread(idx_fd, _POS.size, j * _POS.size))
    return pos


def _vouched(log_fd: int, idx_fd: int, j: int, count: int) -> int | None:
    """The end of record ``j``'s frame when its index entry is confirmed, else None.

    Frames do not carry their offsets, so a damaged entry that happens to point at another
    good frame would hand that record out under a second offset. An entry is believed only
    when a neighbour agrees: the frame it points at ends where entry ``j + 1`` begins, or, for
    the last one, it is the segment's first byte or where the frame before it ends (or at
    least after that frame's start, when that frame is damaged too)."""
    pos = _entry(idx_fd, j)
    end = _frame_end(log_fd, pos)
    if end is None:
        return None
    if j + 1 < count:
        return end if _entry(idx_fd, j + 1) == end else None
    if j == 0:
        return end if pos == 0 else None
    before = _entry(idx_fd, j - 1)
    if pos <= before:
        return None
    before_end = _frame_end(log_fd, before)
    return end if before_end is None or before_end == pos else None


def _segment_bases(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(".idx") and n[:-4].isdigit())


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view, pos = view[written:], pos + written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{kind} must match {_NAME.pattern} (letters, digits, '.', '_', '-'), got {name!r}")
    return name


class _Appender:
    """Appends to one partition; every append holds the partition's flock."""

    def __init__(self, directory: Path, segment_bytes: int, retention_bytes: int | None,
                 fsync: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._retention_bytes = retention_bytes
        self._fsync = fsync
        self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._base = -1
        self._log_fd = -1
        self._idx_fd = -1
        self._count = 0  # records in the open segment, as last seen by this appender
        self._end = 0  # bytes of good frames in the open segment

    def append(self, frames: Sequence[bytes]) -> None:
        """Store encoded frames, in order, under one lock: per segment one write of the frames,
        then one of their index entries (the commit point)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._catch_up()
            done = 0
            while done < len(frames):
                if self._end >= self._segment_bytes and self._count:
                    self._roll()
                positions: list[int] = []
                end, stop = self._end, done
                while stop < len(frames) and (end < self._segment_bytes or not positions):
                    positions.append(end)
                    end += len(frames[stop])
                    stop += 1
                _pwrite_all(self._log_fd, b"".join(frames[done:stop]), self._end)
                _pwrite_all(self._idx_fd, struct.pack(f">{len(positions)}Q", *positions),
                            self._count * _POS.size)
                self._count += len(positions)
                self._end, done = end, stop
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        if self._log_fd >= 0:
            os.fsync(self._log_fd)
            os.fsync(self._idx_fd)

    def close(self) -> None:
        self._close_segment()
        os.close(self._lock_fd)

    def _catch_up(self) -> None:
        """Open the newest segment and learn (or repair) its tail if it changed since we wrote."""
        if self._log_fd < 0 or os.fstat(self._log_fd).st_size >= self._segment_bytes:
            bases = _segment_bases(self._dir)
            newest = bases[-1] if bases else 0
            if newest != self._base:
                self._open(newest)
        log_size = os.fstat(self._log_fd).st_size
        idx_size = os.fstat(self._idx_fd).st_size
        if log_size == self._end and idx_size == self._count * _POS.size:
            return
        indexed = idx_size // _POS.size
        if idx_size != indexed * _POS.size:  # an entry cut short: that record never committed
            os.ftruncate(self._idx_fd, indexed * _POS.size)
        n, end = indexed, 0
        while n:
            frame_end = _vouched(self._log_fd, self._idx_fd, n - 1, indexed)
            if frame_end is not None:
                end = frame_end
                break
            n -= 1
        while n < indexed:  # the frames are the truth: an entry that disagrees is mended
            frame_end = _frame_end(self._log_fd, end)
            if frame_end is None:
                break
            if (entry := _entry(self._idx_fd, n)) != end:
                log.warning("%s/%020d.idx: the entry of offset %d was damaged (byte %d, the "
                            "record is at %d); mended", self._dir, self._base, self._base + n,
                            entry, end)
                _pwrite_all(self._idx_fd, _POS.pack(end), n * _POS.size)
            n, end = n + 1, frame_end
        if indexed != n:
            # Committed records whose frames a crash did not persist. Their index entries
            # stay, so their offsets are never handed out again (a consumer may have moved
            # past them); readers skip them as damaged once appends go on in a new segment.
            log.error("%s/%020d.log: repairing a torn tail: %d committed records lost "
                      "(offsets %d..%d, not reused); appends go on in a new segment at %d",
                      self._dir, self._base, indexed - n, self._base + n,
                      self._base + indexed - 1, self._base + indexed)
            self._count = indexed
            self._roll()
            self._catch_up()  # another appender may have rolled there first: learn its tail
            return
        if log_size != end:
            log.warning("%s/%020d.log: dropping %d bytes after the last committed record "
                        "(a write cut short before its index entry; no committed record lost)",
                        self._dir, self._base, log_size - end)
            os.ftruncate(self._log_fd, end)
        self._count, self._end = n, end

    def _open(self, base: int) -> None:
        self._close_segment()
        stem = self._dir / f"{base:020d}"
        # The log file first: readers discover segments by their index file.
        self._log_fd = os.open(f"{stem}.log", os.O_RDWR | os.O_CREAT, 0o644)
        self._idx_fd = os.open(f"{stem}.idx", os.O_RDWR | os.O_CREAT, 0o644)
        self._base, self._count, self._end = base, 0, 0

    def _close_segment(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            os.close(self._idx_fd)
            self._log_fd = self._idx_fd = -1

    def _roll(self) -> None:
        if self._fsync:
            self.sync()
        self._open(self._base + self._count)
        if self._fsync:
            _fsync_dir(self._dir)
        if self._retention_bytes is not None:
            self._apply_retention(self._retention_bytes)

    def _apply_retention(self, retention_bytes: int) -> None:
        bases = _segment_bases(self._dir)
        sizes = {}
        for base in bases:
            stem = self._dir / f"{base:020d}"
            sizes[base] = sum(os.stat(f"{stem}{ext}").st_size for ext in (".log", ".idx"))
        total = sum(sizes.values())
        for base in bases[:-1]:
            if total <= retention_bytes:
                break
            stem = self._dir / f"{base:020d}"
            Path(f"{stem}.idx").unlink(missing_ok=True)
            Path(f"{stem}.log").unlink(missing_ok=True)
            total -= sizes[base]
            log.info("%s: retention deleted segment %d (%d bytes)", self._dir, base, sizes[base])


class _Reader:
    """Reads one partition from any offset; never raises on a torn or in-progress tail."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._bases: list[int] = []
        self._base = -1
        self._log_fd = -1
        self._idx_fd = -1
        self.skipped = 0  # damaged records passed over (see read)
        # (base, offset, byte): where the record after the last one read starts, known from the
        # frames themselves, so reading on in a segment needs no index entry (see _vouched)
        self._chain = (-1, -1, 0)
        self.resets = 0  # positions past the end moved to the earliest record (see read)

    def read(self, offset: int, max_records: int,
             ) -> tuple[list[tuple[int, SegmentRecord]], int]:
        """Up to ``max_records`` (offset, record) pairs from ``offset`` on, and the next offset.

        The next offset differs from ``offset + len(records)`` only when ``offset`` lies before
        the oldest record retention kept.
        """
        for _ in range(8):  # each pass moves to a newer segment or rereads the folder
            if not self._bases or offset < self._bases[0]:
                self._bases = _segment_bases(self._dir)
                if not self._bases:
                    return [], offset
                if offset < self._bases[0]:
                    log.info("%s: offset %d is gone (retention); moving to %d", self._dir,
                             offset, self._bases[0])
                    offset = self._bases[0]
            i = bisect.bisect_right(self._bases, offset) - 1
            base = self._bases[i]
            try:
                self._open(base)
            except FileNotFoundError:  # deleted by retention since we listed
                self._bases = []
                continue
            count = os.fstat(self._idx_fd).st_size // _POS.size
            if offset - base < count:
                j = offset - base
                if self._chain[:2] == (base, offset):
                    pos = self._chain[2]
                elif j == 0:
                    pos = 0
                else:  # a seek: believe the entry only if a neighbour agrees
                    vouched = _vouched(self._log_fd, self._idx_fd, j, count) is not None
                    pos = _entry(self._idx_fd, j) if vouched else _FAR
                frames, after = _read_frames(self._log_fd, pos, min(max_records, count - j))
                if frames:
                    self._chain = (base, offset + len(frames), after)
                else:
                    sealed = i + 1 < len(self._bases) or self._rolled(base + count)
                    good = self._next_good(offset - base, count, sealed)
                    if good is None:  # a torn tail, or one being written: the next append
                        return [], offset  # repairs it; offsets after it are not yet final
                    # a damaged frame with a good committed record after it: no crash tears a
                    # frame in the middle, so the disk lost it. Skip (offsets stay as they are)
                    # rather than stall the partition for ever.
                    self.skipped += base + good - offset
                    log.error("%s/%020d.log: records %d..%d are damaged (bad length or CRC); "
                              "skipping them", self._dir, base, offset, base + good - 1)
                    offset = base + good
                    continue
                return [(offset + j, f) for j, f in enumerate(frames)], offset + len(frames)
            if i + 1 < len(self._bases):  # a sealed segment: continue in the next one
                nxt = self._bases[i + 1]
                if offset != base + count or nxt != offset:
                    log.warning("%s: offsets %d..%d are missing; moving to %d", self._dir,
                                base + count, nxt - 1, nxt)
                offset = max(offset, nxt)
                continue
            if (self._rolled(base + count)  # sealed since we listed: a roll or a repair
                    or os.fstat(self._log_fd).st_size >= self._segment_bytes):
                bases = _segment_bases(self._dir)
                if bases == self._bases:
                    return [], offset  # full, but the next append has not rolled it yet
                self._bases = bases  # (the next segment may be gone too: retention)
                continue
            if offset > base + count:
                # Offsets are never reused, so a position past the end was taken on another
                # log (one deleted and recreated, or restored from an older copy): the rule,
                # as Kafka's auto.offset.reset=earliest, is to read this log from its start.
                self._bases = _segment_bases(self._dir)
                if not self._bases:
                    return [], offset
                self.resets += 1
                log.error("%s: position %d is past the end %d (a position from another log); "
                          "reading from the earliest record %d", self._dir, offset,
                          base + count, self._bases[0])
                offset = self._bases[0]
                continue
            return [], offset  # the active segment, nothing new yet
        return [], offset

    def _rolled(self, base: int) -> bool:
        """Whether a segment starting at ``base`` exists: the one after a segment of
        ``base - <its base>`` records, created by a roll or by the repair of a torn tail."""
        return os.path.exists(self._dir / f"{base:020d}.idx")

    def _next_good(self, first: int, count: int, sealed: bool) -> int | None:
        """The segment index of the first good frame after the damaged one at ``first``, or
        None if none is (a torn tail). A sealed segment is never repaired, so there everything
        damaged is skipped: the end of its index is the answer."""
        for j in range(first + 1, count):
            if _vouched(self._log_fd, self._idx_fd, j, count) is not None:
                return j
        return count if sealed else None

    def _open(self, base: int) -> None:
        if base == self._base:
            return
        stem = self._dir / f"{base:020d}"
        idx_fd = os.open(f"{stem}.idx", os.O_RDONLY)
        try:
            log_fd = os.open(f"{stem}.log", os.O_RDONLY)
        except FileNotFoundError:
            os.close(idx_fd)
            raise
        self.close()
        self._base, self._log_fd, self._idx_fd = base, log_fd, idx_fd

    def close(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            os.close(self._idx_fd)
            self._base, self._log_fd, self._idx_fd = -1, -1, -1


class LocalLog:
    """A folder of topics; hands out producers and consumers that work across processes.

    ``partitions`` and ``segment_bytes`` apply to topics this log creates (on their first
    record); an existing topic keeps what it was created with. ``retention_bytes`` bounds each
    partition's size on disk (None: keep everything); ``fsync=False`` trades crash durability
    for speed (tests, benchmarks).
    """

    def __init__(self, root: Path, *, partitions: int = 1, fsync: bool = True,
                 segment_bytes: int = 64 << 20, retention_bytes: int | None = None) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise InvalidArgument(f"partitions must be an int >= 1, got {partitions!r}")
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise InvalidArgument(f"segment_bytes must be an int >= 1, got {segment_bytes!r}")
        if retention_bytes is not None and (not isinstance(retention_bytes, int)
                                            or retention_bytes < 1):
            raise InvalidArgument(
                f"retention_bytes must be None or an int >= 1, got {retention_bytes!r}")
        self.root = Path(root)
        self.partitions = partitions
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.retention_bytes = retention_bytes
        (self.root / "topics").mkdir(parents=True, exist_ok=True)
        (self.root / "groups").mkdir(parents=True, exist_ok=True)

    def producer(self) -> LocalProducer:
        return LocalProducer(self)

    def consumer(self, group: str, topics: Sequence[str], *,
                 shard: Shard | None = None) -> LocalConsumer:
        return LocalConsumer(self, group, topics, shard=shard)

    def topics(self) -> list[str]:
        """Names of the topics that exist (have received a record)."""
        folder = self.root / "topics"
        return sorted(n for n in os.listdir(folder) if (folder / n / "meta.json").exists())

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record will get; {} for an unknown topic.

        A record torn by a crash counts until the next append repairs the tail.
        """
        meta = self._meta(_check_name("topic", topic))
        if meta is None:
            return {}
        ends = {}
        for p in range(meta[0]):
            directory = self._partition_dir(topic, p)
            bases = _segment_bases(directory)
            if not bases:
                ends[p] = 0
                continue
            try:
                size = os.stat(directory / f"{bases[-1]:020d}.idx").st_size
            except FileNotFoundError:
                size = 0
            ends[p] = bases[-1] + size // _POS.size
        return ends

    def _partition_dir(self, topic: str, partition: int) -> Path:
        return self.root / "topics" / topic / str(partition)

    def _meta(self, topic: str) -> tuple[int, int] | None:
        """(partitions, segment_bytes) of an existing topic, None if it does not exist."""
        path = self.root / "topics" / topic / "meta.json"
        try:
            meta = json.loads(path.read_text())
            partitions, segment_bytes = int(meta["partitions"]), int(meta["segment_bytes"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BusUnavailable(f"{path}: unreadable topic metadata: {e}") from e
        return partitions, segment_bytes

    def _create_topic(self, topic: str) -> tuple[int, int]:
        """Create the topic unless another process did first; returns its metadata."""
        folder = self.root / "topics" / topic
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".meta.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({"partitions": self.partitions,
                                   "segment_bytes": self.segment_bytes}))
        try:
            os.link(tmp, folder / "meta.json")  # atomic, and fails if it exists
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        meta = self._meta(topic)
        assert meta is not None
        if meta[0] != self.partitions:
            log.warning("topic %r exists with %d partitions; configured %d is ignored", topic,
                        meta[0], self.partitions)
        return meta

    def _read_group(self, group: str) -> dict[TopicPartition, int]:
        path = self.root / "groups" / f"{group}.json"
        try:
            stored = json.loads(path.read_text())
            offsets = {}
            for name, offset in stored.items():
                topic, partition = name.rsplit(":", 1)
                offsets[(topic, int(partition))] = int(offset)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            raise BusUnavailable(f"{path}: unreadable committed offsets: {e}") from e
        return offsets

    def _commit(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        """Merge ``offsets`` into the group's file: read, update, write a temp, os.replace."""
        folder = self.root / "groups"
        path = folder / f"{group}.json"
        try:
            lock_fd = os.open(folder / f"{group}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                merged = self._read_group(group)
                merged.update(offsets)
                text = json.dumps({f"{t}:{p}": o for (t, p), o in sorted(merged.items())})
                tmp = folder / f".{group}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
                if self.fsync:
                    _fsync_dir(folder)
            finally:
                os.close(lock_fd)
        except OSError as e:
            raise BusUnavailable(f"{path}: cannot commit offsets: {e}") from e


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalProducer:
    """Appends records to a ``LocalLog``: keyed ones to ``crc32(key) % partitions``, keyless
    ones round-robin. ``send`` checks and buffers a record (as Kafka's producer does);
    ``flush`` writes each partition's buffered records in one append and fsyncs them, and
    only then are they visible to readers. A buffer past ``_MAX_BUFFERED_BYTES`` is written
    (not fsynced) by the ``send`` that fills it. Safe to share between threads.

    Per-record writes would cost six system calls a record; the server's decision-log thread
    sends hundreds of records per flush, and each system call hands the interpreter lock to
    the request path and back."""

    def __init__(self, log: LocalLog) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._buffered: dict[TopicPartition, list[bytes]] = {}
        self._buffered_bytes = 0
        self._appenders: dict[TopicPartition, _Appender] = {}
        self._partitions: dict[str, int] = {}
        self._segment_bytes: dict[str, int] = {}
        self._round_robin = itertools.count()
        self._dirty: set[TopicPartition] = set()
        self._closed = False

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        check_record(value, key)
        with self._lock:
            if self._closed:
                raise BusUnavailable("local log producer is closed")
            try:
                frame = encode_segment_record(_now_ms(), key, bytes(value))
            except InvalidArgument as e:  # too large
                raise InvalidArgument(f"record for topic {topic!r}: {e}") from None
            n = self._partitions.get(topic)
            try:
                if n is None:
                    n = self._open_topic(topic)
            except OSError as e:
                raise BusUnavailable(
                    f"local log {self._log.root}: cannot open topic {topic!r}: {e}") from e
            p = (partition_for(bytes(key), n) if key is not None
                 else next(self._round_robin) % n)
            self._buffered.setdefault((topic, p), []).append(frame)
            self._buffered_bytes += len(frame)
            if self._buffered_bytes > _MAX_BUFFERED_BYTES:
                self._write_buffered()

    def _write_buffered(self) -> None:
        """Append every partition's buffered records (lock held). On failure the buffer is
        dropped: the caller learns from the exception that these records are not delivered."""
        buffered, self._buffered, self._buffered_bytes = self._buffered, {}, 0
        for (topic, p), frames in buffered.items():
            try:
                appender = self._appenders.get((topic, p))
                if appender is None:
                    appender = self._appenders[(topic, p)] = _Appender(
                        self._log._partition_dir(topic, p), self._segment_bytes[topic],
                        self._log.retention_bytes, self._log.fsync)
                appender.append(frames)
            except OSError as e:
                raise BusUnavailable(
                    f"local log {self._log.root}: cannot append to {topic!r}: {e}") from e
            self._dirty.add((topic, p))

    def flush(self, timeout: float = 10.0) -> None:
        """Write the buffered records, then fsync every partition written since the last flush
        (no fsync with fsync=False)."""
        with self._lock:
            self._write_buffered()
            if self._log.fsync:
                try:
                    for tp in sorted(self._dirty):
                        self._appenders[tp].sync()
                except OSError as e:
                    raise BusUnavailable(f"local log {self._log.root}: fsync failed: {e}") from e
            self._dirty.clear()

    def close(self) -> None:
        """Flush and release the files; a failed flush is logged (records stay readable)."""
        try:
            self.flush()
        except BusUnavailable as e:
            log.warning("closing local log producer: %s", e)
        with self._lock:
            self._closed = True
            for appender in self._appenders.values():
                appender.close()
            self._appenders.clear()

    def _open_topic(self, topic: str) -> int:
        _check_name("topic", topic)
        meta = self._log._meta(topic) or self._log._create_topic(topic)
        self._partitions[topic], self._segment_bytes[topic] = meta
        return meta[0]


class LocalConsumer:
    """Reads its topics' partitions of a ``LocalLog``, from the group's committed offsets.

    The one member of its group: it is assigned every partition of its topics, including those
    of topics created after it started (with ``shard`` = (index, count), only partitions p
    with p % count == index). Without a committed offset it starts at the earliest record.
    ``poll`` moves the position; ``commit`` stores it only when asked.
    """

    def __init__(self, log: LocalLog, group: str, topics: Sequence[str], *,
                 shard: Shard | None = None) -> None:
        if isinstance(topics, str) or not topics:
            raise InvalidArgument(f"topics must be a non-empty list of names, got {topics!r}")
        self._shard = (0, 1) if shard is None else check_shard(shard)
        self._log = log
        self._group = _check_name("group", group)
        self._topics = [_check_name("topic", t) for t in dict.fromkeys(topics)]
        self._pending = set(self._topics)  # subscribed topics that do not exist yet
        self._readers: dict[TopicPartition, _Reader] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._order: list[TopicPartition] = []
        self._next = 0
        self._refresh()

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, the offset the next record will get."""
        return self._log.end_offsets(topic)

    @property
    def damaged_records(self) -> int:
        """Records this consumer skipped because their frame is damaged on disk (logged)."""
        return sum(reader.skipped for reader in self._readers.values())

    @property
    def position_resets(self) -> int:
        """Positions past a partition's end that this consumer moved to its earliest record
        (logged; the rule in the module docstring)."""
        return sum(reader.resets for reader in self._readers.values())

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records, in offset order per partition; waits up to
        ``timeout`` seconds for the first and returns [] if none came."""
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise InvalidArgument(f"max_records must be an int >= 1, got {max_records!r}")
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            if self._pending:
                self._refresh()
            try:
                records = self._read_round(max_records)
            except OSError as e:
                raise BusUnavailable(f"local log {self._log.root}: read failed: {e}") from e
            remaining = deadline - time.monotonic()
            if records or remaining <= 0:
                return records
            time.sleep(min(_IDLE_SLEEP_S, remaining))

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        checked = {}
        for tp, offset in offsets.items():
            topic, partition = check_topic_partition(tp)
            _check_name("topic", topic)
            checked[(topic, partition)] = check_offset("commit", tp, offset)
        self._log._commit(self._group, checked)

    def committed(self, tp: TopicPartition) -> int | None:
        return self._log._read_group(self._group).get(check_topic_partition(tp))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if self._pending:
            self._refresh()
        tp = check_topic_partition(tp)
        if tp not in self._positions:
            raise InvalidArgument(
                f"seek: {tp} is not assigned to this consumer (assigned {sorted(self._order)})")
        self._positions[tp] = check_offset("seek", tp, offset)

    def position(self, tp: TopicPartition) -> int:
        """The offset the next poll reads from in ``tp``."""
        if tp not in self._positions:
            raise InvalidArgument(f"position: {tp} is not assigned to this consumer")
        return self._positions[tp]

    def assignment(self) -> set[TopicPartition]:
        if self._pending:
            self._refresh()
        return set(self._positions)

    def unassigned_topics(self) -> set[str]:
        """Always empty: the one member of its group holds every partition of every subscribed
        topic that exists."""
        return set()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()

    def _refresh(self) -> None:
        """Assign the partitions of subscribed topics that exist now."""
        committed: dict[TopicPartition, int] | None = None
        for topic in [t for t in self._topics if t in self._pending]:
            meta = self._log._meta(topic)
            if meta is None:
                continue
            if committed is None:
                committed = self._log._read_group(self._group)
            partitions, segment_bytes = meta
            for p in range(partitions):
                if p % self._shard[1] != self._shard[0]:
                    continue
                self._readers[(topic, p)] = _Reader(self._log._partition_dir(topic, p),
                                                    segment_bytes)
                self._positions[(topic, p)] = committed.get((topic, p), 0)
            self._pending.discard(topic)
        self._order = sorted(self._positions)

    def _read_round(self, max_records: int) -> list[Record]:
        """One pass over the partitions, starting one further each time (fairness)."""
        records: list[Record] = []
        n = len(self._order)
        for i in range(n):
            if len(records) >= max_records:
                break
            tp = self._order[(self._next + i) % n]
            batch, self._positions[tp] = self._readers[tp].read(self._positions[tp],
                                                                 max_records - len(records))
            records.extend(Record(tp[0], tp[1], offset, key, value, timestamp_ms)
                           for offset, (timestamp_ms, key, value) in batch)
        self._next = (self._next + 1) % max(n, 1)
        return records
