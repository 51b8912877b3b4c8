"""One contract for every online learner (``online/learners.py``), checked on each of them.

The learners are discovered: every class in ``online/`` and ``models/`` with the protocol's
methods is one, and the suite fails for a learner that has no case below, so a new learner is
covered the day it is written. Each case is a learner factory and a stream of joined examples
on a small model of the learner's kind.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from online.config import LearnConfig
from online.gate import Holdout
from online.join import Example
from online.learners import OnlineLearner, Serving
from policyloop.contract.events import DecisionEvent
from policyloop.contract.signature import Manifest
from policyloop.registry.onnx_head import read_head, replace_head
from policyloop.registry.onnx_model import LoadedModel, open_model
from tests.onnx_models import qnet_model, scoring_model

ROOT = Path(__file__).resolve().parents[1]
_METHODS = ("learn_one", "candidate", "adopt", "state", "load_state")


def discover_learners() -> dict[str, type]:
    """Every class defined in online/ or models/ that has the learner protocol's methods."""
    found: dict[str, type] = {}
    for package in ("online", "models"):
        for info in pkgutil.iter_modules([str(ROOT / package)]):
            module = importlib.import_module(f"{package}.{info.name}")
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if (cls.__module__ == module.__name__ and cls is not OnlineLearner
                        and all(callable(getattr(cls, m, None)) for m in _METHODS)):
                    found[name] = cls
    return found


@dataclass
class Case:
    serving: Serving
    make: Callable[[], OnlineLearner]  # a fresh learner, seeded the same every time
    examples: list[Example]  # to learn from
    held_out: list[Example]  # to judge on


def _open(model_bytes: bytes, manifest: Manifest) -> Serving:
    return Serving(open_model(model_bytes, manifest, providers=["CPUExecutionProvider"]),
                   model_bytes)


def _decision(i: int, manifest: Manifest, context: np.ndarray, ids: list[str],
              features: np.ndarray | None, chosen: int) -> DecisionEvent:
    k = len(ids)
    return DecisionEvent(
        event_id=f"e-{i}", policy=manifest.policy, model_version=1, timestamp_ms=1000 + 10 * i,
        context=context.astype(np.float32), action_ids=ids, action_features=features,
        chosen=[chosen], propensities=[1 / k], probabilities=np.full((1, k), 1 / k),
        strategy="uniform", active=True, baseline_action=None, policy_action=None)


def _ranking_stream(n: int, seed: int, manifest: Manifest) -> list[Example]:
    """Four candidates a request; the reward is 1 when the chosen one is the best by a hidden
    linear rule on the candidate's features (which the small model's body can represent),
    uniform logging."""
    rng = np.random.default_rng(seed)
    dc, da = len(manifest.features.context), len(manifest.features.action)
    quality = np.random.default_rng(99).standard_normal(da)
    out = []
    for i in range(n):
        context = rng.standard_normal(dc)
        features = rng.standard_normal((4, da)).astype(np.float32)
        chosen = int(rng.integers(4))
        best = int(np.argmax(features @ quality))
        d = _decision(i, manifest, context, [f"item-{j}" for j in range(4)], features, chosen)
        out.append(Example(d, float(chosen == best), True, d.timestamp_ms + 100))
    return out


def _fixed_stream(n: int, seed: int, manifest: Manifest) -> list[Example]:
    """The fixed action set; the reward is 1 for the action the context's sign pattern
    picks, uniform logging over all actions."""
    rng = np.random.default_rng(seed)
    dc, actions = len(manifest.features.context), list(manifest.actions)
    out = []
    for i in range(n):
        context = rng.standard_normal(dc)
        chosen = int(rng.integers(len(actions)))
        best = int(np.argmax(context[:len(actions)]))
        d = _decision(i, manifest, context, actions, None, chosen)
        out.append(Example(d, float(chosen == best), True, d.timestamp_ms + 100))
    return out


def _routing_stream(n: int, seed: int, manifest: Manifest) -> list[Example]:
    """The routing simulator's tickets, uniform logging, each rewarded with the chosen
    queue's true expected resolution rate."""
    from policyloop.simulators.routing import RoutingEnv

    env = RoutingEnv()
    rng = np.random.default_rng(seed)
    context, _, expected = env.sample_contexts(n, rng)
    actions = list(manifest.actions)
    out = []
    for i in range(n):
        chosen = int(rng.integers(len(actions)))
        d = _decision(i, manifest, context[i], actions, None, chosen)
        out.append(Example(d, float(expected[i, chosen]), True, d.timestamp_ms + 100))
    return out


def _config(**changes: object) -> LearnConfig:
    return LearnConfig(registry=Path("unused"), policy="p", **changes)  # type: ignore[arg-type]


def _linear_case(tmp: Path) -> Case:
    from online.learners import LinearHeadLearner

    serving = _open(*scoring_model(policy="p", hidden=6))
    return Case(serving, lambda: LinearHeadLearner(serving, prior=1.0),
                _ranking_stream(1500, 1, serving.model.manifest),
                _ranking_stream(600, 2, serving.model.manifest))


