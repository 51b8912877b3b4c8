"""Random damage to a local log's files (issue 16's property): byte flips and truncations at
random positions in segments and indexes never lose a record that lies before the first
damaged one, never hand a reader a record that was not written, never make a reader hang,
and never give an offset a reader has seen to another record. The damaged-file cases one by
one are in ``tests/test_local_log.py``; here hypothesis searches the space between them.
Damaged metadata (a topic's partition count, a group's positions) is an error naming the file."""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyloop.bus import local_log
from policyloop.bus.interface import BusUnavailable, Record
from policyloop.bus.local_log import LocalConsumer, LocalLog

POLL_LIMIT = 200  # polls to drain a log of at most 30 records: a reader looping is a hang


@dataclass(frozen=True)
class Damage:
    file: str  # "log" or "idx"
    segment: float  # which segment, as a fraction of their number
    at: float  # where in the file, as a fraction of its size
    kind: str  # "flip" or "truncate"


damages = st.lists(st.builds(Damage, st.sampled_from(["log", "idx"]), st.floats(0, 0.999),
                             st.floats(0, 0.999), st.sampled_from(["flip", "truncate"])),
                   min_size=1, max_size=3)


def _drain(consumer: LocalConsumer) -> list[Record]:
    """Everything readable now, in a thread so that a reader that never returns fails the
    test instead of hanging it."""
    records: list[Record] = []
    polls = [0]
    failed: list[BaseException] = []

    def read() -> None:
        try:
            while polls[0] < POLL_LIMIT:
                polls[0] += 1
                batch = consumer.poll(500, timeout=0.01)
                if not batch:
                    return
                records.extend(batch)
        except BaseException as exc:  # raised in the test's thread below
            failed.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if failed:
        raise failed[0]
    assert not reader.is_alive() and polls[0] < POLL_LIMIT, f"reader hung ({polls[0]} polls)"
    return records


def _first_damaged(segments: list[Path], damage: list[Damage],
                   sizes: dict[Path, int]) -> tuple[int, list[tuple[Path, int, str]]]:
    """The offset of the first record a damage touches, and the damage as (file, byte, kind)."""
    first, applied = 1 << 62, []
    for d in damage:
        segment = segments[int(d.segment * len(segments))]
        base = int(segment.stem)
        path = segment if d.file == "log" else segment.with_suffix(".idx")
        size = sizes[path]
        if size == 0:
            continue
        at = int(d.at * size)
        positions = [p for (p,) in local_log._POS.iter_unpack(
            segment.with_suffix(".idx").read_bytes())]
        if d.file == "log":
            record = sum(1 for p in positions if p <= at) - 1
        else:
            record = at // local_log._POS.size
        first = min(first, base + max(record, 0))
        applied.append((path, at, d.kind))
    return first, applied


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 60), min_size=3, max_size=30),
       segment_bytes=st.sampled_from([256, 1 << 20]), damage=damages)
def test_random_damage_keeps_what_precedes_it_and_readers_go_on(
        sizes: list[int], segment_bytes: int, damage: list[Damage]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log = LocalLog(root, fsync=False, segment_bytes=segment_bytes)
        producer = log.producer()
        written = {}
        for offset, size in enumerate(sizes):
            value = f"{offset:04d}".encode() + bytes([offset % 251]) * size
            written[offset] = value
            producer.send("t", value, key=b"k")
            producer.flush()  # one append each, so small segments roll between records
        producer.close()
        partition = root / "topics" / "t" / "0"
        segments = sorted(partition.glob("*.log"))
        file_sizes = {p: p.stat().st_size for p in partition.iterdir()}
        first, applied = _first_damaged(segments, damage, file_sizes)
        for path, at, kind in applied:
            if kind == "truncate":
                os.truncate(path, min(at, path.stat().st_size))
            elif at < path.stat().st_size:
                data = bytearray(path.read_bytes())
                data[at] ^= 0xFF
                path.write_bytes(bytes(data))

        consumer = log.consumer("g", ["t"])
        read = _drain(consumer)
        offsets = [r.offset for r in read]
        assert offsets == sorted(set(offsets)), "offsets out of order or repeated"
        assert all(written.get(r.offset) == r.value for r in read), "a record not written"
        assert set(range(min(first, len(sizes)))) <= set(offsets), (
            f"lost a record before the first damaged one ({first})")
        index_flips = all(d.file == "idx" and d.kind == "flip" for d in damage)
        if index_flips:  # the frames are whole: offsets follow from them, nothing is lost
            assert offsets == list(range(len(sizes)))

        producer = log.producer()  # repairs the newest segment's tail first
        producer.send("t", b"after", key=b"k")
        producer.close()
        (after,) = [r for r in _drain(consumer) if r.value == b"after"]
        assert after.offset not in offsets, "an offset the reader had seen was given again"
        again = _drain(log.consumer("fresh", ["t"]))
        seen = {r.offset: r.value for r in read}
        assert [r.offset for r in again] == sorted({r.offset for r in again})
        assert all(seen.get(r.offset, r.value) == r.value for r in again if r.value != b"after")
        assert again[-1].offset == after.offset
        if index_flips:
            assert [r.value for r in again] == [*written.values(), b"after"]


@pytest.mark.parametrize("name, says", [("topics/t/meta.json", "unreadable topic metadata"),
                                        ("groups/g.json", "unreadable committed offsets")])
@pytest.mark.parametrize("damage", ["byte flipped", "emptied"])
def test_damaged_metadata_is_an_error_naming_the_file(tmp_path: Path, name: str, says: str,
                                                      damage: str) -> None:
    """Metadata is not skipped like a record: guessing a partition count or a group's
    positions would misroute or re-read silently, so the bus refuses with the file's name."""
    log = LocalLog(tmp_path, fsync=False)
    producer = log.producer()
    producer.send("t", b"v", key=b"k")
    producer.close()
    log.consumer("g", ["t"]).commit({("t", 0): 1})
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    if damage == "byte flipped":
        data[1] ^= 0xFF
    path.write_bytes(bytes(data) if damage == "byte flipped" else b"")
    with pytest.raises(BusUnavailable, match=f"{path}: {says}"):
        LocalLog(tmp_path, fsync=False).consumer("g", ["t"]).poll(timeout=0.05)
