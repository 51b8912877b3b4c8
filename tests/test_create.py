"""``policyloop create``: a policy started from its spec alone is served, explores and learns."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from online.join import Example
from online.learners import LinearHeadLearner, Serving
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import DecisionEvent
from policyloop.contract.spec import parse_spec
from policyloop.registry.cold_start import cold_start
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_model import load_model, open_model
from policyloop.simulators.routing import RoutingEnv
from tests.cli_processes import read_line, stop_all

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING"]

RANKING = """
name = "shop"
kind = "ranking"
[features]
context = ["u0", "u1", "u2"]
action = ["i0", "i1", "i2", "i3"]
"""


def _ranking(interactions: bool = True) -> Serving:
    spec = parse_spec(RANKING + f"[model]\ninteractions = {str(interactions).lower()}\n")
    model, manifest, posterior = cold_start(spec)
    return Serving(open_model(model, manifest, posterior, providers=["CPUExecutionProvider"]),
                   model)


def test_the_ranking_embedding_is_the_candidate_the_context_and_their_products() -> None:
    serving = _ranking()
    rng = np.random.default_rng(0)
    context = rng.standard_normal((2, 3), dtype=np.float32)
    items = rng.standard_normal((2, 5, 4), dtype=np.float32)
    scores, embedding = serving.model.run(context, items)
    assert embedding.shape == (2, 5, 4 + 3 + 12) and scores.shape == (2, 5)
    b, k = 1, 3
    want = np.concatenate([items[b, k], context[b], np.outer(context[b], items[b, k]).ravel()])
    np.testing.assert_allclose(embedding[b, k], want, rtol=1e-6)
    assert not scores.any()  # the head starts at zero: every candidate ties
    assert serving.model.posterior is not None
    assert serving.model.posterior.covariance.shape == (19, 19)


def _ranking_stream(n: int, seed: int) -> list[Example]:
    """Which item suits which user: reward 1 when the chosen candidate maximises
    context @ W @ item, a pure interaction (no item is better on its own)."""
    rng = np.random.default_rng(seed)
    affinity = np.random.default_rng(7).standard_normal((3, 4))
    out = []
    for i in range(n):
        context = rng.standard_normal(3).astype(np.float32)
        items = rng.standard_normal((5, 4)).astype(np.float32)
        chosen = int(rng.integers(5))
        best = int(np.argmax(items @ (context @ affinity)))
        d = DecisionEvent(
            event_id=f"e{i}", policy="shop", model_version=1, timestamp_ms=i, context=context,
            action_ids=[f"item-{j}" for j in range(5)], action_features=items, chosen=[chosen],
            propensities=[0.2], probabilities=np.full((1, 5), 0.2), strategy="uniform",
            active=True, baseline_action=None, policy_action=None)
        out.append(Example(d, float(chosen == best), True, i))
    return out


def _greedy_accuracy(interactions: bool) -> float:
    serving = _ranking(interactions)
    learner = LinearHeadLearner(serving)
    for example in _ranking_stream(3000, seed=1):
        learner.learn_one(example)
    candidate = learner.candidate()
    model = open_model(candidate.model, serving.model.manifest,
                       providers=["CPUExecutionProvider"])
    test = _ranking_stream(500, seed=2)
    hits = 0
    affinity = np.random.default_rng(7).standard_normal((3, 4))
    for example in test:
        d = example.decision
        assert d.action_features is not None
        scores, _ = model.run(d.context[None], d.action_features[None])
        best = int(np.argmax(d.action_features @ (d.context @ affinity)))
        hits += int(np.argmax(scores[0]) == best)
    return hits / len(test)


def test_a_created_ranking_policy_learns_context_by_item_interactions() -> None:
    with_products, without = _greedy_accuracy(True), _greedy_accuracy(False)
    assert with_products > 0.8, with_products  # 5 candidates: chance is 0.2
    assert without < 0.4, without  # a linear score of concatenated features cannot


@pytest.mark.parametrize(("text", "message"), [
    ('name = "r"\nkind = "actions"\n[features]\ncontext = ["x"]\n',
     "actions: at least one action id"),
    ('name = "r"\nkind = "bandit"\nactions = ["a"]\n[features]\ncontext = ["x"]\n',
     "kind: 'bandit' is not one of"),
    ('name = "R!"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n',
     "name: 'R!'"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x", "x"]\n',
     "features.context: 'x' appears twice"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\ncolour = 1\n[features]\ncontext = ["x"]\n',
     "colour: unknown key"),
    ('name = "r"\nkind = "ranking"\n[features]\ncontext = ["x"]\n',
     "features.action: a ranking policy needs"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = []\n',
     "features.context: at least one"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n'
     '[model]\ntype = "tree"\n', "model.type: 'tree' is not one of ['linear', 'mlp']"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n'
     '[model]\nhidden = 8\n', 'model.hidden: only a type = "mlp" model has layer sizes'),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n'
     '[model]\ntype = "mlp"\nembedding = 0\n',
     "model.embedding: a width in [1, 4096] is required, got 0"),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n'
     '[model]\ntype = "mlp"\ninteractions = true\n',
     'model.interactions: a type = "mlp" model learns its own interactions'),
    ('name = "r"\nkind = "actions"\nactions = ["a"]\n[features]\ncontext = ["x"]\n'
     '[model]\ninteractions = 1\n', "model.interactions: must be true or false"),
    ('name = "r"\nkind = = "actions"', "not valid TOML"),
])
def test_a_bad_spec_is_refused_naming_the_key_and_value(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=None) as caught:
        parse_spec(text)
    assert message in str(caught.value)


def test_an_mlp_created_from_nothing_starts_even_and_its_head_learns(tmp_path: Path) -> None:
    """``type = "mlp"``: the spec's sizes, a seeded random body, a zero head (every action
    alike at first), and a head the online learner refits on the body's embedding."""
    from policyloop.create import create_command

    spec = tmp_path / "mlp.toml"
    spec.write_text('name = "deep"\nkind = "actions"\nactions = ["a", "b", "c"]\n'
                    '[features]\ncontext = ["x0", "x1", "x2"]\n'
                    '[model]\ntype = "mlp"\nhidden = 32\nembedding = 16\n')
    assert create_command(spec, registry=tmp_path / "registry", seed=3) == 0
    version = LocalRegistry(tmp_path / "registry").current("deep")
    manifest = version.manifest
    assert (manifest.head.dim, manifest.training["model"], manifest.training["hidden"]) == (
        16, "mlp", 32)
    serving = Serving(load_model(version, expected=None, providers=["CPUExecutionProvider"]),
                      version.read_model())
    rng = np.random.default_rng(0)
    scores, embedding = serving.model.run(rng.standard_normal((4, 3), dtype=np.float32))
    assert embedding.shape == (4, 16) and not scores.any()
    truth = np.random.default_rng(7).standard_normal((3, 3))
    learner = LinearHeadLearner(serving)
    for i in range(3000):
        context = rng.standard_normal(3).astype(np.float32)
        chosen = int(rng.integers(3))
        d = DecisionEvent(
            event_id=f"e{i}", policy="deep", model_version=1, timestamp_ms=i, context=context,
            action_ids=["a", "b", "c"], action_features=None, chosen=[chosen],
            propensities=[1 / 3], probabilities=np.full((1, 3), 1 / 3), strategy="uniform",
            active=True, baseline_action=None, policy_action=None)
        learner.learn_one(Example(d, float(chosen == int(np.argmax(context @ truth))), True, i))
    model = open_model(learner.candidate().model, manifest, providers=["CPUExecutionProvider"])
    test = rng.standard_normal((500, 3)).astype(np.float32)
    scores, _ = model.run(test)
    accuracy = float(np.mean(scores.argmax(1) == (test @ truth).argmax(1)))
    assert accuracy > 0.7, accuracy  # chance is 1/3


