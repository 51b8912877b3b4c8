"""A model registry that needs no shared volume: versions live on a compacted Kafka topic.

Every published version is one record keyed ``<policy>/<version, 8 digits>`` holding the
manifest, the ONNX model and its extra files; the current pointer is a record keyed
``<policy>/CURRENT``. Compaction keeps the last record per key. Each publish also writes a
tombstone for every version retention drops (all but the last ``keep_last`` and the current
one, as ``LocalRegistry`` keeps), so compaction removes them and the topic stays the size of
the versions kept; a replica that reads a tombstone deletes the version from its cache.

Each process (every serving replica, the learner) materialises the topic into its own
``LocalRegistry`` cache folder and reads from there, so serving's model store works on it
unchanged and every replica converges to the same current version.

Publishing allocates the next number from the versions seen so far: run one publisher per
policy (the learner); two concurrent publishers could pick the same number.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from policyloop.bus.interface import MODELS, BusUnavailable
from policyloop.bus.kafka import KafkaConsumerAdapter, KafkaProducerAdapter
from policyloop.contract.errors import InvalidArgument, ModelRejected, NotFound
from policyloop.contract.signature import Manifest
from policyloop.registry.interface import (
    DEFAULT_MAX_MODEL_BYTES,
    ModelVersion,
    check_publication,
)
from policyloop.registry.local import LocalRegistry

log = logging.getLogger(__name__)

_CURRENT = "CURRENT"


class KafkaRegistry:
    """The ``Registry`` interface over a compacted topic, cached in ``cache_dir``."""

    def __init__(self, bootstrap: str, cache_dir: str | Path, *, topic: str = MODELS,
                 sync_timeout_s: float = 0.5,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES, keep_last: int = 10) -> None:
        self.cache = LocalRegistry(cache_dir, max_model_bytes=max_model_bytes,
                                   keep_last=keep_last)
        self.topic = topic
        self._bootstrap = bootstrap
        self._timeout = sync_timeout_s
        self._consumer = KafkaConsumerAdapter(bootstrap, f"registry-{uuid.uuid4().hex}", [topic])
        self._producer: KafkaProducerAdapter | None = None
        self._current: dict[str, int] = {}
        self._positions: dict[int, int] = {}
        self._join_timeout = 30.0
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Apply every record published up to now to the local cache: read until the topic's
        end offsets as they were when the sync began (a first sync also waits for the
        consumer to join), so a publish is visible to its own process at once."""
        with self._lock:
            ends = self._consumer.end_offsets(self.topic)
            deadline = time.monotonic() + self._join_timeout
            while any(self._positions.get(p, 0) < end for p, end in ends.items()):
                records = self._consumer.poll(max_records=100, timeout=self._timeout)
                for record in records:
                    self._positions[record.partition] = record.offset + 1
                    self._apply(record.key or b"", record.value)
                if not records and time.monotonic() > deadline:
                    raise BusUnavailable(f"registry topic {self.topic!r}: could not read up to "
                                         f"offsets {ends} within {self._join_timeout}s")

    def _apply(self, key: bytes, value: bytes) -> None:
        """One record into the cache; a bad one is logged and skipped, so it can never stop
        this replica from reading the versions after it."""
        try:
            policy, _, what = key.decode().partition("/")
            if what != _CURRENT and not value:  # a tombstone: retention dropped the version
                self._drop(policy, int(what))
                return
            if what == _CURRENT:
                version = int(value)
                self._current[policy] = version
                try:
                    self.cache.set_current(policy, version)
                except NotFound:
                    pass  # the version record comes later in a reordered replay; set then
                return
            body = json.loads(value)
            manifest = Manifest.from_json(body["manifest"])
            files = {name: base64.b64decode(data) for name, data in body["files"].items()}
            self.cache.install(base64.b64decode(body["model"]), manifest, files)
            if self._current.get(policy) == manifest.version:
                self.cache.set_current(policy, manifest.version)
        except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument,
                ModelRejected) as exc:
            log.error("registry topic %r: skipping record %r: %s", self.topic, key, exc)

    def _drop(self, policy: str, version: int) -> None:
        try:
            self.cache.remove(policy, version)
        except NotFound:
            pass  # the policy never reached this cache
        except InvalidArgument:
            log.warning("registry topic %r: %s v%d was deleted but is current here; kept",
                        self.topic, policy, version)

    # ---- the Registry interface

    def publish(self, policy: str, model: bytes, manifest: Manifest,
                files: Mapping[str, bytes] | None = None, *,
                make_current: bool = True) -> ModelVersion:
        """As ``LocalRegistry.publish``, through the same checks
        (``policyloop/registry/interface.py``): nothing reaches the topic that a replica's
        cache would refuse to install."""
        publication = check_publication(policy, model, manifest, files,
                                        max_model_bytes=self.cache.max_model_bytes)
        self.sync()
        existing = self._versions_or_empty(policy)
        version = existing[-1] + 1 if existing else 1
        stored = publication.stamped(version, self._current.get(policy))
        body = json.dumps({
            "manifest": stored.to_json(), "model": base64.b64encode(publication.model).decode(),
            "files": {n: base64.b64encode(d).decode() for n, d in publication.files.items()},
        }).encode()
        producer = self._producer_once()
        producer.send(self.topic, body, f"{policy}/{version:08d}".encode())
        if make_current:
            producer.send(self.topic, str(version).encode(), f"{policy}/{_CURRENT}".encode())
        current = version if make_current else self._current.get(policy)
        for old in set(existing) - self.cache.retained([*existing, version], current):
            producer.delete(self.topic, f"{policy}/{old:08d}".encode())
        producer.flush()
        self.sync()
        return self.cache.get(policy, version)

    def set_current(self, policy: str, version: int) -> ModelVersion:
        self.sync()
        target = self.cache.get(policy, version)
        target.verify()  # as LocalRegistry: never point CURRENT at a damaged version
        producer = self._producer_once()
        producer.send(self.topic, str(version).encode(), f"{policy}/{_CURRENT}".encode())
        producer.flush()
        self.sync()
        return target

    def current(self, policy: str) -> ModelVersion:
        self.sync()
        return self.cache.current(policy)

    def get(self, policy: str, version: int) -> ModelVersion:
        self.sync()
        return self.cache.get(policy, version)

    def versions(self, policy: str) -> list[int]:
        self.sync()
        return self.cache.versions(policy)

    def policies(self) -> list[str]:
        self.sync()
        return self.cache.policies()

    def close(self) -> None:
        self._consumer.close()
        if self._producer is not None:
            self._producer.close()

    def _versions_or_empty(self, policy: str) -> list[int]:
        try:
            return self.cache.versions(policy)
        except NotFound:
            return []

    def _producer_once(self) -> KafkaProducerAdapter:
        if self._producer is None:
            self._producer = KafkaProducerAdapter(self._bootstrap, client_id="policyloop-registry",
                                                  max_request_size=16 << 20)
        return self._producer
