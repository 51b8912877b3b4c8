"""A spec's ``[exploration]`` and ``[reward]`` tables (issue 14): every version carries them,
``serve`` explores as the spec says unless told otherwise, ``learn`` joins rewards by the
spec's contract unless told otherwise."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from online.config import LearnConfig
from online.learner import Learner
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.signature import Manifest, PolicyDefaults
from policyloop.contract.spec import parse_spec
from policyloop.registry.cold_start import cold_start
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_head import read_head, replace_head
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.config import PolicyConfig
from tests.server_harness import channel, running_server, serve_config

BASE = 'kind = "actions"\nactions = ["a", "b"]\n[features]\ncontext = ["x"]\n'
CONTRACT = ('[exploration]\nstrategy = "thompson"\n'
            '[reward]\nwindow_s = 2.5\ndefault = -1\nrule = "sum"\n')


def _publish(registry: LocalRegistry, name: str, extra: str, *,
             defaults: PolicyDefaults | None = None) -> Manifest:
    model, manifest, posterior = cold_start(parse_spec(f'name = "{name}"\n{BASE}{extra}'))
    if defaults is not None:  # as a version trained or imported without a strategy has
        manifest = replace(manifest, defaults=defaults)
    registry.publish(name, model, manifest, {"head.npz": posterior.to_npz_bytes()})
    return registry.current(name).manifest


def test_the_spec_contract_is_carried_by_the_version(tmp_path: Path) -> None:
    manifest = _publish(LocalRegistry(tmp_path / "registry"), "router", CONTRACT)
    assert manifest.defaults == PolicyDefaults("thompson", 2500, -1.0, "sum")
    assert Manifest.from_json(manifest.to_json()).defaults == manifest.defaults
    assert parse_spec(f'name = "plain"\n{BASE}').defaults == PolicyDefaults()
    # created from nothing without a strategy: UCB at alpha 1, the bench's best from nothing
    plain = _publish(LocalRegistry(tmp_path / "registry"), "plain", "")
    assert plain.defaults == PolicyDefaults(strategy="ucb:1")


@pytest.mark.parametrize(("table", "message"), [
    ('[exploration]\nstrategy = 3', "exploration.strategy: a strategy such as \"thompson\" is "
                                    "required, got 3"),
    ('[exploration]\nepsilon = 0.1', "exploration.epsilon: unknown key"),
    ('[reward]\nwindow_s = 0', r"reward.window_s: seconds in \[0.001, 604800\], got 0"),
    ('[reward]\nwindow_s = "30s"', "reward.window_s: seconds in"),
    ('[reward]\ndefault = 1e300', "reward.default: a finite number within ±1e\\+06, got 1e\\+300"),
    ('[reward]\nrule = "mean"', r"reward.rule: 'mean' is not one of \['first', 'sum'\]"),
    ('[reward]\nwait = 3', "reward.wait: unknown key"),
])
def test_a_bad_contract_is_refused_naming_the_key_and_value(table: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_spec(f'name = "r"\n{BASE}{table}\n')


@pytest.mark.parametrize("command", ["create", "train", "import"])
@pytest.mark.parametrize(("strategy", "why"), [
    ("thomson", "strategy 'thomson' is not one of"),
    ("epsilon_greedy:2", "strategy 'epsilon_greedy:2': epsilon must be in [0, 1], got 2.0")])
def test_a_command_publishing_from_a_spec_refuses_a_strategy_serve_could_not_use(
        tmp_path: Path, command: str, strategy: str, why: str) -> None:
    """The grammar is serving's, so the commands check it (the spec's layer cannot)."""
    import subprocess
    import sys

    spec = tmp_path / "r.toml"
    spec.write_text(f'name = "r"\n{BASE}[exploration]\nstrategy = "{strategy}"\n')
    args = {"create": ["create", str(spec)],
            "train": ["train", "--spec", str(spec), "--data", str(tmp_path / "none.csv")],
            "import": ["import", str(tmp_path / "none.onnx"), "--spec", str(spec)]}[command]
    done = subprocess.run([sys.executable, "-m", "policyloop.cli", *args, "--registry",
                           str(tmp_path / "registry")], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"policyloop {command}: spec {spec}: exploration.strategy: {why}")
    assert not (tmp_path / "registry").exists()


def test_serve_explores_as_the_spec_says_unless_its_config_names_a_strategy(
        tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    _publish(registry, "specced", CONTRACT)
    _publish(registry, "plain", "", defaults=PolicyDefaults())
    _publish(registry, "overridden", CONTRACT)
    config = serve_config(tmp_path, policies={"specced": PolicyConfig(),
                                              "plain": PolicyConfig(),
                                              "overridden": PolicyConfig(strategy="greedy")},
                          default_strategy="softmax:0.5")
    with running_server(config) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        served = {name: stub.GetPolicyInfo(pb.GetPolicyInfoRequest(policy=name),
                                           timeout=5).strategy
                  for name in ("specced", "plain", "overridden")}
        decided = stub.Decide(
            pb.DecideRequest(policy="specced", context=pb.Features(dense=[0.3])), timeout=5)
    assert served["specced"].startswith("thompson") and decided.strategy == served["specced"]
    assert served["plain"].startswith("softmax") and served["overridden"] == "greedy"


def test_a_growing_squarecb_explores_by_what_the_served_version_learned_from(
        tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    spec = '[exploration]\nstrategy = "squarecb"\n'
    for name, examples in (("young", 0), ("grown", 10_000)):
        model, manifest, posterior = cold_start(parse_spec(f'name = "{name}"\n{BASE}{spec}'))
        weight, bias = read_head(model, manifest.head)
        model = replace_head(model, manifest.head, weight, bias + np.array([1.0, 0.0]))
        manifest = replace(manifest, training={**manifest.training, "examples": examples})
        registry.publish(name, model, manifest, {"head.npz": posterior.to_npz_bytes()})
    config = serve_config(tmp_path, policies={"young": PolicyConfig(), "grown": PolicyConfig()})
    with running_server(config) as server, channel(server.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        answers = {name: [stub.Decide(pb.DecideRequest(policy=name, seed=seed,
                                                       context=pb.Features(dense=[0.3])),
                                      timeout=5) for seed in range(40)]
                   for name in ("young", "grown")}
    # action a scores 1, b 0: p(b) = 1 / (2 + gamma), gamma = 10 * max(t, 1)^0.5
    for name, gamma in (("young", 10.0), ("grown", 1000.0)):
        seen = {(r.chosen[0].action_id, round(r.chosen[0].propensity, 9)) for r in answers[name]}
        assert seen <= {("a", round(1 - 1 / (2 + gamma), 9)), ("b", round(1 / (2 + gamma), 9))}
        assert {r.strategy for r in answers[name]} == {"squarecb(gamma=10*t^0.5)"}
    assert any(r.chosen[0].action_id == "b" for r in answers["young"])


def test_learn_joins_by_the_spec_contract_unless_its_flags_set_one(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    _publish(registry, "router", CONTRACT)
    base: dict[str, Any] = {"registry": tmp_path / "registry", "policy": "router",
                            "bus_path": tmp_path / "bus", "checkpoint": tmp_path / "ckpt.json"}
    by_spec = Learner(LearnConfig(**base)).joiner
    assert (by_spec.window_ms, by_spec.default_reward, by_spec.reward_rule) == (2500, -1.0, "sum")
    flags = Learner(LearnConfig(**base, window_ms=700, default_reward=0.0,
                                reward_rule="first")).joiner
    assert (flags.window_ms, flags.default_reward, flags.reward_rule) == (700, 0.0, "first")
    _publish(registry, "plain", "", defaults=PolicyDefaults())
    plain = Learner(LearnConfig(**{**base, "policy": "plain"})).joiner
    assert (plain.window_ms, plain.default_reward, plain.reward_rule) == (30_000, 0.0, "first")