def test_create_refuses_a_bad_spec_file_in_one_line_and_publishes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "r"\nkind = "actions"\nactions = ["a", "a"]\n'
                    '[features]\ncontext = ["x"]\n')
    done = subprocess.run([*CLI, "create", str(spec), "--registry", str(tmp_path / "reg")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"policyloop create: spec {spec}: actions: 'a' appears twice"]
    assert not (tmp_path / "reg").exists() or LocalRegistry(tmp_path / "reg").policies() == []


def _router_spec(path: Path) -> Path:
    env = RoutingEnv()
    path.write_text('name = "router"\nkind = "actions"\n'
                    f"actions = {json.dumps(list(env.action_names))}\n"
                    f"[features]\ncontext = {json.dumps(list(env.feature_schema.context))}\n")
    return path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    stop_all(procs)


@pytest.mark.slow
def test_a_router_created_from_nothing_learns_online_to_90_percent_of_the_oracle(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    """As a user would: create from a spec, serve with Thompson sampling, learn, send traffic
    (the routing simulator, whose truth is known), all through the CLI. (With create's default,
    UCB, one fresh-clone CI run stalled at 89% of the oracle where six local runs reached
    97-99%: the default's robustness in the real loop is not settled, so this pins the
    randomised strategy it has always pinned.)"""
    registry, bus = str(tmp_path / "registry"), str(tmp_path / "bus")
    created = subprocess.run([*CLI, "create", str(_router_spec(tmp_path / "router.toml")),
                              "--registry", registry], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["embedding_width"] == len(RoutingEnv().feature_schema.context)
    processes.append(subprocess.Popen(
        [*CLI, "serve", "--registry", registry, "--port", "0", "--metrics-port", "0",
         "--bus", "local", "--bus-path", bus, "--spool-dir", str(tmp_path / "spool"),
         "--watch-interval", "0.2", "--policy", "router=thompson"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    line = read_line(processes[0], "policyloop serve: grpc=")
    target = dict(part.split("=", 1) for part in line.split()[2:])["grpc"]
    processes.append(subprocess.Popen(
        [*CLI, "learn", "--registry", registry, "--policy", "router", "--bus-path", bus,
         "--checkpoint", str(tmp_path / "ckpt.json"), "--window-ms", "500",
         "--publish-every", "250", "--publish-interval", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    read_line(processes[1], "policyloop learn: consuming")
    done = subprocess.run([*CLI, "simulate", "--target", target, "--scenario", "routing",
                           "--policy", "router", "--events", "10000", "--rate", "500",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["decisions"] == 10_000 and summary["errors"] == {}
    print(json.dumps({k: summary[k] for k in ("expected_by_fifth", "optimal_by_fifth")}))
    last, oracle = summary["expected_by_fifth"][-1], summary["optimal_by_fifth"][-1]
    assert last >= 0.9 * oracle, summary
    assert len(summary["versions_seen"]) > 5  # learned versions reached the server


def test_a_spec_policy_refuses_a_request_missing_features_unless_its_spec_fills_zeros(
        tmp_path: Path) -> None:
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc
    from serving.config import PolicyConfig
    from tests.server_harness import channel, running_server, serve_config

    text = ('kind = "actions"\nactions = ["a", "b"]\n[features]\n'
            'context = ["x", "y", "z"]\n')
    registry = LocalRegistry(tmp_path / "registry")
    for name, extra in (("strict", ""), ("sparse", 'missing = "zero"\n')):
        model, manifest, posterior = cold_start(parse_spec(f'name = "{name}"\n' + text + extra))
        registry.publish(name, model, manifest, {"head.npz": posterior.to_npz_bytes()})
    assert registry.current("strict").manifest.features.missing == "error"
    config = serve_config(tmp_path, policies={"strict": PolicyConfig(strategy="greedy"),
                                              "sparse": PolicyConfig(strategy="greedy")})
    with running_server(config) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        partial = pb.Features(named={"x": 1.0})
        with pytest.raises(Exception) as caught:
            stub.Decide(pb.DecideRequest(policy="strict", context=partial), timeout=5)
        assert caught.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        assert ("context.named lacks 2 of the policy's 3 features ('y', 'z')"
                in caught.value.details())  # type: ignore[attr-defined]
        full = pb.Features(named={"x": 1.0, "y": 0.0, "z": 2.0})
        assert stub.Decide(pb.DecideRequest(policy="strict", context=full), timeout=5).event_id
        assert stub.Decide(pb.DecideRequest(policy="sparse", context=partial), timeout=5).event_id


@contextmanager
def _served_ucb(tmp_path: Path, actions: list[str], pending: bool
                ) -> Iterator[tuple[Any, Callable[[], None]]]:
    """A policy "fresh" created from nothing (context x, y) and served with ``ucb:1``, one
    decision at a time: the decision stub, and a call that publishes its version 1 again."""
    from protos import decision_pb2_grpc as pb_grpc
    from serving.config import PolicyConfig
    from tests.server_harness import channel, running_server, serve_config

    spec = parse_spec(f'name = "fresh"\nkind = "actions"\nactions = {json.dumps(actions)}\n'
                      '[features]\ncontext = ["x", "y"]\n')
    registry = LocalRegistry(tmp_path / "registry")
    model, manifest, posterior = cold_start(spec)

    def publish() -> None:
        registry.publish("fresh", model, manifest, {"head.npz": posterior.to_npz_bytes()})

    publish()
    config = serve_config(tmp_path, policies={"fresh": PolicyConfig(strategy="ucb:1")},
                          pending_decisions=pending, micro_batch_size=1)
    with running_server(config) as server, channel(server.target) as ch:
        yield pb_grpc.DecisionServiceStub(ch), publish


@pytest.mark.parametrize("pending", [True, False])
def test_served_ucb_moves_on_from_the_actions_it_has_just_tried(tmp_path: Path,
                                                               pending: bool) -> None:
    """Between two versions the served posterior narrows with each decision (serve
    ``pending_decisions``): a created policy's UCB, asked the same thing five times before any
    reward, tries each of its five actions once; explored with the published posterior alone
    (``--no-pending-decisions``) it sends all five to the same one. A new version starts
    again from what it publishes."""
    from protos import decision_pb2 as pb

    actions = ["a", "b", "c", "d", "e"]
    with _served_ucb(tmp_path, actions, pending) as (stub, publish):
        request = pb.DecideRequest(policy="fresh", context=pb.Features(dense=[1.0, 0.5]))
        tried = [stub.Decide(request, timeout=5).chosen[0].action_id for _ in actions]
        assert sorted(tried) == actions if pending else len(set(tried)) == 1, tried
        publish()
        deadline = time.monotonic() + 10
        while stub.Decide(request, timeout=5).model_version != 2:
            assert time.monotonic() < deadline, "version 2 was not served"
        again = [stub.Decide(request, timeout=5).chosen[0].action_id for _ in actions[1:]]
        assert sorted(again) == actions[1:] if pending else set(again) == set(tried), again


@pytest.mark.parametrize("pending", [True, False])
def test_served_ucb_learns_from_a_reward_before_the_next_version(tmp_path: Path,
                                                                 pending: bool) -> None:
    """A reward that reaches the replica moves the posterior its version explores with: the
    first action tried, rewarded 1, is UCB's choice again (its mean 0.56, bound 0.93, against
    an untried action's 0.56); rewarded -1 next, its mean falls to 0 and UCB moves on. With
    ``--no-pending-decisions`` the version's posterior is served as published: the same
    action every time."""
    from protos import decision_pb2 as pb

    with _served_ucb(tmp_path, ["a", "b", "c"], pending) as (stub, _):
        request = pb.DecideRequest(policy="fresh", context=pb.Features(dense=[1.0, 0.5]))
        first = stub.Decide(request, timeout=5)
        stub.Reward(pb.RewardRequest(event_id=first.event_id, value=1.0), timeout=5)
        again = stub.Decide(request, timeout=5)
        stub.Reward(pb.RewardRequest(event_id=again.event_id, value=-1.0), timeout=5)
        third = stub.Decide(request, timeout=5)
    tried = [d.chosen[0].action_id for d in (first, again, third)]
    if pending:  # rewarded: tried again; then -1: its mean falls to 0, UCB moves on
        assert tried[0] == tried[1] != tried[2], tried
    else:
        assert len(set(tried)) == 1, tried


def test_create_refuses_an_existing_policy_unless_forced(tmp_path: Path) -> None:
    spec = tmp_path / "r.toml"
    spec.write_text('name = "r"\nkind = "actions"\nactions = ["a", "b"]\n'
                    '[features]\ncontext = ["x"]\n')
    command = [*CLI, "create", str(spec), "--registry", str(tmp_path / "reg")]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert "policy 'r' already exists" in again.stderr
    forced = subprocess.run([*command, "--force"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert json.loads(forced.stdout)["version"] == 2
    assert LocalRegistry(tmp_path / "reg").versions("r") == [1, 2]
