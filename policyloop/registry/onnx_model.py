"""Opening one registered ONNX version: verified, warmed up, ready to score.

Every stage that runs a policy (the server, the learner, evaluation, training's parity check)
opens it here, so a version that one of them accepts the others accept too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnxruntime as ort

from policyloop.contract.errors import ModelRejected, NotFound, PolicyloopError
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import Categorical, Manifest
from policyloop.registry.interface import ModelVersion

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
    def fields_at(self) -> dict[str, tuple[tuple[str, Categorical | None], ...]]:
        """Per side: the features a request names (``FeatureSchema.fields``), for the
        ``missing = "error"`` check."""
        features = self.manifest.features
        return {side: features.fields(side) for side in ("context", "action")}

    @cached_property
    def categorical_at(self) -> dict[str, dict[str, tuple[Categorical, int]]]:
        """Per side ("context", "action"): categorical feature name -> (its encoding, the
        position of its first column), for requests that send strings."""
        features = self.manifest.features
        out: dict[str, dict[str, tuple[Categorical, int]]] = {}
        for side, index in (("context", self.context_index), ("action", self.action_index)):
            out[side] = {c.name: (c, index[c.columns[0]]) for c in features.categorical
                         if c.columns[0] in index}
        return out

    @cached_property
    def action_positions(self) -> dict[str, int]:
        """Fixed action id -> its column in the model's scores (fixed action sets)."""
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
        feeds = self.manifest.policy_kind.feeds(context, action_features)
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
    posterior = None
    try:
        posterior = LinearPosterior.from_npz_bytes(version.read_file("head.npz"))
    except NotFound:
        posterior = None
    except PolicyloopError as exc:
        raise ModelRejected(f"{manifest.policy} v{manifest.version} head.npz: {exc}",
                            "posterior") from exc
    return open_model(data, manifest, posterior, providers=providers, threads=threads)


def open_model(data: bytes, manifest: Manifest, posterior: LinearPosterior | None = None, *,
               providers: list[str], threads: int = 1) -> LoadedModel:
    """Open, verify and warm up an ONNX file that is not (yet) in a registry: the learner
    judges its candidates with exactly the checks serving will make, so a candidate that
    would not load, or scores NaN, is never published."""
    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads),
                                       providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelRejected(f"{manifest.policy} v{manifest.version} does not load: {exc}",
                            "corrupt") from exc
    _check_signature(session, manifest)
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
    kind = m.policy_kind
    rng = np.random.default_rng(0)
    for batch, k in ((1, 20), (8, 5)):
        context = rng.standard_normal((batch, model.context_dim), dtype=np.float32)
        actions = (rng.standard_normal((batch, k, model.action_dim), dtype=np.float32)
                   if kind.per_action_features else None)
        try:
            scores, embedding = model.run(context, actions)
        except Exception as exc:
            raise ModelRejected(f"{m.policy} v{m.version} fails on warm-up input: {exc}",
                                "warmup") from exc
        width = kind.score_width(k, len(m.actions))
        if scores.shape != (batch, width):
            raise ModelRejected(f"{m.policy} v{m.version}: scores shape {scores.shape}, "
                                f"expected {(batch, width)}", "signature")
        if not (np.isfinite(scores).all() and np.isfinite(embedding).all()):
            raise ModelRejected(f"{m.policy} v{m.version}: non-finite outputs on warm-up input",
                                "warmup")
        if model.posterior is not None and embedding.shape[-1] != m.head.dim:
            raise ModelRejected(f"{m.policy} v{m.version}: embedding width "
                                f"{embedding.shape[-1]} != head dim {m.head.dim}", "signature")
