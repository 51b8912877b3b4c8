"""A policy's first version, built from its spec with no data: an ONNX graph with the
neural-linear contract whose body is fixed features and whose head starts at zero.

Fixed action set: the embedding is the context itself, ``embedding [B, Dc]``, with one head
row per action, so each action learns its own linear reward model (disjoint LinUCB).
Ranking: each candidate's embedding is ``[a, c, vec(c a^T)]`` [B, K, Da + Dc + Dc*Da]: the
candidate's features, the context's, and every context-by-candidate product (what Vowpal
Wabbit's ``-q`` adds), so a shared linear head can learn which items suit which users, not only
which items are good (``interactions = false`` leaves the products out).

The posterior shipped beside it is the learner's own prior (``online/linear.py`` with no data):
mean 0, covariance ``0.25 / prior * I`` (0.25 bounds a 0/1 reward's variance), so UCB and
Thompson sampling explore from the first request and the learner continues from exactly this
state.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import HeadSpec, Manifest, PolicyDefaults
from policyloop.contract.spec import PolicySpec

OPSET = 17
NOISE_VARIANCE = 0.25  # the learner's noise variance before it has seen two examples


def embedding_width(spec: PolicySpec) -> int:
    """H, the width of the embedding the head reads."""
    dc, da = len(spec.features.context), len(spec.features.action)
    if not spec.policy_kind.per_action_features:
        return dc
    return da + dc + (dc * da if spec.model.interactions else 0)


def cold_start(spec: PolicySpec, *, prior: float = 1.0) -> tuple[bytes, Manifest,
                                                                   LinearPosterior]:
    """The ONNX file, manifest and posterior of ``spec``'s version 1."""
    if not prior > 0:
        raise InvalidArgument(f"prior must be > 0, got {prior!r}")
    kind = spec.policy_kind
    dc, da, n = len(spec.features.context), len(spec.features.action), len(spec.actions)
    h = embedding_width(spec)
    rows = kind.head_rows(n)
    graph = _ranking_graph(dc, da, h, spec.model.interactions) if kind.per_action_features \
        else _actions_graph(dc, n)
    inputs, outputs = kind.signature(context_dim=dc, action_dim=da, n_actions=n, head_dim=h)
    manifest = Manifest(
        policy=spec.name, kind=spec.kind, features=spec.features, inputs=inputs,
        outputs=outputs, head=HeadSpec(weight="head_w", bias="head_b", dim=h, transposed=True),
        opset=OPSET, actions=spec.actions, defaults=created_defaults(spec),
        training={"cold_start": True, "model": spec.model.type,
                  "interactions": spec.model.interactions, "prior": prior})
    return graph, manifest, prior_posterior(np.zeros((rows, h)), np.zeros(rows), prior=prior)


FROM_NOTHING_STRATEGY = "ucb:1"


def created_defaults(spec: PolicySpec) -> PolicyDefaults:
    """The spec's defaults, exploring with UCB at alpha 1 on the version's posterior where it
    names no strategy: from nothing, at the learner's default cadence and with serve's pending
    decisions (each decision narrows the served posterior, each reward moves it), it had the
    best mean progressive reward of serving's strategies over the four streams of
    bench/bandit_bench.py (README Learning from nothing: 0.701, against 0.696 at alpha 2, 0.661
    for Thompson sampling and 0.660 for the growing SquareCB) and beat Vowpal Wabbit's best
    setting on each of them. It logs propensity 1: a user who wants to evaluate other policies
    offline on these logs names a randomised strategy (``ucb:1:0.05``, ``squarecb``) in the
    spec."""
    if spec.defaults.strategy:
        return spec.defaults
    return replace(spec.defaults, strategy=FROM_NOTHING_STRATEGY)


def prior_posterior(weight: np.ndarray, bias: np.ndarray, *, prior: float) -> LinearPosterior:
    """The learner's prior around a head, weight [A, H] and bias [A] (A = 1: one head shared
    by every candidate): mean the head, covariance ``0.25 / prior * I`` per head row, noise
    variance 0.25 (the learner's before its first example)."""
    rows, h = weight.shape
    covariance = NOISE_VARIANCE / prior * np.eye(h)
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64).reshape(rows)
    noise = np.full(rows, NOISE_VARIANCE)
    if rows == 1:
        return LinearPosterior(w[0], covariance, b, noise)
    return LinearPosterior(w, np.broadcast_to(covariance, (rows, h, h)).copy(), b, noise)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(nodes, "policy", inputs, outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="policyloop create")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _actions_graph(dc: int, n_actions: int) -> bytes:
    nodes = [helper.make_node("Identity", ["context"], ["embedding"]),
             helper.make_node("MatMul", ["embedding", "head_w"], ["raw"]),
             helper.make_node("Add", ["raw", "head_b"], ["scores"])]
    inputs = [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", dc])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_actions]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dc])]
    return _model(nodes, inputs, outputs, {"head_w": np.zeros((dc, n_actions), np.float32),
                                           "head_b": np.zeros(n_actions, np.float32)})


def _ranking_graph(dc: int, da: int, h: int, interactions: bool) -> bytes:
    nodes = [
        # the context repeated for every candidate: [B, K, Dc]
        helper.make_node("Shape", ["action_features"], ["a_shape"]),
        helper.make_node("Slice", ["a_shape", "zero", "two"], ["bk"]),
        helper.make_node("Concat", ["bk", "dc"], ["bkc"], axis=0),
        helper.make_node("Unsqueeze", ["context", "one"], ["c1"]),
        helper.make_node("Expand", ["c1", "bkc"], ["c_each"]),
    ]
    parts = ["action_features", "c_each"]
    if interactions:
        nodes += [helper.make_node("Einsum", ["context", "action_features"], ["outer"],
                                   equation="bc,bkd->bkcd"),
                  helper.make_node("Reshape", ["outer", "flat"], ["products"])]
        parts.append("products")
    nodes += [helper.make_node("Concat", parts, ["embedding"], axis=2),
              helper.make_node("MatMul", ["embedding", "head_w"], ["raw"]),
              helper.make_node("Add", ["raw", "head_b"], ["raw_b"]),
              helper.make_node("Squeeze", ["raw_b", "two_axis"], ["scores"])]
    inputs = [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", dc]),
              helper.make_tensor_value_info("action_features", TensorProto.FLOAT,
                                            ["batch", "candidates", da])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                             ["batch", "candidates"]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                             ["batch", "candidates", h])]
    inits: dict[str, np.ndarray] = {
        "head_w": np.zeros((h, 1), np.float32), "head_b": np.zeros(1, np.float32),
        "zero": np.array([0], np.int64), "two": np.array([2], np.int64),
        "one": np.array([1], np.int64), "two_axis": np.array([2], np.int64),
        "dc": np.array([dc], np.int64), "flat": np.array([0, 0, dc * da], np.int64)}
    return _model(nodes, inputs, outputs, inits)
