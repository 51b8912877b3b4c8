"""The request path's way onto the bus: never blocks a decision, never drops a record silently.

``DecisionLog.submit`` appends to an in-memory queue and returns; a background thread sends the
queue to the bus in batches (``send`` each record, then ``flush``). When the bus fails, the
records go to a spool on local disk and the thread re-delivers them, oldest first, until the bus
takes them again. Records leave in the order they were submitted, so per key too:

* normal: submit -> queue -> bus; the spool is empty.
* spooling (the bus failed, or the queue was full): the queue moves into the spool, and every
  new record is appended to the spool behind it (a ``write`` per record, no fsync, on the
  caller's thread), until the thread has delivered the whole spool; then back to normal.

The spool is a folder of segment files of routed-record frames (``policyloop/bus/framing.py``:
``u32 body length | u32 CRC32 | u16 topic length | i32 key length (-1: none) | topic | key |
value``, the bytes spools had before that module, so an older server's spool is recovered) and
a ``cursor`` file holding the first undelivered position; fully delivered segments are deleted.
The thread fsyncs new spool writes in batches, about every 50 ms (``_SYNC_INTERVAL_S``). The
spool survives a crash or restart: a new ``DecisionLog`` on the same folder repairs a torn tail,
delivers the leftovers first, and only then anything newer. Records are dropped only when
the spool's disk budget is exhausted (or the producer rejects one as malformed); drops are
counted and logged at ERROR.

Delivery is at least once: a record the producer accepted before a failed ``flush`` is spooled
and sent again.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from policyloop.bus.framing import (
    RoutedRecord,
    Verdict,
    decode_routed_records,
    encode_routed_record,
)
from policyloop.bus.interface import Producer, RecordsRejected
from policyloop.contract.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

NAMESPACE = "policyloop"
_SYNC_INTERVAL_S = 0.05
_DROP_LOG_INTERVAL_S = 10.0
_MIN_BACKOFF_S = 0.05

_Item = RoutedRecord  # (topic, key, value)
_RECOVER_RECORDS = 10_000  # records decoded at a time while checking a segment
_CURSOR_BYTES = 64  # the cursor file's fixed size: its JSON, padded with spaces


def _event_fields(key: bytes | None) -> dict[str, str]:
    """Log ``extra=`` naming the event a record belongs to (its key is the event id)."""
    return {} if key is None else {"event_id": key.decode("utf-8", "replace")}


class _Spool:
    """Append-only segment files of framed records plus a cursor (segment, byte position).

    Not thread-safe: the owner serializes calls, except that ``read`` may run concurrently
    with ``append`` given a ``snapshot`` taken under the owner's lock.
    """

    def __init__(self, folder: Path, segment_bytes: int) -> None:
        self._dir = folder
        self._segment_bytes = segment_bytes
        self._sizes: dict[int, int] = {}  # segment id -> bytes
        self.bytes_on_disk = 0  # sum of _sizes, kept as an int so metrics can read it any time
        self._cursor = (0, 0)
        self._cursor_fd = -1  # the cursor file, rewritten in place (see _store_cursor)
        self._cursor_failing = False
        self._fd = -1  # open for appends: the newest segment
        self._dirty = False
        self._unsynced: list[int] = []  # dup'ed fds of rolled segments awaiting fsync
        self._recover()

    def pending(self) -> bool:
        """Whether any record is not delivered yet."""
        segment, pos = self._cursor
        return any(size > (pos if seg == segment else 0)
                   for seg, size in self._sizes.items() if seg >= segment)

    def append(self, frames: list[bytes]) -> None:
        if self._fd < 0 or self._sizes[max(self._sizes)] >= self._segment_bytes:
            self._roll()
        data = b"".join(frames)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:  # a full disk: cut what part of a frame got written, so records
            os.ftruncate(self._fd, self._sizes[max(self._sizes)])  # appended later stay
            raise  # readable after it
        self._sizes[max(self._sizes)] += len(data)
        self.bytes_on_disk += len(data)
        self._dirty = True

    def snapshot(self) -> dict[int, int]:
        return dict(self._sizes)

    def read(self, snapshot: dict[int, int], max_records: int, max_bytes: int,
             ) -> list[tuple[_Item, tuple[int, int]]]:
        """Records from the cursor on (each with the cursor just after it), within
        ``snapshot``'s sizes."""
        out: list[tuple[_Item, tuple[int, int]]] = []
        segment, pos = self._cursor
        for seg in sorted(s for s in snapshot if s >= segment):
            start = pos if seg == segment else 0
            size = snapshot[seg]
            if start >= size:
                continue
            with open(self._path(seg), "rb") as f:
                f.seek(start)
                buf = f.read(max(min(size - start, max_bytes), 0))
                items, ends, verdict = decode_routed_records(buf, 0, max_records - len(out))
                if not items and verdict is Verdict.INCOMPLETE and len(buf) < size - start:
                    f.seek(start)  # one frame larger than max_bytes
                    buf = f.read(size - start)
                    items, ends, _ = decode_routed_records(buf, 0, max_records - len(out))
            out += [(item, (seg, start + end)) for item, end in zip(items, ends, strict=True)]
            at = ends[-1] if ends else 0
            if len(out) >= max_records or at < len(buf) or len(buf) < size - start:
                break
            max_bytes -= len(buf)
            if max_bytes <= 0:
                break
        return out

    def advance(self, cursor: tuple[int, int]) -> None:
        """Mark everything before ``cursor`` delivered; delete segments wholly before it."""
        self._cursor = cursor
        for seg in [s for s in self._sizes if s < cursor[0]]:
            self._path(seg).unlink(missing_ok=True)
            self.bytes_on_disk -= self._sizes.pop(seg)
        self._store_cursor()

    def _store_cursor(self) -> None:
        """Write the cursor in place in a file of fixed size: overwriting bytes a file already
        has needs no free block (on filesystems that overwrite in place), so a full disk does
        not stop delivery, as a new temporary file would. A failure is logged, not raised:
        records go on being delivered, and a restart would deliver again at most what was
        delivered since (a torn write reads as unreadable: the same, from the start)."""
        text = json.dumps({"segment": self._cursor[0], "position": self._cursor[1]}).encode()
        try:
            if self._cursor_fd < 0:
                self._cursor_fd = os.open(self._dir / "cursor", os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._cursor_fd, text.ljust(_CURSOR_BYTES), 0)
        except OSError as e:
            if not self._cursor_failing:
                log.error("spool %s: cannot record the delivery cursor (%s); a restart would "
                          "deliver again what was delivered since", self._dir, e)
            self._cursor_failing = True
            return
        if self._cursor_failing:
            log.warning("spool %s: the delivery cursor is recorded again", self._dir)
        self._cursor_failing = False

    def skip(self, n: int) -> None:
        """Mark the next ``n`` records delivered (they were delivered from memory)."""
        while n > 0:
            records = self.read(self.snapshot(), n, 4 << 20)
            if not records:
                return
            self.advance(records[-1][1])
            n -= len(records)

    def clear(self) -> None:
        """Delete everything: every record was delivered."""
        self._close_fd()
        for seg in list(self._sizes):
            self._path(seg).unlink(missing_ok=True)
        next_id = max(self._sizes, default=-1) + 1
        self._sizes.clear()
        self.bytes_on_disk = 0
        self._cursor = (next_id, 0)
        self._store_cursor()

    def take_sync(self) -> list[int]:
        """Dup'ed fds to fsync outside the owner's lock (the caller closes them)."""
        fds, self._unsynced = self._unsynced, []
        if self._dirty and self._fd >= 0:
            fds.append(os.dup(self._fd))
        self._dirty = False
        return fds

    def close(self) -> None:
        for fd in self.take_sync():
            os.fsync(fd)
            os.close(fd)
        self._close_fd()
        if self._cursor_fd >= 0:
            os.close(self._cursor_fd)
            self._cursor_fd = -1

    def _path(self, seg: int) -> Path:
        return self._dir / f"spool-{seg:012d}.log"

    def _close_fd(self) -> None:
        if self._fd >= 0:
            if self._dirty:
                self._unsynced.append(os.dup(self._fd))
                self._dirty = False
            os.close(self._fd)
            self._fd = -1

    def _roll(self) -> None:
        self._close_fd()
        seg = max(self._sizes, default=self._cursor[0] - 1) + 1
        self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes[seg] = os.fstat(self._fd).st_size
        self.bytes_on_disk += self._sizes[seg]
        if not self.pending():  # nothing undelivered before it
            self._cursor = (seg, self._sizes[seg])

    def _recover(self) -> None:
        """Load the segments and cursor; cut torn or corrupt tails (a crash mid-write)."""
        segments = sorted(int(p.name[6:-4]) for p in self._dir.glob("spool-*.log")
                          if p.name[6:-4].isdigit())
        try:
            stored = json.loads((self._dir / "cursor").read_text())
            cursor = (int(stored["segment"]), int(stored["position"]))
        except FileNotFoundError:
            cursor = (segments[0], 0) if segments else (0, 0)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("spool %s: unreadable cursor (%s); re-delivering from the start", self._dir,
                      e)
            cursor = (segments[0], 0) if segments else (0, 0)
        for seg in segments:
            data = self._path(seg).read_bytes()
            at, verdict = 0, Verdict.OK
            while verdict is Verdict.OK:  # a slice at a time: the records are not kept
                _, ends, verdict = decode_routed_records(data, at, _RECOVER_RECORDS)
                at = ends[-1] if ends else at
            if at < len(data):
                log.error("spool %s: cutting %d bytes of %s data from %s", self._dir,
                          len(data) - at, "torn" if verdict is Verdict.INCOMPLETE else "corrupt",
                          self._path(seg).name)
                os.truncate(self._path(seg), at)
            self._sizes[seg] = at
            self.bytes_on_disk += at
        if segments and cursor[0] < segments[0]:
            cursor = (segments[0], 0)
        if cursor[0] in self._sizes:
            cursor = (cursor[0], min(cursor[1], self._sizes[cursor[0]]))
        self._cursor = cursor
        if not self.pending():
            self.clear()
        else:
            self._store_cursor()  # at full size now, while the disk likely has room


