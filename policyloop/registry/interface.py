"""The model registry seen by serving and the learners: numbered, immutable versions of each
policy's ONNX model, and a current version per policy.

Trainers and the online learner publish; servers poll ``current()`` and load what it names.
A rollback only moves the current pointer, so it is instant and needs no artefact.
Torch-free: serving reads the registry without torch installed.

Two implementations share this contract: a folder on a shared volume
(``policyloop/registry/local.py``) and a compacted Kafka topic that every process caches in a
folder of its own (``policyloop/registry/kafka.py``). Either hands out ``ModelVersion``s of
files in a local folder. Both publish through ``check_publication`` and
``Publication.stamped``, so what one refuses the other refuses too; one suite runs over both
(``tests/test_registry_conformance.py``).

Publishing checks, in this order (nothing is stored when one fails):

- the policy name matches ``[a-z0-9][a-z0-9_-]{0,63}`` (it becomes a folder and a key) and
  ``manifest.policy`` is that name (InvalidArgument);
- the model is not empty, each extra file has a plain name (no separators, no '..', no
  leading dot) other than ``model.onnx`` and ``manifest.json`` (InvalidArgument);
- the model and each extra file are at most ``max_model_bytes``, and the stored manifest's JSON
  at most ``MAX_MANIFEST_BYTES`` (ResourceExhausted): a registry file is read whole.

The registry fills in the manifest's ``version`` (the policy's highest plus one), ``sha256``
(of the model), ``file_sha256`` (of each extra file), ``created_at`` (when empty) and
``parent_version`` (when None: the version current at publish time). ``CURRENT`` only ever
moves to a version whose files match those digests (``ModelVersion.verify``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from policyloop.contract.errors import InvalidArgument, ModelRejected, NotFound, ResourceExhausted
from policyloop.contract.signature import POLICY_NAME, Manifest

T = TypeVar("T")

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
RESERVED_FILES = frozenset({MODEL_FILE, MANIFEST_FILE})
# Larger files are refused on publish and on load: a registry file is read whole into memory.
DEFAULT_MAX_MODEL_BYTES = 256 * 2**20
MAX_MANIFEST_BYTES = 2**20  # a manifest is a small JSON document

# Extra files: a plain name, no separators, never starting with a dot (so never "." or "..").
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_policy_name(policy: str) -> str:
    """Return ``policy`` when it is a valid policy name; it becomes a folder name."""
    if not isinstance(policy, str) or not POLICY_NAME.fullmatch(policy):
        raise InvalidArgument(
            f"policy name {policy!r} is invalid: expected [a-z0-9][a-z0-9_-]{{0,63}}")
    return policy


def check_file_name(name: str) -> str:
    """Return ``name`` when it may name an extra file of a version."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"file name {name!r} is invalid: expected a plain name without path separators, "
            "'..' or a leading dot")
    return name


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgument(f"version {version!r} is invalid: expected an integer >= 1")
    return version


def check_contents(policy: str, model: bytes, files: Mapping[str, bytes] | None,
                   max_model_bytes: int) -> tuple[bytes, dict[str, bytes]]:
    """The model and extra files of one version of ``policy`` as bytes, when they may be
    stored: a model that is not empty, extra files with plain names other than the reserved
    ones, none over ``max_model_bytes`` (ResourceExhausted)."""
    model = bytes(model)
    if not model:
        raise InvalidArgument(f"model of policy {policy!r} is empty")
    extras = {check_file_name(name): bytes(data) for name, data in (files or {}).items()}
    clash = RESERVED_FILES.intersection(extras)
    if clash:
        raise InvalidArgument(f"file name {sorted(clash)[0]!r} is reserved by the registry")
    for name, data in {MODEL_FILE: model, **extras}.items():
        if len(data) > max_model_bytes:
            raise ResourceExhausted(
                f"{name} of policy {policy!r} is {len(data)} bytes, over max_model_bytes "
                f"{max_model_bytes}")
    return model, extras


