"""Small neural-linear ONNX models built without torch, for serving tests.

They follow the signature in ``policyloop/contract/signature.py`` exactly (names, ranks, head
initializers), so the server cannot tell them from exported policies; building them takes
milliseconds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from policyloop.contract.signature import FeatureSchema, HeadSpec, Manifest, TensorSpec

OPSET = 17


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        nodes, "policy", inputs, outputs,
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
           numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def scoring_model(policy: str = "recsys", context_dim: int = 8, action_dim: int = 6,
                  hidden: int = 4, seed: int = 0) -> tuple[bytes, Manifest]:
    """scores[b,k] = tanh(ctx@Wc + act@Wa)[b,k] @ w + bias."""
    rng = np.random.default_rng(seed)
    inits = {"Wc": rng.standard_normal((context_dim, hidden)) / np.sqrt(context_dim),
             "Wa": rng.standard_normal((action_dim, hidden)) / np.sqrt(action_dim),
             "head_w": rng.standard_normal((hidden, 1)), "head_b": rng.standard_normal(1)}
    nodes = [
        helper.make_node("MatMul", ["context", "Wc"], ["hc"]),
        helper.make_node("Unsqueeze", ["hc", "axis1"], ["hc1"]),
        helper.make_node("MatMul", ["action_features", "Wa"], ["ha"]),
        helper.make_node("Add", ["ha", "hc1"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head_w"], ["s3"]),
        helper.make_node("Add", ["s3", "head_b"], ["s3b"]),
        helper.make_node("Squeeze", ["s3b", "axis2"], ["scores"]),
    ]
    inputs = [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["B", context_dim]),
              helper.make_tensor_value_info("action_features", TensorProto.FLOAT,
                                            ["B", "K", action_dim])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "K"]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", "K", hidden])]
    manifest = Manifest(
        policy=policy, kind="scoring",
        features=FeatureSchema(context=tuple(f"user_{i}" for i in range(context_dim)),
                               action=tuple(f"item_{i}" for i in range(action_dim))),
        inputs=(TensorSpec("context", "float32", (-1, context_dim)),
                TensorSpec("action_features", "float32", (-1, -1, action_dim))),
        outputs=(TensorSpec("scores", "float32", (-1, -1)),
                 TensorSpec("embedding", "float32", (-1, -1, hidden))),
        head=HeadSpec(weight="head_w", bias="head_b", dim=hidden, transposed=True),
        opset=OPSET)
    return _model(nodes, inputs, outputs, inits), manifest


def qnet_model(policy: str = "routing", context_dim: int = 5, n_actions: int = 3,
               hidden: int = 4, seed: int = 0, activation: str = "Tanh"
               ) -> tuple[bytes, Manifest]:
    """scores[b,a] = tanh(ctx@Wc)[b] @ W[:,a] + bias[a] (``activation="Identity"``: an
    unbounded body, whose scores overflow for huge inputs)."""
    rng = np.random.default_rng(seed)
    inits = {"Wc": rng.standard_normal((context_dim, hidden)) / np.sqrt(context_dim),
             "head_w": rng.standard_normal((hidden, n_actions)),
             "head_b": rng.standard_normal(n_actions)}
    nodes = [
        helper.make_node("MatMul", ["context", "Wc"], ["hc"]),
        helper.make_node(activation, ["hc"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head_w"], ["s"]),
        helper.make_node("Add", ["s", "head_b"], ["scores"]),
    ]
    inputs = [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["B", context_dim])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", n_actions]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", hidden])]
    manifest = Manifest(
        policy=policy, kind="qnet",
        features=FeatureSchema(context=tuple(f"ticket_{i}" for i in range(context_dim))),
        inputs=(TensorSpec("context", "float32", (-1, context_dim)),),
        outputs=(TensorSpec("scores", "float32", (-1, n_actions)),
                 TensorSpec("embedding", "float32", (-1, hidden))),
        head=HeadSpec(weight="head_w", bias="head_b", dim=hidden, transposed=True),
        actions=tuple(f"queue-{a}" for a in range(n_actions)), opset=OPSET)
    return _model(nodes, inputs, outputs, inits), manifest
