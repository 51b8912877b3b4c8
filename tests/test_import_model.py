"""Bring your own model: an ONNX file made outside the project, or a user's torch module, is
checked against its spec, served and refreshed (``docs/model-contract.md``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models.own_model import export_module, publish_module
from online.join import Example
from online.learners import LinearHeadLearner, Serving
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import DecisionEvent
from policyloop.contract.signature import Manifest
from policyloop.contract.spec import PolicySpec, parse_spec
from policyloop.registry.local import LocalRegistry
from policyloop.registry.model_import import import_onnx
from policyloop.registry.onnx_model import open_model
from policyloop.simulators.routing import RoutingEnv
from tests.cli_processes import read_line, stop_all

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING"]
ENV = RoutingEnv()
DC, N, H = len(ENV.feature_schema.context), len(ENV.action_names), 24


def _router_spec(path: Path) -> Path:
    path.write_text('name = "router"\nkind = "actions"\n'
                    f"actions = {json.dumps(list(ENV.action_names))}\n"
                    f"[features]\ncontext = {json.dumps(list(ENV.feature_schema.context))}\n")
    return path


def _onnx(*, input_name: str = "context", dtype: int = TensorProto.FLOAT, dc: int = DC,
          batch: str | int = "batch", n: int = N, head: str = "gemm", embedding: bool = True,
          bias: float = 0.0) -> bytes:
    """A fixed-action policy written with onnx.helper, as a user's own tool might:
    ``embedding = relu(context @ w1)`` [B, H]; ``head`` "gemm": ``scores = Gemm(embedding,
    head_w [A, H], head_b, transB=1)``; "matmul": ``MatMul(embedding, head_w [H, A]) + head_b``;
    "none": ``scores = tanh(embedding @ w2 + b2)``, no head."""
    rng = np.random.default_rng(3)
    inits = {"w1": (rng.standard_normal((dc, H)) / np.sqrt(dc)).astype(np.float32)}
    nodes = []
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [input_name], ["ctx32"], to=TensorProto.FLOAT))
    nodes += [helper.make_node("MatMul", ["ctx32" if dtype != TensorProto.FLOAT else input_name,
                                          "w1"], ["hidden"]),
              helper.make_node("Relu", ["hidden"], ["embedding" if embedding else "emb"])]
    emb = "embedding" if embedding else "emb"
    if head == "gemm":
        inits |= {"head_w": 0.01 * rng.standard_normal((n, H)).astype(np.float32),
                  "head_b": np.full(n, bias, np.float32)}
        nodes.append(helper.make_node("Gemm", [emb, "head_w", "head_b"], ["scores"], transB=1))
    elif head == "matmul":
        inits |= {"head_w": 0.01 * rng.standard_normal((H, n)).astype(np.float32),
                  "head_b": np.full(n, bias, np.float32)}
        nodes += [helper.make_node("MatMul", [emb, "head_w"], ["raw"]),
                  helper.make_node("Add", ["head_b", "raw"], ["scores"])]
    else:
        inits |= {"w2": rng.standard_normal((H, n)).astype(np.float32),
                  "b2": np.zeros(n, np.float32)}
        nodes += [helper.make_node("MatMul", [emb, "w2"], ["raw"]),
                  helper.make_node("Add", ["raw", "b2"], ["raw_b"]),
                  helper.make_node("Tanh", ["raw_b"], ["scores"])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n])]
    if embedding:
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                                     ["batch", H]))
    graph = helper.make_graph(
        nodes, "users_model", [helper.make_tensor_value_info(input_name, dtype, [batch, dc])],
        outputs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="not policyloop")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _spec() -> PolicySpec:
    return parse_spec(_router_spec_text())


def _router_spec_text() -> str:
    return ('name = "router"\nkind = "actions"\n'
            f"actions = {json.dumps(list(ENV.action_names))}\n"
            f"[features]\ncontext = {json.dumps(list(ENV.feature_schema.context))}\n")


@pytest.mark.parametrize(("head", "transposed"), [("gemm", False), ("matmul", True)])
def test_the_head_is_found_by_structure_and_by_name(head: str, transposed: bool) -> None:
    for weight, bias in (("", ""), ("head_w", "head_b")):  # by structure, then by name
        imported = import_onnx(_onnx(head=head), _spec(), head_weight=weight, head_bias=bias)
        spec = imported.manifest.head
        assert (spec.weight, spec.bias, spec.dim, spec.transposed) == ("head_w", "head_b", H,
                                                                        transposed)
        assert imported.posterior is not None and imported.posterior.mean.shape == (N, H)
        assert imported.manifest.training["imported"] is True


def test_a_model_whose_scores_are_no_linear_layer_is_imported_without_a_head() -> None:
    imported = import_onnx(_onnx(head="none"), _spec())
    assert not imported.manifest.head.learnable and imported.manifest.head.dim == H
    assert imported.posterior is None and "Gemm" in imported.no_head_reason
    without = import_onnx(_onnx(head="gemm", embedding=False), _spec())
    assert not without.manifest.head.learnable and without.manifest.head.dim == 0
    scores, embedding = open_model(without.model, without.manifest,
                                   providers=["CPUExecutionProvider"]).run(
        np.zeros((4, DC), np.float32))
    assert scores.shape == (4, N) and embedding.shape == (4, 0)  # a zero-width one was added


def test_a_head_named_that_does_not_control_the_scores_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        import_onnx(_onnx(head="none"), _spec(), head_weight="w2", head_bias="b2")
    assert str(caught.value).startswith("initializer 'w2' and 'b2' are no head of the scores: "
                                        "with its own head, scores differ from embedding @ "
                                        "weight.T + bias by ")
    with pytest.raises(InvalidArgument, match="initializer 'w1' has 408 values, the head "
                                              "needs 8"):
        import_onnx(_onnx(head="none"), _spec(), head_weight="w2", head_bias="w1")


BAD = [
    ({"input_name": "ctx"}, [], "input 'context' missing; the model's inputs are ['ctx']"),
    ({"dtype": TensorProto.DOUBLE}, [], "input 'context' is double, the contract says float32"),
    ({"dc": DC - 1}, [], f"input 'context' axis 1 is {DC - 1}, the spec implies {DC}: "
     f"[?, {DC}]"),
    ({"batch": 1}, [], "input 'context' axis 0 is fixed at 1; the contract says [?, 17] (the "
     "batch and candidate axes must be dynamic)"),
    ({"n": N - 1}, [], f"output 'scores' axis 1 is {N - 1}, the spec implies {N}: [?, {N}]"),
    ({"bias": float("nan")}, [], "output 'scores' is not finite on spec-shaped random input"),
    ({}, ["--head-weight", "nope", "--head-bias", "head_b"],
     "initializer 'nope' named by --head-weight does not exist"),
]


@pytest.mark.parametrize(("build", "flags", "message"), BAD,
                         ids=["input name", "dtype", "feature size", "fixed batch",
                              "action count", "non-finite", "head name"])
def test_a_file_that_breaks_the_contract_is_refused_in_one_line_and_nothing_is_published(
        tmp_path: Path, build: dict, flags: list[str], message: str) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(_onnx(**build))
    done = subprocess.run([*CLI, "import", str(model), "--spec",
                           str(_router_spec(tmp_path / "router.toml")), "--registry",
                           str(tmp_path / "reg"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip().splitlines() == [f"policyloop import: {model}: {message}"]
    assert not (tmp_path / "reg").exists() or LocalRegistry(tmp_path / "reg").policies() == []


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    stop_all(procs)


def _import(tmp_path: Path, model: bytes) -> dict:
    path = tmp_path / "users_model.onnx"
    path.write_bytes(model)
    done = subprocess.run([*CLI, "import", str(path), "--spec",
                           str(_router_spec(tmp_path / "router.toml")), "--registry",
                           str(tmp_path / "registry")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out: dict = json.loads(done.stdout)
    return out


def _serve(tmp_path: Path, processes: list[subprocess.Popen[str]], strategy: str) -> str:
    processes.append(subprocess.Popen(
        [*CLI, "serve", "--registry", str(tmp_path / "registry"), "--port", "0",
         "--metrics-port", "0", "--bus", "local", "--bus-path", str(tmp_path / "bus"),
         "--spool-dir", str(tmp_path / "spool"), "--watch-interval", "0.2",
         "--policy", f"router={strategy}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    line = read_line(processes[-1], "policyloop serve: grpc=")
    return dict(part.split("=", 1) for part in line.split()[2:])["grpc"]


def _learn_cmd(tmp_path: Path) -> list[str]:
    return [*CLI, "learn", "--registry", str(tmp_path / "registry"), "--policy", "router",
            "--bus-path", str(tmp_path / "bus"), "--checkpoint", str(tmp_path / "ckpt.json"),
            "--window-ms", "500", "--publish-every", "250", "--publish-interval", "1"]


def _simulate(target: str, events: int) -> dict:
    done = subprocess.run([*CLI, "simulate", "--target", target, "--scenario", "routing",
                           "--policy", "router", "--events", str(events), "--rate", "500",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary: dict = json.loads(done.stdout)
    assert summary["decisions"] == events and summary["errors"] == {}, summary
    return summary


@pytest.mark.slow
def test_an_onnx_file_made_elsewhere_is_imported_served_and_refreshed_online(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    """As a user would, all through the CLI: import, serve with Thompson sampling (the
    posterior import published), learn, send traffic; the learner's versions reach the
    server, whose Decide responses name them."""
    imported = _import(tmp_path, _onnx(head="matmul"))
    assert imported["version"] == 1 and imported["head"]["weight"] == "head_w"
    target = _serve(tmp_path, processes, "thompson")
    processes.append(subprocess.Popen(_learn_cmd(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True))
    read_line(processes[-1], "policyloop learn: consuming")
    summary = _simulate(target, 3000)
    assert len(summary["versions_seen"]) > 1, summary  # refreshed versions were served
    assert max(summary["versions_seen"]) > 1


@pytest.mark.slow
def test_a_model_without_a_head_is_served_and_learn_refuses_it_in_oneread_line(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    imported = _import(tmp_path, _onnx(head="none"))
    assert imported["head"] is None and imported["no_head"]
    summary = _simulate(_serve(tmp_path, processes, "epsilon_greedy:0.1"), 200)
    assert summary["versions_seen"] == [1]
    done = subprocess.run(_learn_cmd(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"policyloop learn: policy 'router' v1 has no learnable head ({imported['no_head']}): "
        "learn cannot refresh this model"]


class UsersRanker(torch.nn.Module):
    """A user's own ranking network: not one of the project's."""

    def __init__(self, dc: int, da: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(dc + da, 16), torch.nn.Tanh())
        self.out = torch.nn.Linear(16, 1)

    def forward(self, context: torch.Tensor,
                action_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        each = context[:, None, :].expand(-1, action_features.shape[1], -1)
        embedding = self.body(torch.cat([each, action_features], dim=-1))
        return self.out(embedding).squeeze(-1), embedding


SHOP = """
name = "shop"
kind = "ranking"
[features]
context = ["u0", "u1", "u2"]
action = ["i0", "i1", "i2", "i3"]
"""


def test_a_users_torch_module_is_exported_with_parity_and_its_head_refreshes() -> None:
    spec = parse_spec(SHOP)
    module = UsersRanker(3, 4)
    imported = export_module(module, spec, head="out")
    assert imported.manifest.training["parity_max_abs_diff"] <= 1e-5
    assert imported.manifest.head.learnable and imported.manifest.head.dim == 16
    serving = Serving(open_model(imported.model, imported.manifest, imported.posterior,
                                 providers=["CPUExecutionProvider"]), imported.model)
    learner = LinearHeadLearner(serving)
    rng = np.random.default_rng(0)
    for i in range(50):
        d = DecisionEvent(
            event_id=f"e{i}", policy="shop", model_version=1, timestamp_ms=i,
            context=rng.standard_normal(3).astype(np.float32), action_ids=["a", "b"],
            action_features=rng.standard_normal((2, 4)).astype(np.float32), chosen=[0],
            propensities=[0.5], probabilities=np.full((1, 2), 0.5), strategy="uniform",
            active=True, baseline_action=None, policy_action=None)
        learner.learn_one(Example(d, 1.0, True, i))
    refreshed = open_model(learner.candidate().model, imported.manifest,
                           providers=["CPUExecutionProvider"])
    scores, _ = refreshed.run(np.zeros((1, 3), np.float32), np.zeros((1, 2, 4), np.float32))
    assert scores[0, 0] > 0.5  # every reward was 1: the refreshed head learned it
    with pytest.raises(InvalidArgument, match="no submodule 'head'"):
        export_module(module, spec)


@pytest.mark.slow
def test_a_users_torch_module_published_through_the_api_is_served(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    from policyloop_client import Client

    registry = LocalRegistry(tmp_path / "registry")
    version = publish_module(UsersRanker(3, 4), parse_spec(SHOP), registry, head="out")
    assert version.version == 1
    processes.append(subprocess.Popen(
        [*CLI, "serve", "--registry", str(tmp_path / "registry"), "--port", "0",
         "--metrics-port", "0", "--bus", "local", "--bus-path", str(tmp_path / "bus"),
         "--spool-dir", str(tmp_path / "spool"), "--policy", "shop=thompson"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    line = read_line(processes[-1], "policyloop serve: grpc=")
    target = dict(part.split("=", 1) for part in line.split()[2:])["grpc"]
    with Client(target) as client:
        decision = client.decide("shop", {"u0": 1.0, "u1": 0.0, "u2": -1.0},
                                 [("x", [1.0, 0.0, 0.0, 0.0]), ("y", [0.0, 1.0, 0.0, 0.0])])
    assert decision.model_version == 1 and decision.action in ("x", "y")
    assert decision.strategy.startswith("thompson")  # the posterior the API published


def test_manifests_without_a_head_round_trip_and_older_ones_still_load() -> None:
    imported = import_onnx(_onnx(head="none"), _spec())
    again = Manifest.from_json(imported.manifest.to_json())
    assert again == imported.manifest and not again.head.learnable
    raw = json.loads(imported.manifest.to_json())
    raw["head"] = {"weight": "w", "bias": "b", "dim": 4}  # as every earlier manifest wrote it
    old = Manifest.from_json(json.dumps(raw))
    assert old.head.learnable and not old.head.transposed