def _q_case(tmp: Path) -> Case:
    from online.qlearning import QLearner

    serving = _open(*qnet_model(policy="p", context_dim=5, n_actions=3, hidden=8))
    return Case(serving, lambda: QLearner(serving, discount=0.3, prior=1.0),
                _fixed_stream(1500, 1, serving.model.manifest),
                _fixed_stream(600, 2, serving.model.manifest))


def _network_case(tmp: Path) -> Case:
    from models.export import export_onnx
    from models.network_learner import NetworkLearner
    from models.training import TrainConfig, save_checkpoint, train_offline

    result = train_offline(TrainConfig(scenario="routing", n_logged=300, epochs=1))
    save_checkpoint(result, tmp / "start.pt")
    model_bytes, manifest = export_onnx(result.model, result.env, policy="p", training={})
    serving = _open(model_bytes, manifest)
    return Case(serving, lambda: NetworkLearner(serving, _config(), tmp / "start.pt", epochs=2,
                                                replay=600, seed=3),
                _routing_stream(700, 1, manifest), _routing_stream(500, 2, manifest))


CASES: dict[str, Callable[[Path], Case]] = {
    "LinearHeadLearner": _linear_case, "QLearner": _q_case, "NetworkLearner": _network_case,
}


def test_every_learner_has_a_conformance_case() -> None:
    assert set(discover_learners()) == set(CASES)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return CASES[request.param](tmp_path_factory.mktemp(request.param))


def _learn(learner: OnlineLearner, examples: list[Example]) -> OnlineLearner:
    for i, example in enumerate(examples):
        learner.learn_one(example, train=i % 7 != 3)  # some held out, as the loop does
    return learner


def _same_candidate(a: OnlineLearner, b: OnlineLearner) -> None:
    ca, cb = a.candidate(), b.candidate()
    assert ca.model == cb.model
    assert ca.extras == cb.extras


def _through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_learning_is_deterministic_under_its_seed(case: Case) -> None:
    _same_candidate(_learn(case.make(), case.examples), _learn(case.make(), case.examples))


def test_learning_changes_the_candidate(case: Case) -> None:
    learner = _learn(case.make(), case.examples)
    assert learner.learned > len(case.examples) // 2
    assert learner.candidate().model != case.serving.model_bytes


def test_state_round_trips_exactly(case: Case) -> None:
    learned = _learn(case.make(), case.examples)
    restored = case.make()
    restored.load_state(_through_json(learned.state()), case.serving)
    assert restored.learned == learned.learned
    _same_candidate(learned, restored)


def test_a_restarted_learner_equals_an_uninterrupted_one(case: Case) -> None:
    half = len(case.examples) // 2
    uninterrupted = _learn(case.make(), case.examples)
    first = _learn(case.make(), case.examples[:half])
    restarted = case.make()
    restarted.load_state(_through_json(first.state()), case.serving)
    for i, example in enumerate(case.examples[half:], start=half):
        restarted.learn_one(example, train=i % 7 != 3)
    assert restarted.learned == uninterrupted.learned
    _same_candidate(uninterrupted, restarted)


def test_learning_does_not_mutate_its_input(case: Case) -> None:
    before = [(e.decision.to_bytes(), e.reward, e.reward_ms) for e in case.examples]
    examples = copy.deepcopy(case.examples)
    _learn(case.make(), examples)
    assert [(e.decision.to_bytes(), e.reward, e.reward_ms) for e in examples] == before


def _holdout(case: Case) -> Holdout:
    holdout = Holdout()
    model = case.serving.model
    for example in case.held_out:
        d = example.decision
        holdout.add(model.manifest.policy_kind.logged(d, model.action_positions),
                    d.propensities[0], example.reward)
    return holdout


def _opened(model_bytes: bytes, manifest: Manifest) -> LoadedModel:
    return open_model(model_bytes, manifest, providers=["CPUExecutionProvider"])


def test_the_gate_refuses_a_sabotaged_candidate_and_promotes_the_learned_one(
        case: Case) -> None:
    candidate = _learn(case.make(), case.examples).candidate()
    manifest = candidate.manifest or case.serving.model.manifest
    good = _opened(candidate.model, manifest)
    weight, bias = read_head(candidate.model, manifest.head)
    sabotaged = _opened(replace_head(candidate.model, manifest.head, -weight, -bias), manifest)
    holdout = _holdout(case)
    refused = holdout.judge(sabotaged.run, good.run, enabled=True, margin=0.01)
    assert refused["promoted"] is False, refused
    assert refused["candidate_snips"] < refused["incumbent_snips"]
    assert holdout.judge(good.run, sabotaged.run, enabled=True, margin=0.01)["promoted"]


def test_the_gate_window_round_trips_through_its_state(case: Case) -> None:
    holdout = _holdout(case)
    restored = Holdout.from_state(_through_json(holdout.state()))
    run = case.serving.model.run
    np.testing.assert_array_equal(restored.greedy_targets(run), holdout.greedy_targets(run))
    assert restored.reward == holdout.reward and restored.propensity == holdout.propensity
