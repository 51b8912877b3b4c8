"""Q-learning (DQN-style targets) on sequential decisions: a two-state problem where the
myopic choice is wrong, learned from a logged uniform-random trajectory on the bus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from online.config import LearnConfig
from online.learner import Learner
from online.qlearning import QTargets
from policyloop.bus import interface as bus
from policyloop.bus.local_log import LocalLog
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import DecisionEvent, RewardEvent
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_head import read_head
from tests.onnx_models import qnet_model, scoring_model

GOOD, BAD = np.array([1.0, 0.0]), np.array([0.0, 1.0])


def _trajectory(n: int, seed: int) -> list[tuple[str, bytes, bytes]]:
    """In GOOD, action 0 pays 0.7 but leads to BAD (which pays nothing and returns to GOOD);
    action 1 pays 0.5 and stays in GOOD. A bandit prefers 0; with discount 0.8 the optimal
    policy takes 1 (Q(GOOD, 1) = 2.5 > Q(GOOD, 0) = 2.3). Actions are uniform at random; the
    reward is the expected one, so the test sees the algorithm, not the noise."""
    rng = np.random.default_rng(seed)
    state, out = GOOD, []
    for i in range(n):
        action = int(rng.integers(2))
        t = 1_000_000 + 10 * i
        d = DecisionEvent(
            event_id=f"mdp-{i}", policy="mdp", model_version=1, timestamp_ms=t,
            context=state.astype(np.float32), action_ids=["queue-0", "queue-1"],
            action_features=None, chosen=[action], propensities=[0.5],
            probabilities=np.full((1, 2), 0.5), strategy="uniform", active=True,
            baseline_action=None, policy_action=None)
        good = state is GOOD
        p = (0.7 if action == 0 else 0.5) if good else 0.0
        reward = RewardEvent(event_id=d.event_id, policy="mdp",
                             value=p, slot_rewards=[], timestamp_ms=t + 50)
        out += [(bus.DECISIONS, d.key, d.to_bytes()), (bus.REWARDS, reward.key, reward.to_bytes())]
        state = BAD if good and action == 0 else GOOD
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mdp")
    LocalRegistry(root / "registry").publish(
        "mdp", *qnet_model(policy="mdp", context_dim=2, n_actions=2, hidden=4))
    producer = LocalLog(root / "bus", partitions=2).producer()
    for topic, key, value in _trajectory(20_000, seed=0):
        producer.send(topic, value, key)
    producer.flush()
    producer.close()
    return root


def _greedy_in(root: Path, registry: Path, state: np.ndarray) -> int:
    from policyloop.registry.onnx_model import choose_providers, load_model

    version = LocalRegistry(registry).current("mdp")
    scores, _ = load_model(version, expected=None, providers=choose_providers(False)).run(
        state.astype(np.float32)[None])
    return int(np.argmax(scores[0]))


@pytest.mark.parametrize("discount, best", [(0.0, 0), (0.8, 1)])
def test_q_learning_sees_past_the_myopic_choice(logged: Path, tmp_path: Path,
                                                discount: float, best: int) -> None:
    registry = tmp_path / "registry"
    import shutil

    shutil.copytree(logged / "registry", registry)
    learner = Learner(LearnConfig(
        registry=registry, policy="mdp", bus_path=logged / "bus", partitions=2,
        group=f"g-{discount}", checkpoint=tmp_path / "ckpt.json", window_ms=1000,
        publish_every=100, idle_exit_s=2.0, gate=False, discount=discount, prior=0.1,
        gamma=0.998))
    learner.run()
    learner.finish()
    assert learner.examples > 19_000 and len(learner.published) > 150
    assert _greedy_in(logged, registry, GOOD) == best
    if discount:  # Q(GOOD, .) reaches 2.5 / 2.3, not the immediate 0.5 / 0.7
        version = LocalRegistry(registry).current("mdp")
        weight, bias = read_head(version.read_model(), version.manifest.head)
        _, emb = learner.model.run(GOOD.astype(np.float32)[None])
        q = weight @ emb[0] + bias
        np.testing.assert_allclose(q, [2.3, 2.5], rtol=0.05)


def test_targets_add_the_discounted_best_next_value_of_the_target_network() -> None:
    q = QTargets(0.5, weight=np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]),
                 bias=np.array([0.0, 0.5, 0.0]))
    assert q.step(np.array([1.0, 1.0]), head=2, reward=1.0, allowed=np.array([0, 1]),
                  train=True) is None  # waits for its successor
    previous = q.step(np.array([0.2, 0.4]), head=0, reward=0.0, allowed=np.array([0, 1]),
                      train=False)
    assert previous is not None
    x, head, target = previous
    # max over the allowed actions 0 and 1 only: 0.2 vs 0.8 + 0.5 (action 2 would be 1.8)
    assert head == 2 and np.allclose(x, [1.0, 1.0]) and target == pytest.approx(1.0 + 0.5 * 1.3)
    assert q.pending is None  # a held-out example is a next state, never trained on
    q.step(np.array([1.0, 0.0]), head=1, reward=0.25, allowed=np.array([0, 1, 2]), train=True)
    restored = QTargets(0.5, q.weight, q.bias)
    restored.load_state(q.state())
    assert restored.pending is not None and restored.pending[1:] == (1, 0.25)
    np.testing.assert_array_equal(restored.pending[0], [1.0, 0.0])


@pytest.mark.parametrize("discount", [-0.1, 1.0])
def test_a_discount_outside_0_1_is_refused(discount: float) -> None:
    with pytest.raises(InvalidArgument, match="discount"):
        QTargets(discount, np.zeros((1, 1)), np.zeros(1))


def test_q_learning_needs_a_fixed_action_set(tmp_path: Path) -> None:
    LocalRegistry(tmp_path / "registry").publish("recsys", *scoring_model())
    with pytest.raises(InvalidArgument, match="needs a fixed action set"):
        Learner(LearnConfig(registry=tmp_path / "registry", policy="recsys",
                            bus_path=tmp_path / "bus", discount=0.5))
