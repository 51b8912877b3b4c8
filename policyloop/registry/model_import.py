"""A model the user made, checked against its policy spec: the contract of
``docs/model-contract.md``, enforced before anything is published.

``import_onnx`` reads an ONNX file, refuses one that breaks the contract with one line naming
the input, output or initializer, finds the learnable head (the last linear layer, which the
online learner rewrites), opens the file with serving's own checks (``open_model``: warm-up,
finite outputs, shapes) and returns what ``Registry.publish`` takes. Both ways in use it:
``policyloop import MODEL.onnx --spec SPEC`` and the torch API ``models/own_model.py``.

The head is found in this order:

1. by name (``head_weight``, ``head_bias``): both must be initializers, or the file is refused;
2. by structure: ``scores`` (through Identity, Squeeze, Reshape or Flatten) is produced by a
   ``Gemm(embedding, W, b)`` or an ``Add`` of an initializer ``b`` and ``MatMul(embedding, W)``,
   with ``W`` and ``b`` initializers no other node reads.

Either way the head must control the scores: ``scores == embedding @ weight.T + bias`` on the
model's own outputs, and still after the head is replaced by random values (what the learner
will do). A head named explicitly that fails this is refused; a model where none is found is
imported without one (``HeadSpec.learnable`` false): served with greedy, epsilon-greedy or
softmax exploration, never refreshed. A model with no ``embedding`` output gets a zero-width
one ([B, 0] or [B, K, 0]) added to its graph, so every stage reads the same two outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from policyloop.contract.errors import InvalidArgument, ModelRejected
from policyloop.contract.kinds import PolicyKind
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import HeadSpec, Manifest, TensorSpec
from policyloop.contract.spec import PolicySpec
from policyloop.registry.cold_start import prior_posterior
from policyloop.registry.onnx_head import read_head, replace_head
from policyloop.registry.onnx_model import open_model

HEAD_TOLERANCE = 1e-4  # |scores - (embedding @ weight.T + bias)|, relative to the scores' scale
_PASS_THROUGH = ("Identity", "Squeeze", "Reshape", "Flatten")
_DTYPES: dict[int, str] = {TensorProto.FLOAT: "float32"}
_NO_EMBEDDING = "policyloop_no_embedding"
_ANY = -2  # an axis the spec does not fix (the embedding's width); -1 marks a dynamic axis


@dataclass(frozen=True)
class Imported:
    """A checked model: the ONNX bytes to publish (with a zero-width ``embedding`` added when
    it had none), its manifest, the posterior ``head.npz`` holds (None without a head), and
    why it has no head (empty when it has one)."""

    model: bytes
    manifest: Manifest
    posterior: LinearPosterior | None
    no_head_reason: str = ""

    @property
    def extras(self) -> dict[str, bytes]:
        """The files published beside the model."""
        return {} if self.posterior is None else {"head.npz": self.posterior.to_npz_bytes()}


def import_onnx(data: bytes, spec: PolicySpec, *, head_weight: str = "", head_bias: str = "",
                prior: float = 1.0, training: dict[str, Any] | None = None) -> Imported:
    """Check ``data`` against ``spec``; InvalidArgument names what breaks the contract."""
    if not prior > 0:
        raise InvalidArgument(f"prior must be > 0, got {prior!r}")
    if bool(head_weight) != bool(head_bias):
        raise InvalidArgument("--head-weight and --head-bias name the head together; give both")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError) as exc:
        raise InvalidArgument(f"not an ONNX model: {exc}") from exc
    kind = spec.policy_kind
    dc, da, n = len(spec.features.context), len(spec.features.action), len(spec.actions)
    want_in, want_out = kind.signature(context_dim=dc, action_dim=da, n_actions=n,
                                       head_dim=_ANY)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    _check_inputs([i for i in graph.input if i.name not in inits], want_in)
    outputs = {o.name: o for o in graph.output}
    scores_spec, embedding_spec = want_out
    if "scores" not in outputs:
        raise InvalidArgument(f"output 'scores' missing; outputs are {sorted(outputs)}")
    _check_tensor("output", outputs["scores"], scores_spec)
    if "embedding" in outputs:
        _check_tensor("output", outputs["embedding"], embedding_spec)
    elif head_weight:
        raise InvalidArgument("output 'embedding' missing: the head --head-weight names reads "
                              "the embedding")
    else:
        _add_empty_embedding(model, kind)
        data = model.SerializeToString()

    scores, embedding = _run(data, kind, dc, da)
    h = int(embedding.shape[-1])
    head, reason = _find_head(model, inits, kind.head_rows(n), h, head_weight, head_bias)
    if head is not None:
        reason = _head_controls_scores(data, kind, dc, da, head, scores, embedding)
        if reason and head_weight:
            raise InvalidArgument(f"initializer {head.weight!r} and {head.bias!r} are no head "
                                  f"of the scores: {reason}")
        head = None if reason else head
    inputs, out_specs = kind.signature(context_dim=dc, action_dim=da, n_actions=n, head_dim=h)
    manifest = Manifest(
        policy=spec.name, kind=spec.kind, features=spec.features, inputs=inputs,
        outputs=out_specs, head=head or HeadSpec(weight="", bias="", dim=h),
        opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                  default=0),
        actions=spec.actions, defaults=spec.defaults,
        training={**(training or {}), "imported": True, "prior": prior,
                  **({"no_head": reason} if head is None else {})})
    posterior = None
    if head is not None:
        weight, bias = read_head(data, head)
        posterior = prior_posterior(weight, bias, prior=prior)
    try:  # serving's own checks, so what is published here is what a server accepts
        open_model(data, manifest, posterior, providers=["CPUExecutionProvider"])
    except ModelRejected as exc:
        raise InvalidArgument(f"serving's checks refuse it: {exc}") from exc
    return Imported(data, manifest, posterior, reason if head is None else "")


def _check_inputs(got: list[onnx.ValueInfoProto], want: tuple[TensorSpec, ...]) -> None:
    names = {i.name: i for i in got}
    for spec in want:
        if spec.name not in names:
            raise InvalidArgument(f"input {spec.name!r} missing; the model's inputs are "
                                  f"{sorted(names)}")
        _check_tensor("input", names[spec.name], spec)
    extra = sorted(set(names) - {s.name for s in want})
    if extra:
        raise InvalidArgument(f"input {extra[0]!r} is not in the contract; a "
                              f"{'ranking' if len(want) == 2 else 'fixed-action'} policy takes "
                              f"{[s.name for s in want]}")


def _check_tensor(what: str, value: onnx.ValueInfoProto, spec: TensorSpec) -> None:
    tensor = value.type.tensor_type
    dtype = _DTYPES.get(tensor.elem_type,
                        TensorProto.DataType.Name(tensor.elem_type).lower())
    if dtype != spec.dtype:
        raise InvalidArgument(f"{what} {spec.name!r} is {dtype}, the contract says {spec.dtype}")
    if not tensor.HasField("shape"):
        return  # no shape declared: the warm-up runs decide
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if len(dims) != len(spec.shape):
        raise InvalidArgument(f"{what} {spec.name!r} has rank {len(dims)}, the contract says "
                              f"{len(spec.shape)} {_shape(spec.shape)}")
    for axis, (got, want) in enumerate(zip(dims, spec.shape, strict=True)):
        if want == -1 and got != -1:
            raise InvalidArgument(f"{what} {spec.name!r} axis {axis} is fixed at {got}; the "
                                  f"contract says {_shape(spec.shape)} (the batch and candidate "
                                  "axes must be dynamic)")
        if want >= 0 and got not in (-1, want):
            raise InvalidArgument(f"{what} {spec.name!r} axis {axis} is {got}, the spec implies "
                                  f"{want}: {_shape(spec.shape)}")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join({-1: "?", _ANY: "H"}.get(d, str(d)) for d in shape) + "]"


def _add_empty_embedding(model: onnx.ModelProto, kind: PolicyKind) -> None:
    """``embedding`` float32[B, 0] (fixed actions) or [B, K, 0] (ranking), from the scores'
    shape: a model without one has nothing a head could read."""
    p = _NO_EMBEDDING
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{p}_zero"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{p}_one")])
    nodes = [helper.make_node("Shape", ["scores"], [f"{p}_shape"])]
    lead = f"{p}_shape"
    if not kind.per_action_features:
        nodes.append(helper.make_node("Slice", [lead, f"{p}_zero", f"{p}_one"], [f"{p}_batch"]))
        lead = f"{p}_batch"
    nodes += [helper.make_node("Concat", [lead, f"{p}_zero"], [f"{p}_dims"], axis=0),
              helper.make_node("ConstantOfShape", [f"{p}_dims"], ["embedding"],
                               value=helper.make_tensor(f"{p}_value", TensorProto.FLOAT, [1],
                                                        [0.0]))]
    graph.node.extend(nodes)
    dims: list[str | int] = ["batch", "candidates", 0] if kind.per_action_features else ["batch", 0]
    graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, dims))


def _inputs(kind: PolicyKind, dc: int, da: int, batch: int, k: int,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    context = rng.standard_normal((batch, dc), dtype=np.float32)
    actions = (rng.standard_normal((batch, k, da), dtype=np.float32)
               if kind.per_action_features else None)
    return kind.feeds(context, actions)


def _run(data: bytes, kind: PolicyKind, dc: int, da: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and embedding on spec-shaped random inputs (batch 3, 4 candidates)."""
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise InvalidArgument(f"onnxruntime cannot load it: {exc}") from exc
    try:
        scores, embedding = session.run(["scores", "embedding"],
                                        _inputs(kind, dc, da, 3, 4, np.random.default_rng(0)))
    except Exception as exc:
        raise InvalidArgument(f"fails on spec-shaped input: {exc}") from exc
    for name, value in (("scores", scores), ("embedding", embedding)):
        if not np.isfinite(value).all():
            raise InvalidArgument(f"output {name!r} is not finite on spec-shaped random input")
    return np.asarray(scores), np.asarray(embedding)


