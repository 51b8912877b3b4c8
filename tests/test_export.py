"""ONNX export matches torch within 1e-5 or fails loudly; the head can be replaced without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import export
from models.policies import QNetwork, ScoringNetwork
from policyloop.contract.errors import ExportParityError, InvalidArgument
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import TensorSpec
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_head import read_head, replace_head
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv


def _models():
    torch.manual_seed(0)
    recsys = RecsysEnv(n_items=100)
    routing = RoutingEnv()
    return [(ScoringNetwork(16, 16), recsys), (QNetwork(len(routing.feature_schema.context), 8),
                                               routing)]


@pytest.mark.parametrize("model, env", _models(), ids=["scoring", "qnet"])
def test_export_matches_torch_and_describes_the_model(model, env) -> None:
    data, manifest = export.export_onnx(model, env, policy="p", training={"note": "t"})
    assert manifest.training["parity_max_abs_diff"] <= export.TOLERANCE
    assert manifest.opset == export.OPSET == onnx.load_from_string(data).opset_import[0].version
    assert manifest.training["note"] == "t"
    assert manifest.training["network"] == model.config.to_dict()
    assert manifest.features == env.feature_schema and manifest.policy == "p"
    h, dc = model.config.embedding_dim, model.config.context_dim
    if manifest.kind == "scoring":
        da = model.config.action_dim
        assert manifest.inputs == (TensorSpec("context", "float32", (-1, dc)),
                                   TensorSpec("action_features", "float32", (-1, -1, da)))
        assert manifest.outputs == (TensorSpec("scores", "float32", (-1, -1)),
                                    TensorSpec("embedding", "float32", (-1, -1, h)))
    else:
        a = model.config.n_actions
        assert manifest.inputs == (TensorSpec("context", "float32", (-1, dc)),)
        assert manifest.outputs == (TensorSpec("scores", "float32", (-1, a)),
                                    TensorSpec("embedding", "float32", (-1, h)))
    graph = onnx.load_from_string(data).graph
    assert [i.name for i in graph.input] == [t.name for t in manifest.inputs]
    assert [o.name for o in graph.output] == [t.name for t in manifest.outputs]
    assert manifest.head.dim == h
    assert {manifest.head.weight, manifest.head.bias} <= {i.name for i in graph.initializer}
    session = ort.InferenceSession(data)
    ctx, act, _ = env.sample_contexts(9, np.random.default_rng(3))  # dynamic batch of 9
    feeds = {"context": ctx} if act is None else {"context": ctx, "action_features": act}
    scores, _ = session.run(["scores", "embedding"], feeds)
    assert scores.shape == (9, env.action_space.n)
    if manifest.kind == "scoring":
        scores, _ = session.run(None, {"context": ctx, "action_features": act[:, :4]})
        assert scores.shape == (9, 4)  # dynamic candidate count
    else:
        assert manifest.actions == env.action_names


def test_a_mismatching_export_fails_loudly(monkeypatch) -> None:
    model, env = _models()[0]
    real_to_onnx = export._to_onnx

    def perturbed(m):  # an exporter bug: one body weight is off by 1e-3
        proto = onnx.load_from_string(real_to_onnx(m))
        head = export.find_head(proto.SerializeToString(), m)
        init = next(i for i in proto.graph.initializer if i.name not in (head.weight, head.bias)
                    and onnx.numpy_helper.to_array(i).dtype == np.float32)
        arr = onnx.numpy_helper.to_array(init) + np.float32(1e-3)
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return proto.SerializeToString()

    monkeypatch.setattr(export, "_to_onnx", perturbed)
    with pytest.raises(ExportParityError, match="differs by .* > 1e-05"):
        export.export_onnx(model, env, policy="p", training={})


@pytest.mark.parametrize("model, env", _models(), ids=["scoring", "qnet"])
def test_replace_head_changes_scores_exactly_as_numpy_says(model, env) -> None:
    data, manifest = export.export_onnx(model, env, policy="p", training={})
    weight, bias = read_head(data, manifest.head)
    np.testing.assert_array_equal(weight, model.head.weight.detach().numpy())
    rng = np.random.default_rng(0)
    new_w = rng.standard_normal(weight.shape)
    new_b = rng.standard_normal(bias.shape)
    replaced = replace_head(data, manifest.head, new_w, new_b)
    ctx, act, _ = env.sample_contexts(5, rng)
    feeds = {"context": ctx} if act is None else {"context": ctx, "action_features": act}
    scores, emb = ort.InferenceSession(replaced).run(["scores", "embedding"], feeds)
    expected = emb @ new_w.astype(np.float32).T + new_b.astype(np.float32)
    if manifest.kind == "scoring":
        expected = expected[..., 0]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    got_w, got_b = read_head(replaced, manifest.head)
    assert got_w.dtype == got_b.dtype == np.float32
    np.testing.assert_array_equal(got_w, new_w.astype(np.float32))
    np.testing.assert_array_equal(got_b, new_b.astype(np.float32))


@pytest.mark.parametrize("change, message", [
    (lambda w, b: (w[:, :-1], b), "do not fit"),
    (lambda w, b: (w, np.append(b, 0.0)), "do not fit"),
    (lambda w, b: (np.full_like(w, np.nan), b), "finite"),
    (lambda w, b: (w, np.full(b.shape, 1e300)), "finite"),
    (lambda w, b: ([["x"] * w.shape[1]] * w.shape[0], b), "numeric"),
], ids=["narrow-weight", "long-bias", "nan", "overflows-float32", "strings"])
def test_replace_head_refuses_heads_that_do_not_fit(change, message) -> None:
    model, env = _models()[1]
    data, manifest = export.export_onnx(model, env, policy="p", training={})
    weight, bias = read_head(data, manifest.head)
    with pytest.raises(InvalidArgument, match=message):
        replace_head(data, manifest.head, *change(weight, bias))


def test_read_head_refuses_bytes_that_are_not_onnx() -> None:
    model, env = _models()[1]
    _, manifest = export.export_onnx(model, env, policy="p", training={})
    with pytest.raises(InvalidArgument, match="not an ONNX model"):
        read_head(b"\xff\x00 not a model", manifest.head)


def test_registered_export_carries_a_usable_posterior(tmp_path: Path) -> None:
    model, env = _models()[1]
    registry = LocalRegistry(tmp_path)
    version = export.export_and_register(model, env, registry, policy="routing", training={})
    posterior = LinearPosterior.from_npz_bytes(version.read_file("head.npz"))
    assert posterior.mean.shape == (8, model.config.embedding_dim)
    assert np.all(np.linalg.eigvalsh(posterior.covariance) > 0)
    np.testing.assert_allclose(posterior.mean, model.head.weight.detach().numpy(), rtol=1e-6)
