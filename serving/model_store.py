"""Loaded model versions and the hot swap between them.

A version is loaded, checked and warmed up completely before it becomes visible; the swap is one
reference assignment, so a request that already holds a ``LoadedModel`` finishes on it while new
requests see the new one. A version that fails any check is rejected with a log line and a
metric, and the version already serving keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnxruntime as ort

from models.registry import ModelVersion, Registry
from models.signature import Manifest
from policyloop.errors import ModelRejected, NotFound, PolicyloopError, Unavailable
from serving.metrics import ServingMetrics
from serving.posterior import LinearPosterior

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32"}


@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to score: an onnxruntime session and what it expects."""

    manifest: Manifest
    session: ort.InferenceSession
    posterior: LinearPosterior | None
    provider: str

    @property
    def version(self) -> int:
        return self.manifest.version

    @cached_property
    def context_index(self) -> dict[str, int]:
        """Context feature name -> position, for requests that send named features."""
        return {name: i for i, name in enumerate(self.manifest.features.context)}

    @cached_property
    def action_index(self) -> dict[str, int]:
        """Per-action feature name -> position."""
        return {name: i for i, name in enumerate(self.manifest.features.action)}

    @cached_property
    def action_positions(self) -> dict[str, int]:
        """Fixed action id -> its column in the model's scores (qnet policies)."""
        return {action: i for i, action in enumerate(self.manifest.actions)}

    @property
    def context_dim(self) -> int:
        return len(self.manifest.features.context)

    @property
    def action_dim(self) -> int:
        return len(self.manifest.features.action)

    def run(self, context: np.ndarray,
            action_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and neural-linear embeddings.

        context float32[B, Dc]; action_features float32[B, K, Da] for scoring policies.
        Returns scores float32[B, K] (or [B, A]) and embedding float32[B, K, H] (or [B, H]).
        """
        feeds = {"context": context}
        if self.manifest.kind == "scoring":
            feeds["action_features"] = action_features
        scores, embedding = self.session.run(["scores", "embedding"], feeds)
        return scores, embedding


def session_options(threads: int) -> ort.SessionOptions:
    """Low-latency CPU settings: one small request at a time, no thread pools to wake up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def choose_providers(use_gpu: bool) -> list[str]:
    """CUDA first when this onnxruntime build has it and the caller allows it, CPU always."""
    available = ort.get_available_providers()
    if use_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_model(version: ModelVersion, *, expected: Manifest | None, providers: list[str],
               threads: int = 1) -> LoadedModel:
    """Read, verify, open and warm up one version; raise ModelRejected on any problem.

    ``expected`` is the manifest of the version serving now (None at first load): a new version
    must keep its feature schema, kind and action set, or clients' requests would be misread.
    """
    manifest = version.manifest
    if expected is not None:
        reason = expected.compatible_with(manifest)
        if reason is not None:
            raise ModelRejected(f"{manifest.policy} v{manifest.version} incompatible: {reason}",
                                "incompatible")
    data = version.read_model()  # checksum, size, inside the registry: ModelRejected if not
    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads),
                                       providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelRejected(f"{manifest.policy} v{manifest.version} does not load: {exc}",
                            "corrupt") from exc
    _check_signature(session, manifest)
    posterior = None
    try:
        posterior = LinearPosterior.from_npz_bytes(version.read_file("head.npz"))
    except NotFound:
        posterior = None
    except PolicyloopError as exc:
        raise ModelRejected(f"{manifest.policy} v{manifest.version} head.npz: {exc}",
                            "posterior") from exc
    loaded = LoadedModel(manifest, session, posterior, session.get_providers()[0])
    _warm_up(loaded)
    return loaded


def _check_signature(session: ort.InferenceSession, manifest: Manifest) -> None:
    got_inputs = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    want_inputs = {t.name: (t.dtype, len(t.shape)) for t in manifest.inputs}
    for name, (dtype, rank) in want_inputs.items():
        if name not in got_inputs:
            raise ModelRejected(f"{manifest.policy} v{manifest.version}: input {name!r} missing",
                                "signature")
        got_type, got_rank = got_inputs[name]
        if _ORT_DTYPES.get(got_type) != dtype or got_rank != rank:
            raise ModelRejected(
                f"{manifest.policy} v{manifest.version}: input {name!r} is {got_type} rank "
                f"{got_rank}, manifest says {dtype} rank {rank}", "signature")
    if set(got_inputs) != set(want_inputs):
        raise ModelRejected(f"{manifest.policy} v{manifest.version}: inputs "
                            f"{sorted(got_inputs)} != manifest {sorted(want_inputs)}", "signature")
    outputs = {o.name for o in session.get_outputs()}
    if not {"scores", "embedding"} <= outputs:
        raise ModelRejected(f"{manifest.policy} v{manifest.version}: outputs {sorted(outputs)} "
                            "lack 'scores' and 'embedding'", "signature")


