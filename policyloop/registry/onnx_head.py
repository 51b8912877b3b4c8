"""Read and replace the last linear layer of an exported policy, without torch.

The online learner fits the head on the embeddings the served model outputs and writes the new
weights straight into the ONNX graph's initializers, so the published file is self-consistent
(every client, including v2 ``ModelInfer``, sees the refreshed scores). Which initializers hold
the head is recorded at export in the manifest's ``HeadSpec``.
"""

from __future__ import annotations

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.signature import HeadSpec


def _load(model_bytes: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(model_bytes)
    except DecodeError as exc:
        raise InvalidArgument(f"model bytes are not an ONNX model: {exc}") from exc


def _initializers(model: onnx.ModelProto, head: HeadSpec) -> tuple[onnx.TensorProto,
                                                                    onnx.TensorProto]:
    if not head.learnable:
        raise InvalidArgument("the model has no learnable head (docs/model-contract.md)")
    found = {init.name: init for init in model.graph.initializer
             if init.name in (head.weight, head.bias)}
    missing = {head.weight, head.bias} - set(found)
    if missing:
        raise InvalidArgument(f"model has no initializer {sorted(missing)} named by its head")
    return found[head.weight], found[head.bias]


def read_head(model_bytes: bytes, head: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """The head as weight float32[A, H] and bias float32[A] (A = 1 for scoring policies)."""
    model = _load(model_bytes)
    w_init, b_init = _initializers(model, head)
    weight = numpy_helper.to_array(w_init)
    if head.transposed:
        weight = weight.T
    return weight.reshape(-1, head.dim).copy(), numpy_helper.to_array(b_init).reshape(-1).copy()


def replace_head(model_bytes: bytes, head: HeadSpec, weight: np.ndarray,
                 bias: np.ndarray) -> bytes:
    """A copy of the model whose scores are ``embedding @ weight.T + bias``.

    weight [A, H] and bias [A] (A = 1 for scoring policies) are stored as float32, in the
    layout ``head`` records; everything else in the graph is left as it was.
    """
    model = _load(model_bytes)
    w_init, b_init = _initializers(model, head)
    old_w = numpy_helper.to_array(w_init)
    old_b = numpy_helper.to_array(b_init)
    try:
        weight = np.asarray(weight, np.float64)
        bias = np.asarray(bias, np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"head weight and bias must be numeric arrays: {exc}") from exc
    rows = old_w.size // head.dim
    if weight.shape != (rows, head.dim) or bias.shape != (old_b.size,):
        raise InvalidArgument(f"head weight {weight.shape} / bias {bias.shape} do not fit the "
                              f"model's ({rows}, {head.dim}) / ({old_b.size},)")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        new_w = (weight.T if head.transposed else weight).reshape(old_w.shape).astype(np.float32)
        new_b = bias.reshape(old_b.shape).astype(np.float32)
    if not (np.isfinite(new_w).all() and np.isfinite(new_b).all()):
        raise InvalidArgument("head weight and bias must be finite in float32")
    w_init.CopyFrom(numpy_helper.from_array(new_w, w_init.name))
    b_init.CopyFrom(numpy_helper.from_array(new_b, b_init.name))
    return model.SerializeToString()
