"""``policyloop learn --network CHECKPOINT``: the slower learner that refits the whole torch
network online, not only its last layer.

It is an online learner like the head learner (``online/learners.py``: the same loop,
consumer, reward join, checkpoints, gate and publishing), but instead of updating linear
statistics it keeps a replay window of the latest joined examples. At every publish it
continues training
the network on that window with the offline objective (``models/training.py``: IPS-weighted
regression on the logged action, then regression on doubly-robust pseudo-rewards, weights
clipped) and exports it with the parity check; the loop's gate judges the exported model
against the serving version on the held-out events, as for every learner. Exploration stays
the server's (epsilon-greedy or any strategy), so the updates are epsilon-greedy with IPS/DR
corrections.

Torch lives here, in ``models/``: the learner image stays torch-free; this one runs in the
trainer image. It needs the torch checkpoint of the serving version's network (``policyloop
train --checkpoint``) and that network's simulator scenario (for the export's parity inputs).
Ranking decisions are trained in groups of one candidate count: rows with another count than
the window's most common one wait in the window until they are the majority or fall out.
"""

from __future__ import annotations

import base64
import copy
import io
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.export import export_onnx, initial_posterior
from models.policies import QNetwork, ScoringNetwork
from models.training import TrainConfig, fit, load_checkpoint, make_env
from online.config import LearnConfig
from online.join import Example
from online.learner import LearnerFactory
from online.learners import Candidate, Serving
from policyloop.contract.errors import InvalidArgument
from policyloop.simulators.logged import LoggedBandit


@dataclass(frozen=True)
class _Row:
    context: np.ndarray  # float32 [Dc]
    action_features: np.ndarray | None  # float32 [K, Da] (ranking) or None
    action: int  # index among the candidates (ranking) or in the fixed action set
    propensity: float
    reward: float
    allowed: np.ndarray | None = None  # fixed action set: the positions the request allowed


class NetworkLearner:
    """Refits the serving version's torch network on a replay window at every candidate."""

    def __init__(self, serving: Serving, config: LearnConfig, network: Path, *,
                 epochs: int = 2, replay: int = 20_000, clip: float = 50.0, lr: float = 1e-3,
                 seed: int = 0) -> None:
        if config.shard_count > 1 or config.discount:
            raise InvalidArgument("the network learner runs alone (no --shard) and learns a "
                                  "bandit (no --discount)")
        if epochs < 1 or replay < 100:
            raise InvalidArgument(f"network epochs must be >= 1 and replay >= 100, got "
                                  f"{epochs} and {replay}")
        self.network, scenario, env_kwargs, _ = load_checkpoint(network)
        self.env = make_env(scenario, **env_kwargs)
        if serving.model.manifest.features.hash != self.env.feature_schema.hash:
            raise InvalidArgument(f"network {network} was trained on another feature schema "
                                  f"than {config.policy} v{serving.model.version} serves")
        self.serving = serving
        self.policy = config.policy
        self.train_config = TrainConfig(scenario=scenario, lr=lr, clip=clip, seed=seed,
                                        env=env_kwargs)
        self.epochs = epochs
        self.replay: deque[_Row] = deque(maxlen=replay)
        self._rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.learned = 0

    def __repr__(self) -> str:
        return (f"NetworkLearner(epochs={self.epochs}, replay={self.replay.maxlen}, "
                f"lr={self.train_config.lr}, clip={self.train_config.clip})")

    # -- learning: keep the example ------------------------------------------------------

    def learn_one(self, example: Example, *, train: bool = True) -> None:
        if not train:
            return
        d, model = example.decision, self.serving.model
        logged = model.manifest.policy_kind.logged(d, model.action_positions)
        self.replay.append(_Row(
            logged.context[0],
            None if logged.action_features is None else logged.action_features[0],
            logged.column, float(d.propensities[0]), float(example.reward), logged.allowed))
        self.learned += 1

    # -- the candidate: train, export ----------------------------------------------------

    def candidate(self) -> Candidate:
        candidate = copy.deepcopy(self.network)
        data = _batch(list(self.replay))
        candidate.train()
        fit(candidate, data, self.train_config, self._rng, epochs=self.epochs)
        candidate.eval()
        model_bytes, exported = export_onnx(candidate, self.env, policy=self.policy,
                                            training={})
        posterior = initial_posterior(candidate, self.env, seed=int(self._rng.integers(1 << 30)))
        return Candidate(model_bytes, {"head.npz": posterior.to_npz_bytes()}, exported,
                         {"learner": "network", "replay": len(data),
                          "parity_max_abs_diff": exported.training["parity_max_abs_diff"]},
                         candidate)

    def adopt(self, candidate: Candidate, serving: Serving) -> None:
        assert isinstance(candidate.handle, ScoringNetwork | QNetwork)
        self.network = candidate.handle
        self.serving = serving

    # -- state: the network, the window and the generator --------------------------------

    def state(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save({"state_dict": self.network.state_dict(), "replay": list(self.replay),
                    "rng": self._rng.bit_generator.state}, buffer)
        return {"network": base64.b64encode(buffer.getvalue()).decode(),
                "learned": self.learned}

    def load_state(self, state: dict[str, Any], serving: Serving) -> None:
        self.serving = serving
        saved = torch.load(io.BytesIO(base64.b64decode(state["network"])), weights_only=False)
        self.network.load_state_dict(saved["state_dict"])
        self.replay.clear()
        self.replay.extend(saved["replay"])
        self._rng.bit_generator.state = saved["rng"]
        self.learned = int(state.get("learned", 0))


def network_learner(network: Path, **options: Any) -> LearnerFactory:
    """The loop's factory for ``policyloop learn --network CHECKPOINT``; ``options`` are
    NetworkLearner's (epochs, replay, clip, lr, seed)."""
    def build(serving: Serving, config: LearnConfig) -> NetworkLearner:
        return NetworkLearner(serving, config, network, **options)
    return build


def _batch(rows: list[_Row]) -> LoggedBandit:
    """The replay window as training data: ranking rows of the most common candidate count."""
    if rows and rows[0].action_features is not None:
        counts: dict[int, int] = {}
        for r in rows:
            counts[len(r.action_features)] = counts.get(len(r.action_features), 0) + 1  # type: ignore[arg-type]
        k = max(counts, key=counts.__getitem__)
        rows = [r for r in rows if len(r.action_features) == k]  # type: ignore[arg-type]
    features = (None if not rows or rows[0].action_features is None
                else np.stack([r.action_features for r in rows]))  # type: ignore[misc]
    n_actions = features.shape[1] if features is not None else 0
    return LoggedBandit(
        context=np.stack([r.context for r in rows]), action_features=features,
        action=np.array([r.action for r in rows], np.int64),
        propensity=np.array([r.propensity for r in rows]),
        reward=np.array([r.reward for r in rows]),
        expected_rewards=np.zeros((len(rows), n_actions)))