@dataclass(frozen=True)
class Publication:
    """One version to publish that passed ``check_publication``; ``files`` are the extras."""

    policy: str
    model: bytes
    manifest: Manifest
    files: Mapping[str, bytes]

    def stamped(self, version: int, current: int | None) -> Manifest:
        """The manifest to store as ``version``: the registry's fields filled in (module
        docstring), ``current`` being the policy's current version (None: none yet).
        ResourceExhausted when its JSON would be over ``MAX_MANIFEST_BYTES``."""
        stored = dataclasses.replace(
            self.manifest, version=check_version(version),
            parent_version=(current if self.manifest.parent_version is None
                            else self.manifest.parent_version),
            created_at=self.manifest.created_at or datetime.now(UTC).isoformat(
                timespec="milliseconds"),
            sha256=hashlib.sha256(self.model).hexdigest(),
            file_sha256={name: hashlib.sha256(data).hexdigest()
                         for name, data in sorted(self.files.items())})
        size = len(stored.to_json().encode())
        if size > MAX_MANIFEST_BYTES:
            raise ResourceExhausted(f"manifest of policy {self.policy!r} is {size} bytes, over "
                                    f"{MAX_MANIFEST_BYTES}")
        return stored


def check_publication(policy: str, model: bytes, manifest: Manifest,
                      files: Mapping[str, bytes] | None, *,
                      max_model_bytes: int) -> Publication:
    """Every check a publish makes before it stores anything (module docstring), the same for
    every registry; ``Publication.stamped`` makes the last one, on the manifest's size."""
    check_policy_name(policy)
    if not isinstance(manifest, Manifest):
        raise InvalidArgument(f"manifest must be a Manifest, got {type(manifest).__name__}")
    if manifest.policy != policy:
        raise InvalidArgument(
            f"manifest.policy {manifest.policy!r} differs from policy {policy!r}")
    model, extras = check_contents(policy, model, files, max_model_bytes)
    publication = Publication(policy, model, manifest, extras)
    publication.stamped(1, None)  # a manifest too large is refused before anything is stored
    return publication


