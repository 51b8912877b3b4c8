"""ONNX export with a proven match between torch and onnxruntime, and registration.

The exporter is pinned to the TorchScript-based one (``dynamo=False``) at opset ``OPSET``: it
keeps the head's weights as named initializers, which the online learner rewrites. Every export
runs both runtimes on random inputs of several batch sizes and candidate counts and on rows of
the data the model was trained on (an app's log, or a simulator's logs); any output differing
by more than ``TOLERANCE`` fails the export. The head's posterior is fitted to the same rows.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from models.policies import PolicyNetwork
from policyloop.contract.errors import ExportParityError, InvalidArgument
from policyloop.contract.kinds import PolicyKind
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import HeadSpec, Manifest, PolicyDefaults, TensorSpec
from policyloop.registry.interface import ModelVersion, Registry, open_registry
from policyloop.simulators.logged import LoggedBandit, collect_logs
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-5
SIMULATED_ROWS = 4000  # rows of a simulator's logs that stand for its data

Source = RecsysEnv | RoutingEnv | LoggedBandit


def logged_data(source: Source, *, seed: int, n: int = SIMULATED_ROWS) -> LoggedBandit:
    """The rows an export checks parity on and fits the posterior to: the data itself, or n
    rows a simulator logs under its heuristic policy (seeded)."""
    if isinstance(source, LoggedBandit):
        if source.features is None:
            raise InvalidArgument("export: the data must name its features "
                                  "(LoggedBandit.features)")
        return source
    return collect_logs(source, n, seed=seed)


def _to_onnx(model: PolicyNetwork) -> bytes:
    inputs, _ = _signature(model, model.config.embedding_dim)
    return torch_to_onnx(model, model.example_inputs(2, 3), [spec.name for spec in inputs],
                         model.dynamic_axes)


def torch_to_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
                  axes: dict[str, dict[int, str]]) -> bytes:
    """The pinned exporter, for the built-in networks and users' own modules alike."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the pinned exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, buffer,  # type: ignore[arg-type]  # a file object works
                          input_names=names,
                          output_names=["scores", "embedding"], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return buffer.getvalue()


