"""``policyloop learn --network CHECKPOINT``: the slower learner that refits the whole torch
network online, not only its last layer.

It reads and joins the bus like the head learner (``online/learner.py``: same consumer,
reward join, checkpoints, gate and publishing), but instead of updating linear statistics it
keeps a replay window of the latest joined examples. At every publish it continues training
the network on that window with the offline objective (``models/training.py``: IPS-weighted
regression on the logged action, then regression on doubly-robust pseudo-rewards, weights
clipped), exports it with the parity check, and gates it against the serving version on the
held-out events: both act greedily, each valued by SNIPS. Exploration stays the server's
(epsilon-greedy or any strategy), so the updates are epsilon-greedy with IPS/DR corrections.

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
import time
import zlib
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models import policies
from models.export import export_onnx, initial_posterior
from models.training import TrainConfig, _fit, dr_targets, load_checkpoint, make_env, predict
from online.config import LearnConfig
from online.gate import judge_targets
from online.join import Example
from online.learner import Learner
from policyloop.contract.errors import InvalidArgument
from policyloop.registry.onnx_model import load_model
from policyloop.simulators.logged import LoggedBandit


@dataclass(frozen=True)
class _Row:
    context: np.ndarray  # float32 [Dc]
    action_features: np.ndarray | None  # float32 [K, Da] (ranking) or None
    action: int  # index among the candidates (ranking) or in the fixed action set
    propensity: float
    reward: float
    allowed: np.ndarray | None = None  # fixed action set: the positions the request allowed


class NetworkLearner(Learner):
    def __init__(self, config: LearnConfig, network: Path, *, epochs: int = 2,
                 replay: int = 20_000, holdout: int = 1000, clip: float = 50.0,
                 lr: float = 1e-3, seed: int = 0) -> None:
        if config.shard_count > 1 or config.discount:
            raise InvalidArgument("the network learner runs alone (no --shard) and learns a "
                                  "bandit (no --discount)")
        if epochs < 1 or replay < 100:
            raise InvalidArgument(f"network epochs must be >= 1 and replay >= 100, got "
                                  f"{epochs} and {replay}")
        self.network, scenario, env_kwargs, _ = load_checkpoint(network)
        self.env = make_env(scenario, **env_kwargs)
        self.train_config = TrainConfig(scenario=scenario, lr=lr, clip=clip, seed=seed,
                                        env=env_kwargs)
        self.epochs = epochs
        self.replay: deque[_Row] = deque(maxlen=replay)
        self.raw_holdout: deque[_Row] = deque(maxlen=holdout)
        self._rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        super().__init__(config)
        if self.model.manifest.features.hash != self.env.feature_schema.hash:
            raise InvalidArgument(f"network {network} was trained on another feature schema "
                                  f"than {config.policy} v{self.model.version} serves")

    # -- learning: keep the example ------------------------------------------------------

    def learn(self, example: Example) -> None:
        d = example.decision
        if d.baseline_action is not None:
            return  # apprentice mode: the app chose, its propensity is unknown
        chosen, allowed = d.chosen[0], None
        if self.model.manifest.kind == "qnet":  # the network scores the fixed action set
            allowed = np.array([self.model.action_positions[a] for a in d.action_ids])
            chosen = int(allowed[chosen])
        row = _Row(np.asarray(d.context, np.float32),
                   None if d.action_features is None else np.asarray(d.action_features,
                                                                     np.float32),
                   int(chosen), float(d.propensities[0]), float(example.reward), allowed)
        self.examples += 1
        if (self.config.holdout_every
                and zlib.crc32(d.event_id.encode()) % self.config.holdout_every == 0):
            self.raw_holdout.append(row)
            return
        self.replay.append(row)
        self.since_publish += 1
        if example.reward_ms is not None:
            self.latest_reward_ms = max(self.latest_reward_ms, example.reward_ms)

    # -- publishing: train, export, gate -------------------------------------------------

    def publish(self) -> dict:
        candidate = copy.deepcopy(self.network)
        data = _batch(list(self.replay))
        candidate.train()
        ips_epochs = max(1, self.epochs // 2)
        _fit(candidate, data, self.train_config, ips_epochs, None, self._rng)
        if self.epochs > ips_epochs:
            q = predict(candidate, data.context, data.action_features)
            _fit(candidate, data, self.train_config, self.epochs - ips_epochs,
                 dr_targets(q, data, self.train_config.clip), self._rng)
        candidate.eval()
        evaluation = self._judge(candidate)
        promote = evaluation["promoted"]
        manifest = self.model.manifest
        model_bytes, exported = export_onnx(candidate, self.env, policy=self.config.policy,
                                            training={})
        new_manifest = replace(exported, parent_version=manifest.version, evaluation=evaluation,
                               training={"online": True, "learner": "network",
                                         "examples": self.examples, "replay": len(data),
                                         "latest_reward_ms": self.latest_reward_ms,
                                         "parity_max_abs_diff":
                                             exported.training["parity_max_abs_diff"],
                                         "joiner": vars(self.joiner.stats)})
        posterior = initial_posterior(candidate, self.env, seed=int(self._rng.integers(1 << 30)))
        version = self.registry.publish(self.config.policy, model_bytes, new_manifest,
                                        {"head.npz": posterior.to_npz_bytes()},
                                        make_current=promote)
        record = {"version": version.version, "examples": self.examples,
                  "latest_reward_ms": self.latest_reward_ms, **evaluation}
        self.published.append(record)
        if promote:
            self.network = candidate
            self.model = load_model(version, expected=manifest, providers=self._providers)
            self.model_bytes = model_bytes
        self.since_publish = 0
        self._last_publish = time.monotonic()
        self.checkpoint()
        return record

    def _judge(self, candidate: torch.nn.Module) -> dict:
        """Greedy candidate network vs the serving model on the held-out rows."""
        rows = list(self.raw_holdout)
        cand, inc = np.zeros(len(rows)), np.zeros(len(rows))
        for i, row in enumerate(rows):
            ctx = row.context[None]
            act = None if row.action_features is None else row.action_features[None]
            with torch.no_grad():
                scores, _ = policies.score(candidate, torch.from_numpy(ctx),
                                           None if act is None else torch.from_numpy(act))
            served, _ = self.model.run(ctx, act)
            cand[i] = float(_greedy(scores[0].numpy(), row.allowed) == row.action)
            inc[i] = float(_greedy(served[0], row.allowed) == row.action)
        return judge_targets(cand, inc, np.array([r.reward for r in rows]),
                             np.array([r.propensity for r in rows]),
                             enabled=self.config.gate, margin=self.config.gate_margin)

    # -- checkpoint: the network and both windows, in the learner's one file --------------

    def _extra_state(self) -> dict:
        buffer = io.BytesIO()
        torch.save({"state_dict": self.network.state_dict(),
                    "replay": list(self.replay), "holdout": list(self.raw_holdout),
                    "rng": self._rng.bit_generator.state}, buffer)
        return {"network": base64.b64encode(buffer.getvalue()).decode()}

    def _restore_extra(self, state: dict) -> None:
        saved = torch.load(io.BytesIO(base64.b64decode(state["network"])), weights_only=False)
        self.network.load_state_dict(saved["state_dict"])
        self.replay.extend(saved["replay"])
        self.raw_holdout.extend(saved["holdout"])
        self._rng.bit_generator.state = saved["rng"]


def _greedy(scores: np.ndarray, allowed: np.ndarray | None) -> int:
    """The best-scored action, among the allowed ones when the request restricted them."""
    if allowed is None:
        return int(np.argmax(scores))
    return int(allowed[int(np.argmax(scores[allowed]))])


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