def read_bounded(path: Path, root: Path, what: str, max_bytes: int) -> bytes:
    """Read ``path`` after checking that it resolves inside ``root`` (no symlink escapes) and
    is a regular file of at most ``max_bytes`` (checked before reading, so a huge file placed
    by hand never reaches memory)."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ModelRejected(f"{what} {path} is missing", "missing") from exc
    if not resolved.is_relative_to(root.resolve()):
        raise ModelRejected(f"{what} {path} resolves to {resolved}, outside the registry {root}",
                            "outside")
    try:
        # no following a link swapped in since resolve(); non-blocking, so a FIFO cannot hang
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ModelRejected(f"{what} {path} is missing", "missing") from exc
    except OSError as exc:
        raise ModelRejected(f"{what} {path} cannot be opened safely: {exc}", "outside") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelRejected(f"{what} {path} is not a regular file", "outside")
        if info.st_size > max_bytes:
            raise ModelRejected(f"{what} {path} is {info.st_size} bytes, over "
                                f"max_model_bytes {max_bytes}", "oversized")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise ModelRejected(f"{what} {path} is over max_model_bytes {max_bytes}", "oversized")
    return data


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a policy's model, as stored in a registry folder (a
    ``LocalRegistry``, or a Kafka-backed registry's cache).

    ``path`` is the version's folder, ``ROOT/<policy>/versions/<version>``; the registry root is
    therefore ``path.parents[2]``, which bounds where its files may resolve to.
    """

    policy: str
    version: int
    manifest: Manifest
    path: Path
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES  # the largest file it will read

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def _root(self) -> Path:
        return self.path.parents[2]

    def read_model(self) -> bytes:
        """The ONNX bytes, checked against ``manifest.sha256``; ModelRejected when the file is
        missing, altered, or a link out of the registry."""
        data = read_bounded(self.model_path, self._root,
                            f"model of policy {self.policy!r} version {self.version}",
                            self.max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.manifest.sha256:
            raise ModelRejected(
                f"model of policy {self.policy!r} version {self.version} has sha256 {digest}, "
                f"manifest says {self.manifest.sha256}", "checksum")
        return data

    def read_file(self, name: str) -> bytes:
        """An extra file published with this version, e.g. ``head.npz``, checked against the
        manifest's ``file_sha256`` (ModelRejected "checksum" when altered)."""
        check_file_name(name)
        path = self.path / name
        expected = self.manifest.file_sha256.get(name)
        if not path.exists():
            if expected is not None:
                raise ModelRejected(f"file {name!r} of policy {self.policy!r} version "
                                    f"{self.version} is missing", "checksum")
            raise NotFound(
                f"policy {self.policy!r} version {self.version} has no file {name!r}")
        data = read_bounded(path, self._root,
                            f"file {name!r} of policy {self.policy!r} version {self.version}",
                            self.max_bytes)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ModelRejected(
                f"file {name!r} of policy {self.policy!r} version {self.version} does not "
                "match the sha256 in its manifest", "checksum")
        return data

    def verify(self) -> None:
        """Read the model and every extra file the manifest lists and check their sha256;
        ModelRejected naming the first one that is missing or altered. A registry runs this
        before it points ``CURRENT`` at a version."""
        self.read_model()
        for name in self.manifest.file_sha256:
            self.read_file(name)


class Registry(Protocol):
    """What serving and the learners need from a registry, whatever stores it."""

    def publish(self, policy: str, model: bytes, manifest: Manifest,
                files: Mapping[str, bytes] | None = None, *,
                make_current: bool = True) -> ModelVersion:
        """Store ``model`` as the next version of ``policy`` and, by default, make it current
        (checks and filled-in manifest fields in the module docstring)."""

    def versions(self, policy: str) -> list[int]:
        """The versions kept, ascending; NotFound for a policy never published."""

    def get(self, policy: str, version: int) -> ModelVersion:
        """NotFound when the policy has no such version (or no longer: retention)."""

    def current(self, policy: str) -> ModelVersion:
        """NotFound when the policy does not exist or has no current version yet."""

    def set_current(self, policy: str, version: int) -> ModelVersion:
        """Make an existing version current (rollback or promotion); NotFound otherwise."""

    def policies(self) -> list[str]:
        """The policies published, sorted."""

    def close(self) -> None:
        """Release connections (a Kafka-backed registry's clients; nothing for a folder)."""


def open_intact(registry: Registry, policy: str,
                open_version: Callable[[ModelVersion], T]) -> tuple[T, ModelRejected | None]:
    """``open_version`` of the current version of ``policy`` or, when that is damaged, of the
    newest intact version before it, with the damage (None when the current one opened).

    The rule a server or learner follows at start-up, so one damaged version never leaves a
    policy unserved while an intact one is on disk: the versions older than the damaged
    current one (every version when ``CURRENT`` itself cannot be read), newest first, except
    those the learner's gate refused (``evaluation.promoted`` false: never served). ``CURRENT``
    is left as it is, for an operator to roll back or for the next promotion to replace.
    The first damage is raised when no version opens; NotFound when there is no current
    version at all."""
    current: ModelVersion | None = None
    try:
        current = registry.current(policy)
        return open_version(current), None
    except ModelRejected as exc:  # CURRENT, its manifest or its files
        damage = exc
    for version in reversed(registry.versions(policy)):
        if current is not None and version >= current.version:
            continue
        try:
            older = registry.get(policy, version)
            if older.manifest.evaluation.get("promoted", True) is False:
                continue
            return open_version(older), damage
        except (ModelRejected, NotFound):
            continue  # damaged too (its own load logged it), or removed meanwhile
    raise damage


def open_registry(path: str | Path, *, kafka: str = "", topic: str = "models",
                  max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
                  sync_timeout_s: float = 0.5) -> Registry:
    """The registry a process is configured with: the folder ``path`` (a shared volume), or,
    with ``kafka`` (bootstrap HOST:PORT), the Kafka-backed registry on ``topic`` that this
    process caches in ``path`` (``policyloop/registry/kafka.py``, no shared volume)."""
    if kafka:
        from policyloop.registry.kafka import KafkaRegistry

        return KafkaRegistry(kafka, path, topic=topic, sync_timeout_s=sync_timeout_s,
                             max_model_bytes=max_model_bytes)
    from policyloop.registry.local import LocalRegistry

    return LocalRegistry(path, max_model_bytes=max_model_bytes)