def _signature(model: PolicyNetwork, head_dim: int
               ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    cfg = model.config
    return model.kind.signature(context_dim=cfg.context_dim, action_dim=cfg.action_dim,
                                n_actions=cfg.n_actions, head_dim=head_dim)


def find_head(model_bytes: bytes, model: PolicyNetwork) -> HeadSpec:
    """Which initializers hold ``model.head``, found by value: the exporter renames them and
    may store the weight transposed (a 3-D MatMul reads [H, A]; a Gemm reads [A, H]).
    Exactly one initializer must match each, else the learner could not refresh the head."""
    return head_by_value(model_bytes, model.head.weight.detach().numpy(),
                         model.head.bias.detach().numpy())


def head_by_value(model_bytes: bytes, weight: np.ndarray, bias: np.ndarray) -> HeadSpec:
    """The HeadSpec of the one weight [A, H] (or its transpose) and the one bias [A] stored
    in the graph with exactly these values; ExportParityError unless each is unique."""
    weights: list[tuple[str, bool]] = []
    biases: list[str] = []
    for init in onnx.load_from_string(model_bytes).graph.initializer:
        value = numpy_helper.to_array(init)
        if value.shape == weight.shape and np.array_equal(value, weight):
            weights.append((init.name, False))
        elif value.shape == weight.T.shape and np.array_equal(value, weight.T):
            weights.append((init.name, True))
        elif value.shape == bias.shape and np.array_equal(value, bias):
            biases.append(init.name)
    if len(weights) != 1 or len(biases) != 1:
        raise ExportParityError(
            f"the exported graph must keep the head as one weight and one bias initializer; "
            f"found weights {[w for w, _ in weights]} and biases {biases}")
    (w_name, transposed), = weights
    return HeadSpec(weight=w_name, bias=biases[0], dim=weight.shape[1], transposed=transposed)


def check_parity(model: PolicyNetwork, model_bytes: bytes, real_inputs: list[tuple[np.ndarray,
                                                                             np.ndarray | None]],
                 *, seed: int = 0) -> float:
    """Largest |torch - onnxruntime| over random and real inputs; raises beyond TOLERANCE."""
    cfg = model.config
    return parity(model, model.kind, model_bytes, context_dim=cfg.context_dim,
                  action_dim=cfg.action_dim, real_inputs=real_inputs, seed=seed)


def parity(module: torch.nn.Module, policy_kind: PolicyKind, model_bytes: bytes, *,
           context_dim: int, action_dim: int,
           real_inputs: Sequence[tuple[np.ndarray, np.ndarray | None]] = (),
           seed: int = 0) -> float:
    """``check_parity`` for any module taking the kind's inputs and returning (scores,
    embedding): random inputs of several batch sizes and candidate counts, then
    ``real_inputs``."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for batch, k in ((1, 1), (1, 20), (7, 5), (64, 33)):
        ctx = rng.standard_normal((batch, context_dim), dtype=np.float32)
        act = (rng.standard_normal((batch, k, action_dim), dtype=np.float32)
               if policy_kind.per_action_features else None)
        cases.append((f"random batch={batch} k={k}", ctx, act))
    cases += [("logged", ctx, act) for ctx, act in real_inputs]
    worst = 0.0
    for kind, ctx, act in cases:
        feeds = policy_kind.feeds(ctx, act)
        got = session.run(["scores", "embedding"], feeds)
        with torch.no_grad():
            args = (torch.from_numpy(ctx),) if act is None else (torch.from_numpy(ctx),
                                                                  torch.from_numpy(act))
            want = [t.numpy() for t in module(*args)]
        for name, g, w in zip(("scores", "embedding"), got, want, strict=True):
            if g.shape != w.shape:
                raise ExportParityError(f"{name} shape {g.shape} != torch {w.shape} ({kind})")
            diff = float(np.max(np.abs(g - w))) if g.size else 0.0
            if not diff <= TOLERANCE:
                raise ExportParityError(f"{name} differs by {diff:.3g} > {TOLERANCE} on {kind} "
                                        "inputs")
            worst = max(worst, diff)
    return worst


def initial_posterior(model: PolicyNetwork, source: Source, *, seed: int,
                      n: int = SIMULATED_ROWS, prior: float = 1.0) -> LinearPosterior:
    """A Gaussian posterior for the head from a Bayesian linear regression on embeddings of
    the logged rows (``logged_data``: every row of data, n of a simulator's), centred on the
    trained head (so UCB/Thompson start from the offline policy's scores, with uncertainty
    that shrinks where data was seen)."""
    data = logged_data(source, seed=seed, n=n)
    n = len(data)
    with torch.no_grad():
        ctx = torch.from_numpy(data.context)
        if model.kind.per_action_features:
            _, emb = model(ctx, torch.from_numpy(data.action_features))
            phi = emb[torch.arange(n), torch.from_numpy(data.action)].numpy().astype(np.float64)
        else:
            _, emb = model(ctx)
            phi = emb.numpy().astype(np.float64)
    weight = model.head.weight.detach().numpy().astype(np.float64)
    bias = model.head.bias.detach().numpy().astype(np.float64)
    h = phi.shape[1]

    def cov_of(rows: np.ndarray, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
        residual = data.reward[rows] - (phi[rows] @ w + b)
        noise = max(float(np.var(residual)) if len(rows) > 1 else 0.25, 1e-3)
        precision = prior * np.eye(h) + phi[rows].T @ phi[rows] / noise
        return np.linalg.inv(precision), noise

    if model.kind.head_rows(len(weight)) == 1:  # one head shared by every candidate
        cov, noise = cov_of(np.arange(n), weight[0], bias[0])
        return LinearPosterior(weight[0], cov, bias, np.array([noise]))
    heads = [cov_of(np.flatnonzero(data.action == a), weight[a], bias[a])
             for a in range(len(weight))]
    return LinearPosterior(weight, np.stack([c for c, _ in heads]), bias,
                           np.array([noise for _, noise in heads]))


def export_onnx(model: PolicyNetwork, source: Source, *, policy: str,
                training: dict[str, Any], parent_version: int | None = None,
                seed: int = 0, defaults: PolicyDefaults | None = None,
                ) -> tuple[bytes, Manifest]:
    """Export, check parity (also on the first rows of ``logged_data(source)``), and describe
    the model with the data's feature names and actions; raises ExportParityError."""
    model.eval()
    cfg = model.config
    logs = logged_data(source, seed=seed + 2)
    data = _to_onnx(model)
    head = find_head(data, model)
    af = logs.action_features
    real = [(logs.context[:batch], None if af is None else af[:batch]) for batch in (1, 32)]
    worst = check_parity(model, data, real, seed=seed)
    assert logs.features is not None  # logged_data checked
    schema = replace(logs.features, context=tuple(logs.features.context),
                     action=tuple(logs.features.action))
    inputs, outputs = _signature(model, head.dim)
    actions = () if model.kind.per_action_features else logs.actions
    manifest = Manifest(
        policy=policy, kind=cfg.kind, features=schema, inputs=inputs, outputs=outputs,
        head=head, opset=OPSET, actions=actions, parent_version=parent_version,
        defaults=defaults or PolicyDefaults(),
        training={**training, "parity_max_abs_diff": worst, "network": cfg.to_dict()})
    log.info("exported %s: parity max |diff| %.2e", policy, worst)
    return data, manifest


def export_and_register(model: PolicyNetwork, source: Source, registry: Registry,
                        *, policy: str, training: dict[str, Any],
                        seed: int = 0, defaults: PolicyDefaults | None = None,
                        ) -> ModelVersion:
    """Export with the parity check and publish with the head's posterior, both on the rows of
    ``source``: the data trained on, or (a simulator) its logs. ``defaults``: the spec's
    exploration and reward contract, carried by the version."""
    logs = logged_data(source, seed=seed + 2)
    data, manifest = export_onnx(model, logs, policy=policy, training=training, seed=seed,
                                 defaults=defaults)
    posterior = initial_posterior(model, logs, seed=seed + 2)
    return registry.publish(policy, data, manifest, {"head.npz": posterior.to_npz_bytes()})


def export_command(checkpoint: Path, *, registry: Path, policy: str | None,
                   out: Path | None, registry_kafka: str = "") -> int:
    """``policyloop export``: checkpoint -> parity-checked ONNX -> registry (and ``out``);
    with ``registry_kafka`` the Kafka-backed registry, cached in ``registry``."""
    from models.training import load_checkpoint, make_env

    model, scenario, env_kwargs, training = load_checkpoint(checkpoint)
    name = policy or scenario
    target = open_registry(registry, kafka=registry_kafka)
    try:
        version = export_and_register(model, make_env(scenario, **env_kwargs), target,
                                      policy=name, training=training)
    finally:
        target.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.onnx").write_bytes(version.read_model())
        (out / "manifest.json").write_text(version.manifest.to_json())
    print(json.dumps({"policy": name, "version": version.version,
                      "parity_max_abs_diff": version.manifest.training["parity_max_abs_diff"],
                      "path": str(version.path)}))
    return 0
