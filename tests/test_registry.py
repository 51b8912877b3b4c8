"""The local model registry: its layout on disk, atomic publishes under concurrency,
rollback, removal, installs, and refusal of files changed on disk (corrupt, oversized,
escaping). What it shares with the Kafka-backed registry is in test_registry_conformance.py."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import threading
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from policyloop.contract.errors import InvalidArgument, ModelRejected, NotFound
from policyloop.contract.signature import Manifest
from policyloop.registry.interface import MANIFEST_FILE, MAX_MANIFEST_BYTES
from policyloop.registry.local import CURRENT_FILE, LocalRegistry
from tests.test_registry_conformance import manifest_for as _manifest
from tests.test_registry_conformance import model_bytes as _model


def test_versions_are_laid_out_on_disk_as_documented(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    first = reg.publish("recs", _model("v1"), _manifest(), {"head.npz": b"head-1"})
    reg.publish("recs", _model("v2"), _manifest())
    assert first.path == tmp_path / "reg" / "recs" / "versions" / "00000001"
    assert (first.path / "head.npz").read_bytes() == b"head-1"
    assert (tmp_path / "reg" / "recs" / "CURRENT").read_text().strip() == "2"
    on_disk = Manifest.from_json((first.path / "manifest.json").read_text())
    assert on_disk == first.manifest


def test_not_found_names_the_registry_folder(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "nowhere")
    with pytest.raises(NotFound, match=r"'ghost'.*nowhere"):
        reg.current("ghost")
    reg.publish("recs", _model("v1"), _manifest(), make_current=False)
    with pytest.raises(NotFound, match=r"'recs'.*nowhere"):
        reg.current("recs")
    with pytest.raises(NotFound, match=r"'recs'.*version 5.*nowhere"):
        reg.get("recs", 5)


def _publish_from_process(root: str, count: int, ready: Event, go: Event,
                          out: multiprocessing.Queue) -> None:
    reg = LocalRegistry(root, keep_last=1000)
    ready.set()
    go.wait(10)
    out.put([reg.publish("recs", _model(f"proc-{i}"), _manifest()).version
             for i in range(count)])


def test_concurrent_publishers_and_readers_never_see_partial_versions(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path, keep_last=1000)
    reg.publish("recs", _model("seed"), _manifest())
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_publish_from_process, args=(str(tmp_path), 6, ready, go, out))
    proc.start()
    assert ready.wait(10)

    published: list[int] = []
    errors: list[BaseException] = []
    reads = [0]
    done = threading.Event()
    lock = threading.Lock()

    def publisher(name: str) -> None:
        try:
            for i in range(6):
                v = reg.publish("recs", _model(f"{name}-{i}", size=65536), _manifest()).version
                with lock:
                    published.append(v)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        last = 0
        try:
            while not done.is_set():
                mv = reg.current("recs")
                mv.read_model()  # checks the sha256
                assert mv.version >= last, "CURRENT went backwards"
                last = mv.version
                # The newest folder may not be current yet: it must be complete all the same.
                reg.get("recs", reg.versions("recs")[-1]).read_model()
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=publisher, args=(f"thread{t}",)) for t in range(3)]
    for t in readers + writers:
        t.start()
    go.set()
    for t in writers:
        t.join(20)
    published.extend(out.get(timeout=20))
    proc.join(20)
    done.set()
    for t in readers:
        t.join(5)

    assert proc.exitcode == 0
    assert errors == []
    assert reads[0] > 0
    assert sorted(published) == list(range(2, 26))
    assert reg.versions("recs") == list(range(1, 26))
    assert reg.current("recs").version == 25
    tags = {reg.get("recs", v).read_model() for v in range(1, 26)}
    expected = {_model("seed")} | {_model(f"proc-{i}") for i in range(6)} | {
        _model(f"thread{t}-{i}", size=65536) for t in range(3) for i in range(6)}
    assert tags == expected
    assert all(reg.get("recs", v).manifest.parent_version == v - 1 for v in range(2, 26))
    assert not [p for p in (tmp_path / "recs").iterdir() if p.name.startswith(".tmp-")]


def test_rollback_to_a_named_version_and_to_the_previous_one(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path)
    for i in range(4):
        reg.publish("recs", _model(f"v{i}"), _manifest())
    assert reg.rollback("recs", 2).version == 2
    assert reg.current("recs").read_model() == _model("v1")
    assert reg.rollback("recs").version == 1
    with pytest.raises(NotFound, match="no version before 1"):
        reg.rollback("recs")
    with pytest.raises(NotFound, match="version 9"):
        reg.set_current("recs", 9)
    assert reg.current("recs").version == 1
    assert reg.publish("recs", _model("v4"), _manifest()).manifest.parent_version == 1


def test_remove_deletes_one_version_but_never_the_current_one(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path)
    for i in range(3):
        reg.publish("recs", _model(f"v{i}"), _manifest())
    reg.remove("recs", 1)
    reg.remove("recs", 1)  # already gone: nothing to do
    assert reg.versions("recs") == [2, 3]
    with pytest.raises(InvalidArgument, match="recs v3 is the current version"):
        reg.remove("recs", 3)
    assert reg.versions("recs") == [2, 3]
    assert not [p for p in (tmp_path / "recs").iterdir() if p.name.startswith(".trash-")]
    assert reg.retained([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], current=1) == {1, *range(3, 13)}


def test_crashed_publisher_leftovers_are_ignored_then_cleaned(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path)
    reg.publish("recs", _model("v1"), _manifest())
    leftover = tmp_path / "recs" / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    assert reg.versions("recs") == [1]
    assert reg.current("recs").version == 1
    reg.publish("recs", _model("v2"), _manifest())
    assert not leftover.exists()


def test_symlinks_out_of_the_registry_are_rejected(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    mv = reg.publish("recs", _model("v1"), _manifest(), {"head.npz": b"head"})
    outside = tmp_path / "evil.onnx"
    outside.write_bytes(_model("v1"))  # same bytes: the checksum alone would pass
    mv.model_path.unlink()
    os.symlink(outside, mv.model_path)
    with pytest.raises(ModelRejected, match="outside the registry"):
        mv.read_model()
    (mv.path / "head.npz").unlink()
    os.symlink(outside, mv.path / "head.npz")
    with pytest.raises(ModelRejected, match="outside the registry"):
        mv.read_file("head.npz")


def test_files_over_the_size_limit_are_refused_on_load_and_install(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg", max_model_bytes=100)
    mv = reg.publish("recs", b"m" * 100, _manifest(), {"head.npz": b"h" * 100})
    assert mv.read_model() == b"m" * 100
    mv.model_path.write_bytes(b"m" * 101)  # grown by hand: refused before it is read
    with pytest.raises(ModelRejected, match="101 bytes, over max_model_bytes 100") as err:
        reg.get("recs", 1).read_model()
    assert err.value.reason == "oversized"
    (mv.path / "head.npz").write_bytes(b"h" * 101)
    with pytest.raises(ModelRejected, match="head.npz.*101 bytes"):
        mv.read_file("head.npz")
    other = LocalRegistry(tmp_path / "other", max_model_bytes=100)
    stored = dataclasses.replace(mv.manifest, sha256=hashlib.sha256(b"m" * 101).hexdigest())
    with pytest.raises(ModelRejected, match="cannot install recs v1"):
        other.install(b"m" * 101, stored)


def test_a_registry_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path)
    mv = reg.publish("recs", _model("v1"), _manifest())
    mv.model_path.unlink()
    os.mkfifo(mv.model_path)  # opening it would block the loader
    with pytest.raises(ModelRejected, match="not a regular file"):
        mv.read_model()
    for name in (MANIFEST_FILE, CURRENT_FILE):  # the small files too: never read unbounded
        path = mv.path / name if name == MANIFEST_FILE else tmp_path / "recs" / name
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(ModelRejected, match="not a regular file"):
            reg.current("recs")
        path.unlink()
    (mv.path / MANIFEST_FILE).write_text("{" + " " * MAX_MANIFEST_BYTES + "}")
    with pytest.raises(ModelRejected, match="over max_model_bytes"):
        reg.get("recs", 1)


def test_symlink_inside_the_registry_is_allowed(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path)
    mv = reg.publish("recs", _model("v1"), _manifest())
    copy = tmp_path / "recs" / "shared.onnx"
    copy.write_bytes(_model("v1"))
    mv.model_path.unlink()
    os.symlink(copy, mv.model_path)
    assert mv.read_model() == _model("v1")


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"max_model_bytes": 0}])
def test_bad_registry_limits_are_invalid(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(kwargs))):
        LocalRegistry(tmp_path, **kwargs)


@pytest.mark.parametrize(("model", "files", "match"), [
    (b"", {}, "is empty"),
    (b"m", {"model.onnx": b"x"}, "reserved"),
    (b"m", {"manifest.json": b"{}"}, "reserved"),
    (b"m", {"../x": b"x"}, "file name"),
])
def test_install_refuses_what_a_publish_would(tmp_path: Path, model: bytes,
                                              files: dict[str, bytes], match: str) -> None:
    """A Kafka replica installs what it reads from the topic: a record no publish could have
    written is refused with InvalidArgument (which the replica logs and skips)."""
    stored = dataclasses.replace(_manifest(), version=1,
                                 sha256=hashlib.sha256(model).hexdigest())
    reg = LocalRegistry(tmp_path)
    with pytest.raises(InvalidArgument, match=match):
        reg.install(model, stored, files)
    assert reg.policies() == [] or reg.versions("recs") == []
