"""One contract, two registries: every case here runs on a registry folder (``LocalRegistry``)
and on the Kafka-backed registry over a real broker (``KafkaRegistry``), whose publishes go
through the same checks (``policyloop/registry/interface.py``). What only one of them does
(concurrent publishers on one folder, files changed on disk, rollback, install; tombstones on
the topic, serving replicas converging) is tested in test_registry.py and
test_kafka_registry.py.

A case opens clients of one store: ``store.open()`` again is another process's view of the
same registry (the same folder, or the same topic through a cache folder of its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from policyloop.bus.topics import TopicSpec, create_topics
from policyloop.contract.errors import InvalidArgument, ModelRejected, NotFound, ResourceExhausted
from policyloop.contract.signature import FeatureSchema, HeadSpec, Manifest, TensorSpec
from policyloop.registry.interface import (
    DEFAULT_MAX_MODEL_BYTES,
    MAX_MANIFEST_BYTES,
    Registry,
    open_registry,
)
from policyloop.registry.kafka import KafkaRegistry
from policyloop.registry.local import LocalRegistry


def manifest_for(policy: str = "recs") -> Manifest:
    return Manifest(
        policy=policy, kind="qnet",
        features=FeatureSchema(context=("age", "hour")),
        inputs=(TensorSpec("context", "float32", (-1, 2)),),
        outputs=(TensorSpec("scores", "float32", (-1, 3)),
                 TensorSpec("embedding", "float32", (-1, 4))),
        head=HeadSpec(weight="head.weight", bias="head.bias", dim=4),
        opset=17, actions=("a", "b", "c"))


def model_bytes(tag: str, size: int = 4096) -> bytes:
    """Distinct bytes per tag, long enough that a torn write would be visible."""
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class Store:
    """One registry store under test; the clients it opened are closed after the case."""

    kind: str
    tmp: Path
    bootstrap: str = ""
    topic: str = ""
    opened: list[Registry] = field(default_factory=list)
    _caches: Iterator[int] = field(default_factory=itertools.count)

    def open(self, *, keep_last: int = 10,
             max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> Registry:
        registry: Registry
        if self.kind == "local":
            registry = LocalRegistry(self.tmp / "registry", keep_last=keep_last,
                                     max_model_bytes=max_model_bytes)
        else:
            registry = KafkaRegistry(self.bootstrap, self.tmp / f"cache-{next(self._caches)}",
                                     topic=self.topic, keep_last=keep_last,
                                     max_model_bytes=max_model_bytes)
        self.opened.append(registry)
        return registry


@pytest.fixture(params=["local", pytest.param("kafka", marks=pytest.mark.kafka)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        backend = Store("local", tmp_path)
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        topic = request.getfixturevalue("unique_topic")("models")
        create_topics(bootstrap, [TopicSpec(topic, 1, -1, compact=True)])
        backend = Store("kafka", tmp_path, bootstrap, topic)
    yield backend
    for registry in reversed(backend.opened):
        registry.close()


# ---- publishing and reading


def test_publish_numbers_versions_and_fills_in_the_manifest(store: Store) -> None:
    reg = store.open()
    first = reg.publish("recs", model_bytes("v1"), manifest_for(), {"head.npz": b"head-1"})
    second = reg.publish("recs", model_bytes("v2"), manifest_for())

    assert (first.version, second.version) == (1, 2)
    assert reg.versions("recs") == [1, 2]
    assert reg.policies() == ["recs"]
    assert reg.current("recs") == second
    assert reg.get("recs", 1) == first
    assert (first.manifest.version, first.manifest.parent_version) == (1, None)
    assert second.manifest.parent_version == 1
    assert first.manifest.sha256 == hashlib.sha256(model_bytes("v1")).hexdigest()
    assert datetime.fromisoformat(first.manifest.created_at).utcoffset() == timedelta(0)
    assert first.read_model() == model_bytes("v1")
    assert first.read_file("head.npz") == b"head-1"
    assert first.model_path == first.path / "model.onnx"


def test_publish_keeps_a_given_parent_and_created_at_and_sets_version_and_sha256(
        store: Store) -> None:
    reg = store.open()
    reg.publish("recs", model_bytes("v1"), manifest_for())
    given = dataclasses.replace(manifest_for(), parent_version=7,
                                created_at="2020-01-01T00:00Z", version=99, sha256="stale")
    v = reg.publish("recs", model_bytes("v2"), given)
    assert v.manifest.parent_version == 7
    assert v.manifest.created_at == "2020-01-01T00:00Z"
    assert v.manifest.version == 2
    assert v.manifest.sha256 == hashlib.sha256(model_bytes("v2")).hexdigest()


def test_publish_without_make_current_leaves_current_alone(store: Store) -> None:
    reg = store.open()
    reg.publish("other", model_bytes("o1"), manifest_for("other"), make_current=False)
    with pytest.raises(NotFound, match="'other' has no current version"):
        reg.current("other")
    reg.publish("recs", model_bytes("v1"), manifest_for())
    candidate = reg.publish("recs", model_bytes("v2"), manifest_for(), make_current=False)
    assert candidate.version == 2 and candidate.manifest.parent_version == 1
    assert reg.current("recs").version == 1
    assert reg.set_current("recs", 2) == candidate
    assert reg.current("recs").version == 2
    assert reg.set_current("recs", 1).version == 1  # back again: a rollback
    assert reg.current("recs").version == 1


def test_another_client_of_the_store_sees_the_same_versions_and_current(store: Store) -> None:
    publisher, reader = store.open(), store.open()
    published = publisher.publish("recs", model_bytes("v1"), manifest_for(), {"head.npz": b"h"})
    publisher.publish("recs", model_bytes("v2"), manifest_for(), make_current=False)
    assert reader.policies() == ["recs"] and reader.versions("recs") == [1, 2]
    seen = reader.current("recs")
    assert (seen.version, seen.manifest) == (1, published.manifest)
    assert seen.read_model() == model_bytes("v1")
    assert reader.get("recs", 1).read_file("head.npz") == b"h"
    publisher.set_current("recs", 2)
    assert reader.current("recs").read_model() == model_bytes("v2")
    late = store.open()  # opened after the fact: it catches up
    assert late.versions("recs") == [1, 2] and late.current("recs").version == 2


def test_policies_and_versions_are_sorted(store: Store) -> None:
    reg = store.open()
    assert reg.policies() == []
    for policy in ("zeta", "alpha", "mid"):
        reg.publish(policy, model_bytes(policy), manifest_for(policy))
    reg.publish("alpha", model_bytes("alpha-2"), manifest_for("alpha"))
    assert reg.policies() == ["alpha", "mid", "zeta"]
    assert reg.versions("alpha") == [1, 2]


def test_a_policy_or_version_that_does_not_exist_is_not_found(store: Store) -> None:
    reg = store.open()
    for read in (reg.current, reg.versions, lambda p: reg.get(p, 1),
                 lambda p: reg.set_current(p, 1)):
        with pytest.raises(NotFound, match="'ghost'"):
            read("ghost")
    reg.publish("recs", model_bytes("v1"), manifest_for())
    with pytest.raises(NotFound, match=r"'recs'.*version 5"):
        reg.get("recs", 5)
    with pytest.raises(NotFound, match=r"'recs'.*version 9"):
        reg.set_current("recs", 9)
    assert reg.current("recs").version == 1


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"], ids=repr)
def test_a_malformed_version_number_is_invalid(store: Store, version: object) -> None:
    reg = store.open()
    reg.publish("recs", model_bytes("v1"), manifest_for())
    with pytest.raises(InvalidArgument, match="version"):
        reg.get("recs", version)  # type: ignore[arg-type]


def test_a_model_altered_on_disk_fails_its_checksum_on_read(store: Store) -> None:
    mv = store.open().publish("recs", model_bytes("v1"), manifest_for())
    data = bytearray(mv.model_path.read_bytes())
    data[100] ^= 0xFF
    mv.model_path.write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match="sha256") as err:
        mv.read_model()
    assert err.value.reason == "checksum"
    mv.model_path.unlink()
    with pytest.raises(ModelRejected, match="missing") as err:
        mv.read_model()
    assert err.value.reason == "missing"


def test_extra_files_are_read_by_plain_name_only(store: Store) -> None:
    mv = store.open().publish("recs", model_bytes("v1"), manifest_for(), {"head.npz": b"h"})
    assert mv.read_file("head.npz") == b"h"
    with pytest.raises(NotFound, match="no file 'other.npz'"):
        mv.read_file("other.npz")
    for name in ("../manifest.json", "..", "a/b", ""):
        with pytest.raises(InvalidArgument, match="file name"):
            mv.read_file(name)


def test_the_longest_valid_policy_name_is_accepted(store: Store) -> None:
    name = "r" * 64
    assert store.open().publish(name, b"m", manifest_for(name)).version == 1


def test_retention_keeps_the_last_n_and_the_current_one(store: Store) -> None:
    reg = store.open(keep_last=3)
    for i in range(5):
        reg.publish("recs", model_bytes(f"v{i}"), manifest_for())
    assert reg.versions("recs") == [3, 4, 5]
    reg.set_current("recs", 3)
    for i in range(5, 9):
        reg.publish("recs", model_bytes(f"v{i}"), manifest_for(), make_current=False)
    assert reg.versions("recs") == [3, 7, 8, 9]
    assert reg.current("recs").read_model() == model_bytes("v2")
    with pytest.raises(NotFound):
        reg.get("recs", 4)
    assert store.open(keep_last=3).versions("recs") == [3, 7, 8, 9]


def test_close_is_idempotent(store: Store) -> None:
    reg = store.open()
    reg.publish("recs", b"m", manifest_for())
    reg.close()
    reg.close()


def test_open_registry_opens_this_store(store: Store) -> None:
    if store.kind == "local":
        reg = open_registry(store.tmp / "registry")
        assert isinstance(reg, LocalRegistry)
    else:
        reg = open_registry(store.tmp / "factory-cache", kafka=store.bootstrap, topic=store.topic)
        assert isinstance(reg, KafkaRegistry)
    store.opened.append(reg)
    reg.publish("recs", b"m", manifest_for())
    assert store.open().current("recs").read_model() == b"m"


# ---- refusals: nothing is stored, for any client of the store


@dataclass(frozen=True)
class Refusal:
    error: type[Exception]
    match: str
    policy: str = "recs"
    model: bytes = b"m"
    manifest: Callable[[str], object] = manifest_for
    files: dict[str, bytes] = field(default_factory=dict)
    max_model_bytes: int = 100


BAD_POLICY_NAMES = ["", "Recs", "-recs", "_recs", "a/b", "..", "a b", "r" * 65, "recs\n"]
BAD_FILE_NAMES = ["../x", "a/b", "..", ".", "", ".hidden", "a\\b", "a..b"]
HUGE_MANIFEST = dataclasses.replace(manifest_for(), training={"notes": "x" * MAX_MANIFEST_BYTES})

REFUSALS = {
    "empty model": Refusal(InvalidArgument, "model of policy 'recs' is empty", model=b""),
    **{f"policy {p!r}": Refusal(InvalidArgument, "policy name", policy=p)
       for p in BAD_POLICY_NAMES},
    **{f"file {n!r}": Refusal(InvalidArgument, "file name .* is invalid", files={n: b"x"})
       for n in BAD_FILE_NAMES},
    **{f"reserved {n}": Refusal(InvalidArgument, f"file name '{n}' is reserved", files={n: b"x"})
       for n in ("model.onnx", "manifest.json")},
    "model too large": Refusal(ResourceExhausted, "model.onnx of policy 'recs' is 101 bytes, "
                               "over max_model_bytes 100", model=b"m" * 101),
    "file too large": Refusal(ResourceExhausted, "head.npz of policy 'recs' is 101 bytes",
                              files={"head.npz": b"h" * 101}),
    "manifest too large": Refusal(ResourceExhausted, "manifest of policy 'recs' is",
                                  manifest=lambda p: HUGE_MANIFEST),
    "manifest of another policy": Refusal(InvalidArgument, "manifest.policy 'other' differs",
                                          manifest=lambda p: manifest_for("other")),
    "manifest not a Manifest": Refusal(InvalidArgument, "manifest must be a Manifest",
                                       manifest=lambda p: {"policy": p}),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_publish_raises_the_same_error_and_stores_nothing(
        store: Store, refusal: Refusal) -> None:
    reg = store.open(max_model_bytes=refusal.max_model_bytes)
    reg.publish("recs", b"m" * 100, manifest_for(), {"head.npz": b"h" * 100})  # at the limits
    with pytest.raises(refusal.error, match=refusal.match):
        reg.publish(refusal.policy, refusal.model,
                    refusal.manifest(refusal.policy),  # type: ignore[arg-type]
                    refusal.files)
    for client in (reg, store.open()):
        assert client.policies() == ["recs"]
        assert client.versions("recs") == [1] and client.current("recs").version == 1


@pytest.mark.parametrize("policy", BAD_POLICY_NAMES, ids=repr)
def test_a_bad_policy_name_is_invalid_on_read_too(store: Store, policy: str) -> None:
    reg = store.open()
    for read in (reg.current, reg.versions, lambda p: reg.get(p, 1),
                 lambda p: reg.set_current(p, 1)):
        with pytest.raises(InvalidArgument, match="policy name"):
            read(policy)