def _find_head(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], rows: int, h: int,
               weight: str, bias: str) -> tuple[HeadSpec | None, str]:
    """The head by name (a missing initializer is refused) or by structure (None and why)."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    if weight:
        for flag, name in (("--head-weight", weight), ("--head-bias", bias)):
            if name not in inits:
                raise InvalidArgument(f"initializer {name!r} named by {flag} does not exist")
        transposed = _transposed(readers.get(weight, []), weight,
                                 numpy_helper.to_array(inits[weight]).shape, rows, h)
        if transposed is None:
            raise InvalidArgument(f"initializer {weight!r}: its layout is neither [{rows}, {h}] "
                                  f"nor [{h}, {rows}] read by a MatMul or Gemm")
        spec = HeadSpec(weight=weight, bias=bias, dim=h, transposed=transposed)
        reason = _fits(spec, inits, rows, h)
        if reason:
            raise InvalidArgument(reason)
        return spec, ""
    found = _by_structure(graph, inits)
    if found is None:
        return None, ("scores is not a Gemm, or a MatMul plus Add, of embedding and two "
                      "initializers")
    spec = HeadSpec(weight=found[0], bias=found[1], dim=h, transposed=found[2])
    shared = [n for n in (spec.weight, spec.bias) if len(readers.get(n, [])) != 1]
    if shared:
        return None, f"initializer {shared[0]!r} is read by more than the head"
    return (None, reason) if (reason := _fits(spec, inits, rows, h)) else (spec, "")


def _transposed(readers: list[onnx.NodeProto], weight: str, shape: tuple[int, ...], rows: int,
                h: int) -> bool | None:
    for node in readers:
        if node.op_type == "MatMul" and list(node.input).index(weight) == 1:
            return True
        if node.op_type == "Gemm" and list(node.input).index(weight) == 1:
            return not _attr(node, "transB", 0)
    if shape == (rows, h) and rows != h:
        return False
    if shape == (h, rows) and rows != h:
        return True
    return None


def _fits(head: HeadSpec, inits: dict[str, onnx.TensorProto], rows: int, h: int) -> str:
    w = numpy_helper.to_array(inits[head.weight])
    b = numpy_helper.to_array(inits[head.bias])
    want = (h, rows) if head.transposed else (rows, h)
    if w.shape != want:
        return f"initializer {head.weight!r} is {list(w.shape)}, the head needs {list(want)}"
    if b.size != rows:
        return f"initializer {head.bias!r} has {b.size} values, the head needs {rows}"
    if w.dtype != np.float32 or b.dtype != np.float32:
        return f"initializers {head.weight!r} and {head.bias!r} must be float32"
    return ""


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(helper.get_attribute_value(a))
    return default


def _by_structure(graph: onnx.GraphProto,
                  inits: dict[str, onnx.TensorProto]) -> tuple[str, str, bool] | None:
    producer = {out: node for node in graph.node for out in node.output}

    def origin(name: str) -> str:  # through Identity nodes
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    embedding = origin("embedding")
    node = producer.get("scores")
    for _ in range(4):
        if node is None or node.op_type not in _PASS_THROUGH:
            break
        node = producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Gemm" and len(node.input) == 3:
        a, w, b = node.input
        if (origin(a) == embedding and w in inits and b in inits and not _attr(node, "transA", 0)
                and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0):
            return w, b, not _attr(node, "transB", 0)
    if node.op_type == "Add":
        for b, other in (node.input, reversed(node.input)):
            matmul = producer.get(other)
            if b in inits and matmul is not None and matmul.op_type == "MatMul":
                x, w = matmul.input
                if origin(x) == embedding and w in inits:
                    return w, b, True
    return None


def _head_controls_scores(data: bytes, kind: PolicyKind, dc: int, da: int, head: HeadSpec,
                          scores: np.ndarray, embedding: np.ndarray) -> str:
    """Empty when ``scores == embedding @ weight.T + bias`` holds for the model's own head and
    for a random one written in its place; else what differs."""
    weight, bias = read_head(data, head)
    rng = np.random.default_rng(1)
    trial = replace_head(data, head, rng.standard_normal(weight.shape),
                         rng.standard_normal(bias.shape))
    for label, (w, b), (s, e) in (
            ("its own head", (weight, bias), (scores, embedding)),
            ("a replaced head", read_head(trial, head), _run(trial, kind, dc, da))):
        want = (e @ w[0] + b[0]) if kind.per_action_features else (e @ w.T + b)
        if s.shape != want.shape:
            return f"scores {list(s.shape)} != embedding @ weight.T + bias {list(want.shape)}"
        scale = 1.0 + float(np.max(np.abs(want))) if want.size else 1.0
        diff = float(np.max(np.abs(s - want))) if s.size else 0.0
        if not diff <= HEAD_TOLERANCE * scale:
            return (f"with {label}, scores differ from embedding @ weight.T + bias by "
                    f"{diff:.3g}")
    return ""
