"""The model registry in a folder (``policyloop/registry/interface.py`` is the contract).

On disk, for a shared volume::

    ROOT/<policy>/versions/00000007/{model.onnx, manifest.json, <extra files>}
    ROOT/<policy>/CURRENT        text: the current version number
    ROOT/<policy>/.lock          flock'ed by publishers and by set_current

A version is written into a temp folder beside ``versions/`` and renamed into place, and
``CURRENT`` is replaced atomically, so a reader sees a complete version or none. Old versions
are renamed out of ``versions/`` before they are deleted, for the same reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from policyloop.contract.errors import InvalidArgument, ModelRejected, NotFound, ResourceExhausted
from policyloop.contract.signature import Manifest
from policyloop.registry.interface import (
    DEFAULT_MAX_MODEL_BYTES,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MODEL_FILE,
    POLICY_NAME,
    ModelVersion,
    check_contents,
    check_policy_name,
    check_publication,
    check_version,
    read_bounded,
)

CURRENT_FILE = "CURRENT"
_LOCK_FILE = ".lock"
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRegistry:
    """A registry in a folder, safe for concurrent publishers (threads and processes on one
    host, via ``flock``) and lock-free readers.

    ``keep_last`` versions per policy survive each publish, plus the current one whatever its
    age; ``max_model_bytes`` bounds every file a version publishes, installs or loads.
    """

    def __init__(self, root: str | Path, *, keep_last: int = 10,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> None:
        if keep_last < 1:
            raise InvalidArgument(f"keep_last {keep_last!r} is invalid: expected >= 1")
        if max_model_bytes < 1:
            raise InvalidArgument(
                f"max_model_bytes {max_model_bytes!r} is invalid: expected >= 1")
        self.root = Path(root)
        self.keep_last = keep_last
        self.max_model_bytes = max_model_bytes

    def __repr__(self) -> str:
        return (f"LocalRegistry({str(self.root)!r}, keep_last={self.keep_last}, "
                f"max_model_bytes={self.max_model_bytes})")

    def close(self) -> None:
        pass  # a folder holds nothing open

    # ---- reading

    def policies(self) -> list[str]:
        """Policies with a ``versions`` folder, sorted; empty when the root does not exist."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if POLICY_NAME.fullmatch(p.name) and (p / "versions").is_dir())

    def versions(self, policy: str) -> list[int]:
        """Published versions of ``policy`` still on disk, ascending."""
        folder = self._policy_dir(policy) / "versions"
        if not folder.is_dir():
            raise NotFound(f"policy {policy!r} does not exist in registry {self.root}")
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit()
                      and p.is_dir())

    def get(self, policy: str, version: int) -> ModelVersion:
        check_version(version)
        path = self._version_dir(policy, version)
        try:
            if not (path / MANIFEST_FILE).exists():
                raise ModelRejected("no manifest", "missing")
            text = read_bounded(path / MANIFEST_FILE, self.root,
                                f"manifest of policy {policy!r} version {version}",
                                MAX_MANIFEST_BYTES).decode(errors="replace")
        except ModelRejected as exc:
            if exc.reason != "missing":
                raise
            raise NotFound(f"policy {policy!r} has no version {version} in registry "
                           f"{self.root}") from exc
        try:
            manifest = Manifest.from_json(text)
        except InvalidArgument as exc:
            raise ModelRejected(
                f"manifest of policy {policy!r} version {version} is malformed: {exc}") from exc
        if manifest.policy != policy or manifest.version != version:
            raise ModelRejected(
                f"manifest at {path} names policy {manifest.policy!r} version "
                f"{manifest.version}, expected {policy!r} version {version}")
        return ModelVersion(policy=policy, version=version, manifest=manifest, path=path,
                            max_bytes=self.max_model_bytes)

    def current(self, policy: str) -> ModelVersion:
        """The version ``CURRENT`` names. Retries when retention deleted that version between
        reading ``CURRENT`` and the manifest, which only happens after ``CURRENT`` moved on."""
        for _ in range(3):
            version = self._current_version(policy)
            if version is None:
                raise NotFound(
                    f"policy {policy!r} has no current version in registry {self.root}")
            try:
                return self.get(policy, version)
            except NotFound:
                if self._current_version(policy) == version:
                    raise
        assert version is not None  # a None version raised inside the loop
        return self.get(policy, version)

    # ---- writing

    def publish(self, policy: str, model: bytes, manifest: Manifest,
                files: Mapping[str, bytes] | None = None, *,
                make_current: bool = True) -> ModelVersion:
        """Store ``model`` as the next version of ``policy`` and, by default, make it current
        (the checks and the manifest fields it fills in: ``policyloop/registry/interface.py``).
        """
        publication = check_publication(policy, model, manifest, files,
                                        max_model_bytes=self.max_model_bytes)
        policy_dir = self._policy_dir(policy)
        (policy_dir / "versions").mkdir(parents=True, exist_ok=True)
        with self._locked(policy):
            self._remove_leftovers(policy_dir)
            existing = self.versions(policy)
            version = existing[-1] + 1 if existing else 1
            stored = publication.stamped(version, self._current_version(policy))
            self._store(policy, stored, publication.model, publication.files, make_current)
            return self.get(policy, version)

    def install(self, model: bytes, manifest: Manifest,
                files: Mapping[str, bytes] | None = None) -> ModelVersion:
        """Store a version published elsewhere under its own number (a replica's cache of a
        shared registry); a version already here is left as it is. It must pass the checks of
        a publish, and the model must match the manifest's sha256 (else ModelRejected)."""
        policy = check_policy_name(manifest.policy)
        if manifest.version < 1 or hashlib.sha256(model).hexdigest() != manifest.sha256:
            raise ModelRejected(f"cannot install {policy} v{manifest.version}: no version "
                                "number or the model does not match its sha256")
        for name, data in (files or {}).items():
            expected = manifest.file_sha256.get(name)
            if expected is not None and hashlib.sha256(bytes(data)).hexdigest() != expected:
                raise ModelRejected(f"cannot install {policy} v{manifest.version}: file "
                                    f"{name!r} does not match its sha256")
        try:
            model, extras = check_contents(policy, model, files, self.max_model_bytes)
        except ResourceExhausted as exc:
            raise ModelRejected(f"cannot install {policy} v{manifest.version}: {exc}") from exc
        (self._policy_dir(policy) / "versions").mkdir(parents=True, exist_ok=True)
        with self._locked(policy):
            if not self._version_dir(policy, manifest.version).exists():
                self._store(policy, manifest, model, extras, make_current=False)
        return self.get(policy, manifest.version)

    def _store(self, policy: str, stored: Manifest, model: bytes, extras: Mapping[str, bytes],
               make_current: bool) -> None:
        """Write one version atomically (temp folder, fsync, rename); caller holds the lock."""
        policy_dir = self._policy_dir(policy)
        temp = policy_dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            _write_synced(temp / MODEL_FILE, model)
            for name, data in extras.items():
                _write_synced(temp / name, data)
            _write_synced(temp / MANIFEST_FILE, stored.to_json().encode())
            _fsync_dir(temp)
            os.rename(temp, self._version_dir(policy, stored.version))
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        _fsync_dir(policy_dir / "versions")
        if make_current:
            # read back what the disk holds: CURRENT never names a version that fails to verify
            self.get(policy, stored.version).verify()
            self._write_current(policy, stored.version)
        self._apply_retention(policy)

    def set_current(self, policy: str, version: int) -> ModelVersion:
        """Point ``CURRENT`` at an existing version (rollback or promotion); a version whose
        files fail ``verify`` is refused with ModelRejected and ``CURRENT`` stays."""
        with self._locked(policy):
            target = self.get(policy, version)
            target.verify()
            self._write_current(policy, version)
        return target

    def rollback(self, policy: str, version: int | None = None) -> ModelVersion:
        """Make ``version`` current; None means the newest version older than the current."""
        if version is not None:
            return self.set_current(policy, version)
        with self._locked(policy):
            now = self._current_version(policy)
            if now is None:
                raise NotFound(
                    f"policy {policy!r} has no current version in registry {self.root}")
            earlier = [v for v in self.versions(policy) if v < now]
            if not earlier:
                raise NotFound(f"policy {policy!r} has no version before {now} in "
                               f"registry {self.root}")
            target = self.get(policy, earlier[-1])
            target.verify()
            self._write_current(policy, target.version)
        return target

    # ---- internals

    def _policy_dir(self, policy: str) -> Path:
        return self.root / check_policy_name(policy)

    def _version_dir(self, policy: str, version: int) -> Path:
        return self._policy_dir(policy) / "versions" / f"{version:08d}"

    def _current_version(self, policy: str) -> int | None:
        """The version ``CURRENT`` names, or None when there is none; NotFound for an unknown
        policy."""
        policy_dir = self._policy_dir(policy)
        if not policy_dir.is_dir():
            raise NotFound(f"policy {policy!r} does not exist in registry {self.root}")
        if not (policy_dir / CURRENT_FILE).exists():
            return None
        try:
            text = read_bounded(policy_dir / CURRENT_FILE, self.root, f"CURRENT of {policy!r}",
                                64).decode(errors="replace")
        except ModelRejected as exc:
            if exc.reason == "missing":
                return None
            raise
        try:
            return check_version(int(text.strip()))
        except (ValueError, InvalidArgument) as exc:
            raise ModelRejected(
                f"CURRENT of policy {policy!r} holds {text!r}, not a version number") from exc

    def _write_current(self, policy: str, version: int) -> None:
        policy_dir = self._policy_dir(policy)
        temp = policy_dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            _write_synced(temp, f"{version}\n".encode())
            os.replace(temp, policy_dir / CURRENT_FILE)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(policy_dir)

    def retained(self, versions: Sequence[int], current: int | None) -> set[int]:
        """The versions retention keeps: the last ``keep_last`` of ``versions``, and the
        current one."""
        keep = set(sorted(versions)[-self.keep_last:])
        if current is not None:
            keep.add(current)
        return keep

    def remove(self, policy: str, version: int) -> None:
        """Delete one version (a shared registry's deletion reaching this cache); the current
        version is refused, a missing one is a no-op."""
        with self._locked(policy):
            if self._current_version(policy) == version:
                raise InvalidArgument(f"{policy} v{version} is the current version; it stays")
            if self._version_dir(policy, version).is_dir():
                self._delete_version(policy, version)

    def _apply_retention(self, policy: str) -> None:
        existing = self.versions(policy)
        keep = self.retained(existing, self._current_version(policy))
        for version in existing:
            if version not in keep:
                self._delete_version(policy, version)

    def _delete_version(self, policy: str, version: int) -> None:
        # Rename first: a reader then finds the whole version or no version at all.
        trash = self._policy_dir(policy) / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(self._version_dir(policy, version), trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _remove_leftovers(policy_dir: Path) -> None:
        """Delete temp folders and files of crashed publishers; only called under the lock,
        when no other publisher can be writing one."""
        for entry in policy_dir.iterdir():
            if entry.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, policy: str) -> Iterator[None]:
        """Exclusive per-policy lock. flock locks belong to the open file description, so
        this excludes other threads of this process as well as other processes."""
        policy_dir = self._policy_dir(policy)
        if not policy_dir.is_dir():
            raise NotFound(f"policy {policy!r} does not exist in registry {self.root}")
        with open(policy_dir / _LOCK_FILE, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
