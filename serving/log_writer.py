"""The decision log's producer in a child process (``log_writer = "process"``).

The server's request path and the decision-log thread share one interpreter lock. Framing,
writing and fsyncing records (or kafka-python's own per-record work) on that thread takes the
lock from the event loop many times a batch. ``ProcessProducer`` keeps only a list append per
record and one pipe write per batch in the server; a child process runs the real producer
(``policyloop.bus.interface.open_producer``) and answers each batch once it is flushed, so
``flush`` keeps its meaning: returned means durable on the bus.

Failures look like a bus failure to the caller (``BusUnavailable``): the child reports a
producer error, or died, or did not answer within the flush timeout (then it is killed, so a
late answer cannot be taken for the next batch's). The next flush starts a new child. A batch
that failed may have been partly delivered; the decision log resends it (at least once). A
record the child's producer refuses as malformed is left out and the rest delivered; ``flush``
then raises ``RecordsRejected`` naming it, as ``send`` would have on a producer in the server,
so the decision log drops and counts it instead of retrying it for ever. The child exits when
the server's end of the pipe closes.

A batch crosses the pipe as one message of routed-record frames, the format of the decision
log's spool (``policyloop/bus/framing.py``): one codec for both, and a framing bug shows as a
refused batch, never as wrong records. The server's share per record is a length prefix, two
CRC calls and a list append (the head and topic bytes are made once per batch). Both ends are
this module, started together, so the format may change with it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from policyloop.bus.framing import (
    RoutedRecord,
    decode_routed_records,
    encode_routed_records,
)
from policyloop.bus.interface import BusUnavailable, RecordsRejected, check_record, open_producer
from policyloop.contract.errors import InvalidArgument

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")

_Item = RoutedRecord  # (topic, key, value)


def pack(batch: list[_Item]) -> bytes:
    """One batch as one pipe message."""
    return encode_routed_records(batch)


def unpack(data: bytes) -> list[_Item]:
    """The batch ``pack`` made; ValueError if ``data`` is not one."""
    batch, ends, verdict = decode_routed_records(data)
    if (ends[-1] if ends else 0) != len(data):
        raise ValueError(f"malformed log writer batch: {verdict.value} frame after "
                         f"{len(batch)} records")
    return batch


def _serve_batches(conn: Connection, kind: str, path: str, bootstrap: str, partitions: int,
                   client_id: str, flush_timeout_s: float) -> None:
    """The child: deliver each batch, answer b"ok" or b"E" + the error; stop at end of pipe."""
    producer = open_producer(kind, path=path, bootstrap=bootstrap, partitions=partitions,
                             client_id=client_id)
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            rejected = []
            try:
                for topic, key, value in unpack(data):
                    try:
                        producer.send(topic, value, key)
                    except InvalidArgument as e:
                        rejected.append(f"topic {topic!r}: {e}")
                producer.flush(flush_timeout_s)
                reply = b"ok" + json.dumps(rejected).encode()
            except Exception as e:  # reported to the server, which spools and retries
                reply = b"E" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")
            try:
                conn.send_bytes(reply)
            except (BrokenPipeError, OSError):
                return
    finally:
        producer.close()


class ProcessProducer:
    """A ``Producer`` whose records are delivered by a child process (module docstring)."""

    def __init__(self, kind: str, *, path: str | Path, bootstrap: str = "",
                 partitions: int = 4, client_id: str = "policyloop") -> None:
        if kind not in ("local", "kafka"):
            raise InvalidArgument(f"bus must be 'local' or 'kafka', got {kind!r}")
        self._args = (kind, str(path), bootstrap, partitions, client_id)
        self._lock = threading.Lock()
        self._buffer: list[_Item] = []
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False
        with self._lock:
            self._connection(10.0)  # start the child now, not on the first batch

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        check_record(value, key)
        with self._lock:
            if self._closed:
                raise BusUnavailable("the log writer is closed")
            self._buffer.append((topic, key, bytes(value)))

    def flush(self, timeout: float = 10.0) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            conn = self._connection(timeout)
            try:
                conn.send_bytes(pack(batch))
                if not conn.poll(timeout):
                    self._stop_child(kill=True)
                    raise BusUnavailable(f"the log writer process did not confirm a batch "
                                         f"within {timeout:.1f} s")
                reply = conn.recv_bytes()
            except (EOFError, OSError) as e:
                self._stop_child(kill=True)
                raise BusUnavailable(f"the log writer process is gone: {e}") from e
        if not reply.startswith(b"ok"):
            raise BusUnavailable(f"the log writer process: {reply[1:].decode('utf-8')}")
        rejected = json.loads(reply[2:])
        if rejected:
            raise RecordsRejected(rejected)

    def close(self) -> None:
        """Deliver what is buffered, then let the child finish and exit; a failed or partly
        refused last batch is logged, and the child stops either way."""
        try:
            self.flush()
        except (BusUnavailable, RecordsRejected) as e:
            log.warning("closing the log writer: %s", e)
        with self._lock:
            self._closed = True
            self._stop_child(kill=False)

    def _connection(self, timeout: float) -> Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._stop_child(kill=True)
            ours, theirs = _SPAWN.Pipe()
            process = _SPAWN.Process(target=_serve_batches, name="policyloop-log-writer",
                                     args=(theirs, *self._args, timeout), daemon=True)
            process.start()
            theirs.close()
            self._process, self._conn = process, ours
        return self._conn

    def _stop_child(self, *, kill: bool) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if kill:
                self._process.kill()
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._conn, self._process = None, None
