"""Loaded model versions and the hot swap between them.

A version is loaded, checked and warmed up completely before it becomes visible; the swap is one
reference assignment, so a request that already holds a ``LoadedModel`` finishes on it while new
requests see the new one. A version that fails any check is rejected with a log line and a
metric, and the version already serving keeps serving.

The served policies are named at start-up. With ``discover`` the watcher also lists the
registry's policies: one new to the store is loaded like a new version, and only once its first
version loaded is it named, so until then it is unknown (NotFound) and touches no other
policy. A rejected first version is retried when the policy's current version moves on. No
policy is ever dropped: one whose current version disappeared from the registry keeps serving
what it loaded (a registry volume unmounted, a cache being rebuilt) until a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from policyloop.contract.errors import (
    ModelRejected,
    NotFound,
    PolicyloopError,
    Unavailable,
    shown,
)
from policyloop.registry.interface import ModelVersion, Registry, open_intact
from policyloop.registry.onnx_model import LoadedModel, load_model
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class ModelStore:
    """The loaded version of every served policy, kept current with the registry.

    A watcher thread polls the registry; loading happens on that thread, never on the request
    path. ``on_change(policy, model)`` is called after every swap (health, metrics), a
    discovered policy's first load included.
    """

    def __init__(self, registry: Registry, policies: list[str], metrics: ServingMetrics, *,
                 providers: list[str], threads: int = 1, watch_interval_s: float = 1.0,
                 discover: bool = False,
                 on_change: Callable[[str, LoadedModel], None] | None = None) -> None:
        self._registry = registry
        # replaced, never changed in place: readers iterate it without the lock
        self._policies = frozenset(policies)
        self._discover = discover
        self._discovered: set[str] = set()  # in the registry, seen, not loadable yet
        self._vanished: set[str] = set()  # serving, but gone from the registry (logged once)
        self._metrics = metrics
        self._providers = providers
        self._threads = threads
        self._interval = watch_interval_s
        self._on_change = on_change
        self._models: dict[str, LoadedModel] = {}
        metrics.declare_policies(sorted(self._policies))
        self._pinned: set[str] = set()
        self._rejected: dict[str, int] = {}  # policy -> last rejected version, not retried
        self._damage: dict[str, str] = {}  # policy -> why its current version is not served
        # Serialises loads, swaps and pins, never taken by readers. The watcher decides and
        # loads under it too, so a pin cannot land between its "not pinned" check and its swap.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policies(self) -> list[str]:
        return sorted(self._policies)

    @property
    def discovers(self) -> bool:
        """Whether policies published to the registry after start-up are served too."""
        return self._discover

    def serves(self, policy: str) -> bool:
        """Whether ``policy`` is served here (loaded, or named and waiting for a version)."""
        return policy in self._policies  # a discovered one is named once it has loaded

    def get(self, policy: str) -> LoadedModel:
        """The version serving now; the caller keeps this reference for the whole request."""
        model = self._models.get(policy)
        if model is None:
            if not self.serves(policy):
                raise NotFound(f"policy {shown(policy)} is not served here; served: "
                               f"{sorted(self._policies)}")
            raise Unavailable(f"policy {policy!r} has no loadable model version yet")
        return model

    def is_pinned(self, policy: str) -> bool:
        return policy in self._pinned

    def refresh(self) -> None:
        """Load the registry's current version of every unpinned policy that changed, then,
        with ``discover``, of every policy new to the registry. The first rejection (already
        logged and counted) is raised once every policy has been looked at."""
        rejected: ModelRejected | None = None
        for policy in sorted(self._policies):
            try:
                with self._lock:
                    self._follow(policy)
            except ModelRejected as exc:
                rejected = rejected or exc
        if self._discover:
            self._discover_new()
        if rejected is not None:
            raise rejected

    def _discover_new(self) -> None:
        """Try to load each registry policy not named here; one that fails stays unnamed and
        is tried again at the next poll (its rejected version is not)."""
        try:
            listed = self._registry.policies()
        except (PolicyloopError, OSError) as exc:
            log.warning("registry listing failed: %s", exc)
            return
        for policy in listed:
            with self._lock:
                if policy in self._policies:
                    continue
                if policy not in self._discovered:
                    self._discovered.add(policy)
                    self._metrics.declare_policies([policy])
                    log.info("policy %s appeared in the registry; loading it", policy,
                             extra={"policy": policy})
                try:
                    self._follow(policy)
                except ModelRejected:
                    pass  # logged and counted; a later current version is tried
                except Exception:
                    log.exception("loading discovered policy %s failed; will retry", policy,
                                  extra={"policy": policy})
                if policy in self._policies:
                    self._discovered.discard(policy)

    def _follow(self, policy: str) -> None:
        if policy in self._pinned:
            return
        try:
            version = self._registry.current(policy)
        except NotFound:
            serving = self._models.get(policy)
            if serving is not None and policy not in self._vanished:
                self._vanished.add(policy)
                log.warning("policy %s has no current version in the registry any more; "
                            "still serving v%d", policy, serving.version,
                            extra={"policy": policy, "model_version": serving.version})
            return
        except ModelRejected as exc:  # CURRENT or its manifest unreadable: logged once
            damage = f"current version: {exc}"
            if self._damage.get(policy) != damage:
                self._damage[policy] = damage
                log.error("registry read failed for %s: %s", policy, exc,
                          extra={"policy": policy})
            return
        except PolicyloopError as exc:
            log.warning("registry read failed for %s: %s", policy, exc,
                        extra={"policy": policy})
            return
        self._vanished.discard(policy)
        serving = self._models.get(policy)
        if serving is not None and serving.version == version.version:
            return
        if self._rejected.get(policy) == version.version:
            return
        self._load(policy, version)

    def _load(self, policy: str, version: ModelVersion) -> LoadedModel:
        with self._lock:
            try:
                model = self._open(policy, version)
            except ModelRejected as exc:
                self._rejected[policy] = version.version
                self._damage[policy] = f"v{version.version}: {exc}"
                raise
            self._install(policy, model)
            self._damage.pop(policy, None)
        return model

    def damage(self, policy: str) -> str:
        """Why this replica does not serve the registry's current version of ``policy`` (a
        version that failed its checks: "v7: <what>"), or "" when it does."""
        return self._damage.get(policy, "")

    def _open(self, policy: str, version: ModelVersion) -> LoadedModel:
        """Load and check ``version``; a rejection is logged, counted and raised."""
        serving = self._models.get(policy)
        try:
            return load_model(version, expected=serving.manifest if serving else None,
                              providers=self._providers, threads=self._threads)
        except ModelRejected as exc:
            reason = exc.reason
            self._metrics.rejected_loads.labels(policy, reason).inc()
            log.error("rejected model %s v%d (%s): %s; %s", policy, version.version,
                      reason, exc, f"still serving v{serving.version}" if serving
                      else "no version of it is served",
                      extra={"policy": policy, "model_version": version.version})
            raise

    def _install(self, policy: str, model: LoadedModel) -> None:
        """The swap (one reference assignment), then metrics, log and ``on_change``."""
        with self._lock:
            serving = self._models.get(policy)
            self._models[policy] = model
            if policy not in self._policies:  # a discovered policy, named once it can serve
                self._policies = self._policies | {policy}
        if serving is not None:
            self._metrics.swaps.labels(policy).inc()
        log.info("serving %s v%d on %s", policy, model.version, model.provider,
                 extra={"policy": policy, "model_version": model.version})
        self._metrics.model_version.labels(policy).set(model.version)
        self._metrics.record_load(policy, model.manifest.created_at)
        self._metrics.model_info.labels(policy).info({
            "version": str(model.version), "sha256": model.manifest.sha256[:16],
            "created_at": model.manifest.created_at,
            "pinned": str(policy in self._pinned).lower()})
        if self._on_change is not None:
            self._on_change(policy, model)

    def pin(self, policy: str, version: int) -> LoadedModel:
        """Serve exactly ``version`` and stop following the registry until unpinned."""
        self.get_known(policy)
        with self._lock:
            model = self._models.get(policy)
            if model is None or model.version != version:
                model = self._load(policy, self._registry.get(policy, version))
            self._pinned.add(policy)
        return model

    def unpin(self, policy: str) -> None:
        self.get_known(policy)
        self._pinned.discard(policy)
        self._rejected.pop(policy, None)
        self.refresh()

    def rollback(self, policy: str, version: int | None) -> LoadedModel:
        """Make an earlier version current in the registry and serve it now. The version is
        loaded and checked first: one that fails is refused (ModelRejected) and neither
        ``CURRENT`` nor what is served moves."""
        self.get_known(policy)
        serving = self._models.get(policy)
        if version is None or version == 0:
            earlier = [v for v in self._registry.versions(policy)
                       if serving is None or v < serving.version]
            if not earlier:
                raise NotFound(f"policy {policy!r} has no version before the serving one")
            version = earlier[-1]
        with self._lock:
            model = self._open(policy, self._registry.get(policy, version))
            self._registry.set_current(policy, version)
            self._rejected.pop(policy, None)
            self._damage.pop(policy, None)
            self._install(policy, model)
        return model

    def get_known(self, policy: str) -> None:
        if not self.serves(policy):
            raise NotFound(f"policy {shown(policy)} is not served here; served: "
                           f"{sorted(self._policies)}")

    def start(self) -> None:
        """Load every policy once, then watch the registry in the background."""
        for policy in sorted(self._policies):
            with self._lock:
                self._start(policy)
        self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._thread.start()

    def _start(self, policy: str) -> None:
        """Serve the current version of ``policy``, or the newest intact one before it when
        the current one is damaged (the rule: ``open_intact``), saying so loudly."""
        try:
            model, damage = open_intact(self._registry, policy,
                                        lambda version: self._open(policy, version))
        except (NotFound, ModelRejected) as exc:
            if isinstance(exc, ModelRejected):
                self._damage[policy] = f"no intact version: {exc}"
            log.error("policy %s not ready at start-up: %s", policy, exc,
                      extra={"policy": policy})
            return
        self._install(policy, model)
        if damage is None:
            return
        try:  # the damaged current version is not retried until CURRENT moves on
            self._rejected[policy] = self._registry.current(policy).version
        except PolicyloopError:
            pass  # CURRENT itself unreadable: the watcher keeps reporting it
        self._damage[policy] = f"current version: {damage}"
        log.error("policy %s: the registry's current version is damaged (%s); serving v%d, "
                  "the newest intact version before it, until CURRENT moves on (roll back, "
                  "or a new version is promoted)", policy, damage, model.version,
                  extra={"policy": policy, "model_version": model.version})

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except ModelRejected:
                pass  # already logged and counted; keep serving the old version
            except Exception:
                log.exception("model watcher iteration failed; will retry")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