class DecisionLog:
    """Asynchronous, spooling writer of decisions, rewards and activations to the bus.

    ``submit`` is cheap and called from the event loop; ``close`` flushes on shutdown and then
    closes ``producer``, which the log owns from construction on. The spool folder is locked
    (flock) while a ``DecisionLog`` uses it, so two processes cannot share one.
    ``registry=None`` keeps the metrics in a private registry. ``max_batch`` records go per
    ``send``/``flush`` round, after waiting up to ``linger_s`` for a batch to fill; retries back
    off from 50 ms doubling up to ``max_backoff_s``.
    """

    def __init__(self, producer: Producer, *, spool_dir: Path, max_queue: int = 10000,
                 spool_budget_bytes: int = 1 << 30,
                 registry: CollectorRegistry | None = None, max_batch: int = 500,
                 max_backoff_s: float = 2.0, flush_timeout_s: float = 10.0,
                 linger_s: float = 0.005) -> None:
        for name, value in (("max_queue", max_queue), ("spool_budget_bytes", spool_budget_bytes),
                            ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be an int >= 1, got {value!r}")
        if not max_backoff_s > 0:
            raise InvalidArgument(f"max_backoff_s must be > 0, got {max_backoff_s!r}")
        self._producer = producer
        self._max_queue = max_queue
        self._budget = spool_budget_bytes
        self._max_batch = max_batch
        self._max_backoff_s = max_backoff_s
        self._flush_timeout_s = flush_timeout_s
        self._linger_s = linger_s
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.spool_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Unavailable(
                f"spool_dir {self.spool_dir} is in use by another DecisionLog") from None
        segment_bytes = min(64 << 20, max(64 << 10, spool_budget_bytes // 16))
        self._spool = _Spool(self.spool_dir, segment_bytes)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        self._spooling = self._spool.pending()  # leftovers of an earlier run go first
        self._epoch = 0  # +1 each time the queue moves into the spool
        self._inflight = 0  # records at the queue's head the thread is sending
        self._inflight_spooled = 0  # of those, how many a queue move wrote to the spool
        self._closing = False
        self._close_requested = threading.Event()
        self._close_cut = False  # whether close() already cut a backoff pause short
        self._close_result: bool | None = None
        self._stopped = False
        self._deadline = float("inf")
        self._dropped = 0
        self._drops_unlogged = 0
        self._last_drop_log = -float("inf")
        self._last_sync = 0.0
        self._bus_failing = False  # the thread's view, for logging transitions only
        # Durable acknowledgement: records leave the queue in order (delivered, spooled or
        # dropped), so everything up to ``submitted - len(queue)`` is out of memory.
        self._submitted = 0
        self._waiters: list[tuple[int, int, int, concurrent.futures.Future[None]]] = []
        # (first, last, why) of records dropped from the spool path, by submission number,
        # newest last: a durable wait that covers one fails rather than acknowledge a loss
        self._lost: deque[tuple[int, int, str]] = deque(maxlen=4096)
        if self._spooling:
            log.info("spool %s holds %d bytes from an earlier run; delivering them first",
                     self.spool_dir, self._spool.bytes_on_disk)

        registry = registry if registry is not None else CollectorRegistry()
        self._queue_depth = Gauge(
            "decision_log_queue_depth", "Records waiting in memory for the bus.",
            namespace=NAMESPACE, registry=registry)
        self._queue_depth.set_function(lambda: len(self._queue))
        self._spool_bytes = Gauge(
            "decision_log_spool_bytes", "Bytes of the on-disk spool (records the bus has not "
            "taken yet, plus delivered ones in partly delivered segments).",
            namespace=NAMESPACE, registry=registry)
        self._spool_bytes.set_function(lambda: self._spool.bytes_on_disk)
        records = Counter(
            "decision_log_records", "Records by outcome: delivered (the bus confirmed them), "
            "spooled (written to the disk spool; delivered later), dropped (spool budget "
            "exhausted or rejected by the producer).",
            ["outcome"], namespace=NAMESPACE, registry=registry)
        self._delivered = records.labels("delivered")
        self._spooled = records.labels("spooled")
        self._dropped_total = records.labels("dropped")

        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def submit(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Hand one record to the bus; returns at once. Raises Unavailable after ``close``."""
        if not isinstance(topic, str) or not topic:
            raise InvalidArgument(f"topic must be a non-empty str, got {topic!r}")
        if not isinstance(value, bytes):
            raise InvalidArgument(f"value must be bytes, got {type(value).__name__}")
        if key is not None and not isinstance(key, bytes):
            raise InvalidArgument(f"key must be bytes or None, got {type(key).__name__}")
        if len(topic) > 255:
            raise InvalidArgument(f"topic must be at most 255 characters, got {topic[:40]!r}...")
        item = (topic, key, value)
        with self._lock:
            if self._stopped:
                raise Unavailable("the decision log is closed")
            self._submitted += 1
            if not self._spooling:
                if len(self._queue) < self._max_queue:
                    self._queue.append(item)
                    if len(self._queue) == 1:  # the thread waits only on an empty queue
                        self._wake.notify()
                    return
                self._start_spooling(submitting=1)
            self._spool_items([item], first=self._submitted)

    @property
    def submitted(self) -> int:
        """How many records were submitted so far: pass it to ``durable`` as ``after``."""
        with self._lock:
            return self._submitted

    def durable(self, after: int) -> concurrent.futures.Future[None] | None:
        """A future that resolves once every record submitted so far has left this process's
        memory: confirmed by the bus, or written to the spool file (which a killed process
        leaves behind for the next one). None when that is already so.

        A server in durable-ack mode answers only then, so a client that got an answer knows
        the decision survives a SIGKILL of the server. A record numbered above ``after`` (the
        caller's, from ``submitted`` before it submitted) that was dropped instead (the bus
        down and the spool full or unwritable) fails the future with Unavailable, so that call
        is not acknowledged; records of concurrent callers in that range may fail it too,
        never the other way round.
        """
        with self._lock:
            target = self._submitted
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            if self._submitted - len(self._queue) >= target:
                self._settle(future, after, target)
                return future if future.exception() is not None else None
            heapq.heappush(self._waiters, (target, after, id(future), future))
            return future

    def _settle(self, future: concurrent.futures.Future[None], after: int, target: int) -> None:
        for first, last, why in reversed(self._lost):  # numbers only grow: newest first
            if last <= after:
                break
            if first <= target:
                future.set_exception(Unavailable(
                    f"the decision log could not keep this call's record ({why}): it is not "
                    "durable; retry the call"))
                return
        future.set_result(None)

    def _release(self) -> None:
        """Resolve the ``durable`` futures the queue's progress has satisfied."""
        done = self._submitted - len(self._queue)
        while self._waiters and self._waiters[0][0] <= done:
            target, after, _, future = heapq.heappop(self._waiters)
            self._settle(future, after, target)

    def close(self, timeout: float) -> bool:
        """Deliver what is queued and spooled within ``timeout`` seconds, then stop.

        Returns True when every record submitted was delivered (none dropped, none left);
        what is left stays in the spool for the next ``DecisionLog`` on the same folder.
        """
        with self._lock:
            if self._close_result is not None:
                return self._close_result
            self._closing = True
            self._deadline = time.monotonic() + max(timeout, 0.0)
            self._wake.notify()
        self._close_requested.set()
        self._thread.join(max(timeout, 0.0) + 0.05)
        with self._lock:
            self._stopped = True
            if self._queue:
                self._start_spooling()
            self._spooling = True
            self._release()
            done = not self._spool.pending() and self._dropped == 0
            self._close_result = done
            try:
                if not self._spool.pending():
                    self._spool.clear()
                self._spool.close()
            except OSError as e:
                log.error("spool %s: final fsync failed: %s", self.spool_dir, e)
        if self._thread.is_alive():
            log.warning("decision log: the bus did not answer within %.1fs; left the rest in "
                        "spool %s", timeout, self.spool_dir)
        else:
            try:
                self._producer.close()
            except Exception:
                log.exception("decision log: closing the producer failed")
        os.close(self._lock_fd)
        return done

    # Everything below runs under self._lock unless it says otherwise.

    def _start_spooling(self, submitting: int = 0) -> None:
        """Move the queue into the spool (normal -> spooling); its head may be in flight.
        ``submitting``: records already counted in ``_submitted`` but not queued."""
        written = self._spool_items(list(self._queue),
                                    first=self._submitted - submitting - len(self._queue) + 1)
        self._queue.clear()
        self._inflight_spooled = min(self._inflight, written)
        self._epoch += 1
        self._spooling = True
        self._release()

    def _spool_items(self, items: list[_Item], first: int) -> int:
        """Append to the spool within the budget; returns how many were written (a prefix).
        ``first`` is the submission number of ``items[0]``."""
        frames = [encode_routed_record(*item) for item in items]
        room = self._budget - self._spool.bytes_on_disk
        n = 0
        for frame in frames:
            if len(frame) > room:
                break
            room -= len(frame)
            n += 1
        why = f"spool budget of {self._budget} bytes exhausted"
        try:
            if n:
                self._spool.append(frames[:n])
        except OSError as e:
            why = f"cannot write spool {self.spool_dir}: {e}"
            n = 0
        self._spooled.inc(n)
        if n < len(items):
            self._lost.append((first + n, first + len(items) - 1, why))
            self._drop(len(items) - n, why, items[-1][1])
        return n

    def _drop(self, n: int, why: str, key: bytes | None = None) -> None:
        """Count ``n`` dropped records; ``key`` (an event id) of the last one goes in the log."""
        self._dropped += n
        self._dropped_total.inc(n)
        self._drops_unlogged += n
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            log.error("decision log DROPPED %d records (%d in total): %s", self._drops_unlogged,
                      self._dropped, why, extra=_event_fields(key))
            self._drops_unlogged = 0
            self._last_drop_log = now

    def _run(self) -> None:
        """The background thread: deliver the queue or the spool, back off on failure."""
        backoff = _MIN_BACKOFF_S
        while True:
            try:
                ok = self._step()
            except Exception:  # a bug must not silently stop delivery
                log.exception("decision log: delivery failed unexpectedly")
                ok = False
            if ok is None:
                return
            if ok:
                backoff = _MIN_BACKOFF_S
                continue
            with self._lock:
                wait = min(backoff, self._deadline - time.monotonic())
            self._pause(wait)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _step(self) -> bool | None:
        """One delivery attempt: True if it worked, False to back off, None to stop."""
        with self._lock:
            while not (self._queue or self._spooling or self._closing):
                self._wake.wait(_SYNC_INTERVAL_S)
                self._sync()
            self._linger()
            if self._stopped:
                return None
            if self._closing and (time.monotonic() >= self._deadline or not (
                    self._queue or self._spool.pending())):
                return None
            spooling = self._spooling
            batch = list(itertools.islice(self._queue, self._max_batch))
            epoch = self._epoch
            self._inflight, self._inflight_spooled = len(batch), 0
            snapshot = self._spool.snapshot()
        ok = self._deliver_spool(snapshot) if spooling else self._deliver_queue(batch, epoch)
        with self._lock:
            self._sync()
        return ok

    def _linger(self) -> None:
        """Under load, wait up to ``linger_s`` for a fuller batch (as Kafka's linger.ms does):
        one send-and-flush round (an fsync on the local log) per batch, not per record."""
        end = time.monotonic() + self._linger_s
        while (self._queue and not self._spooling and not self._closing
               and len(self._queue) < self._max_batch
               and (left := end - time.monotonic()) > 0):
            self._wake.wait(left)

    def _pause(self, seconds: float) -> None:
        """Back off (not under the lock), fsyncing the spool meanwhile; the first pause after
        close() is cut short so the last attempts happen within its grace period."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            step = min(remaining, 2 * _SYNC_INTERVAL_S)
            if self._close_cut:
                time.sleep(step)
            elif self._close_requested.wait(step):
                self._close_cut = True
                return
            with self._lock:
                self._sync()

    def _deliver_queue(self, batch: list[_Item], epoch: int) -> bool:
        settled, failed = self._send(batch)  # outside the lock
        with self._lock:
            self._inflight = 0
            if self._stopped:
                return False
            if epoch == self._epoch:
                for _ in range(settled):
                    self._queue.popleft()
                if failed:
                    self._start_spooling()
                self._release()
            else:  # submit moved the batch into the spool meanwhile
                self._spool.skip(min(settled, self._inflight_spooled))
        return not failed

    def _deliver_spool(self, snapshot: dict[int, int]) -> bool:
        records = self._spool.read(snapshot, self._max_batch, 4 << 20)  # outside the lock
        if not records:
            with self._lock:
                if self._stopped:
                    return False
                if self._spool.pending():  # appended since the snapshot, or unreadable data
                    return self._spool.snapshot() != snapshot
                self._spool.clear()
                self._spooling = False
            return True
        settled, failed = self._send([item for item, _ in records])
        with self._lock:
            if settled and not self._stopped:
                self._spool.advance(records[settled - 1][1])
        return not failed

    def _send(self, batch: list[_Item]) -> tuple[int, bool]:
        """Send and flush ``batch`` (not under the lock); returns (how many of its first records
        are settled: delivered or dropped as malformed, whether the bus failed)."""
        settled = 0
        dropped = 0
        try:
            for topic, key, value in batch:
                try:
                    self._producer.send(topic, value, key)
                except InvalidArgument as e:
                    dropped += 1
                    with self._lock:
                        self._drop(1, f"the producer rejected a record for {topic!r}: {e}",
                                   key)
                settled += 1
            try:
                self._producer.flush(self._flush_timeout_s)
            except RecordsRejected as e:  # the rest is delivered
                dropped += len(e.reasons)
                with self._lock:
                    for reason in e.reasons:
                        self._drop(1, f"the producer rejected a record: {reason}", None)
        except Exception as e:
            if not self._bus_failing:
                log.warning("decision log: the bus failed (%s); spooling to %s and retrying",
                            e, self.spool_dir, extra=_event_fields(batch[0][1] if batch else None))
                self._bus_failing = True
            else:
                log.debug("decision log: the bus still fails: %s", e)
            if settled == len(batch):  # the flush failed: nothing is known delivered
                return 0, True
            try:  # a send failed: the records before it may still be confirmed
                self._producer.flush(self._flush_timeout_s)
            except Exception:
                return 0, True
            self._delivered.inc(settled - dropped)
            return settled, True
        self._delivered.inc(settled - dropped)
        if self._bus_failing:
            log.warning("decision log: the bus is back; delivering the spool")
            self._bus_failing = False
        return settled, False

    def _sync(self) -> None:
        """fsync the spool's new writes, at most every _SYNC_INTERVAL_S (lock held on entry;
        the fsync itself runs without it)."""
        now = time.monotonic()
        if now - self._last_sync < _SYNC_INTERVAL_S:
            return
        self._last_sync = now
        fds = self._spool.take_sync()
        if not fds:
            return
        self._lock.release()
        try:
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as e:
                    log.error("spool %s: fsync failed: %s", self.spool_dir, e)
                finally:
                    os.close(fd)
        finally:
            self._lock.acquire()