def _warm_up(model: LoadedModel) -> None:
    """Run a few inputs of serving shapes so the first real request pays no lazy setup, and
    reject a model whose outputs are not finite or not of the promised shapes."""
    m = model.manifest
    rng = np.random.default_rng(0)
    for batch, k in ((1, 20), (8, 5)):
        context = rng.standard_normal((batch, model.context_dim), dtype=np.float32)
        actions = (rng.standard_normal((batch, k, model.action_dim), dtype=np.float32)
                   if m.kind == "scoring" else None)
        try:
            scores, embedding = model.run(context, actions)
        except Exception as exc:
            raise ModelRejected(f"{m.policy} v{m.version} fails on warm-up input: {exc}",
                                "warmup") from exc
        width = k if m.kind == "scoring" else len(m.actions)
        if scores.shape != (batch, width):
            raise ModelRejected(f"{m.policy} v{m.version}: scores shape {scores.shape}, "
                                f"expected {(batch, width)}", "signature")
        if not (np.isfinite(scores).all() and np.isfinite(embedding).all()):
            raise ModelRejected(f"{m.policy} v{m.version}: non-finite outputs on warm-up input",
                                "warmup")
        if model.posterior is not None and embedding.shape[-1] != m.head.dim:
            raise ModelRejected(f"{m.policy} v{m.version}: embedding width "
                                f"{embedding.shape[-1]} != head dim {m.head.dim}", "signature")


class ModelStore:
    """The loaded version of every served policy, kept current with the registry.

    A watcher thread polls the registry; loading happens on that thread, never on the request
    path. ``on_change(policy, model)`` is called after every swap (health, metrics).
    """

    def __init__(self, registry: Registry, policies: list[str], metrics: ServingMetrics, *,
                 providers: list[str], threads: int = 1, watch_interval_s: float = 1.0,
                 on_change: Callable[[str, LoadedModel], None] | None = None) -> None:
        self._registry = registry
        self._policies = list(policies)
        self._metrics = metrics
        self._providers = providers
        self._threads = threads
        self._interval = watch_interval_s
        self._on_change = on_change
        self._models: dict[str, LoadedModel] = {}
        metrics.declare_policies(self._policies)
        self._pinned: set[str] = set()
        self._rejected: dict[str, int] = {}  # policy -> last rejected version, not retried
        # Serialises loads, swaps and pins, never taken by readers. The watcher decides and
        # loads under it too, so a pin cannot land between its "not pinned" check and its swap.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policies(self) -> list[str]:
        return list(self._policies)

    def get(self, policy: str) -> LoadedModel:
        """The version serving now; the caller keeps this reference for the whole request."""
        model = self._models.get(policy)
        if model is None:
            if policy not in self._policies:
                raise NotFound(f"policy {policy!r} is not served here; served: "
                               f"{sorted(self._policies)}")
            raise Unavailable(f"policy {policy!r} has no loadable model version yet")
        return model

    def is_pinned(self, policy: str) -> bool:
        return policy in self._pinned

    def refresh(self) -> None:
        """Load the registry's current version of every unpinned policy that changed."""
        for policy in self._policies:
            with self._lock:
                self._follow(policy)

    def _follow(self, policy: str) -> None:
        if policy in self._pinned:
            return
        try:
            version = self._registry.current(policy)
        except NotFound:
            return
        except PolicyloopError as exc:
            log.warning("registry read failed for %s: %s", policy, exc,
                        extra={"policy": policy})
            return
        serving = self._models.get(policy)
        if serving is not None and serving.version == version.version:
            return
        if self._rejected.get(policy) == version.version:
            return
        self._load(policy, version)

    def _load(self, policy: str, version: ModelVersion) -> LoadedModel:
        with self._lock:
            serving = self._models.get(policy)
            try:
                model = load_model(version, expected=serving.manifest if serving else None,
                                   providers=self._providers, threads=self._threads)
            except ModelRejected as exc:
                self._rejected[policy] = version.version
                reason = exc.reason
                self._metrics.rejected_loads.labels(policy, reason).inc()
                log.error("rejected model %s v%d (%s): %s; still serving v%s", policy,
                          version.version, reason, exc, serving.version if serving else None,
                          extra={"policy": policy, "model_version": version.version})
                raise
            self._models[policy] = model  # the swap: one reference assignment
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
        return model

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
        """Make an earlier version current in the registry and serve it now."""
        self.get_known(policy)
        serving = self._models.get(policy)
        if version is None or version == 0:
            earlier = [v for v in self._registry.versions(policy)
                       if serving is None or v < serving.version]
            if not earlier:
                raise NotFound(f"policy {policy!r} has no version before the serving one")
            version = earlier[-1]
        target = self._registry.set_current(policy, version)
        self._rejected.pop(policy, None)
        return self._load(policy, target)

    def get_known(self, policy: str) -> None:
        if policy not in self._policies:
            raise NotFound(f"policy {policy!r} is not served here; served: "
                           f"{sorted(self._policies)}")

    def start(self) -> None:
        """Load every policy once, then watch the registry in the background."""
        for policy in self._policies:
            try:
                self._load(policy, self._registry.current(policy))
            except (NotFound, ModelRejected) as exc:
                log.error("policy %s not ready at start-up: %s", policy, exc,
                          extra={"policy": policy})
        self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._thread.start()

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
