"""Offline training of a neural-linear policy from logged bandit feedback.

Two objectives, both correcting for the logging policy through its propensities p:

- ``ips``: importance-weighted regression of the logged reward on the taken action's score,
  sum_i w_i (f(x_i, a_i) - r_i)^2 with w_i = min(1/p_i, clip). Weighting by 1/p makes the
  fit behave as if actions had been logged uniformly, so rarely logged actions are not
  neglected.
- ``dr`` (default): first the ``ips`` fit q, then full-information regression of every action's
  score on the doubly-robust pseudo-reward
  G(x_i, a) = q(x_i, a) + 1[a = a_i] * w_i * (r_i - q(x_i, a_i))    (Dudik et al., 2011),
  which is unbiased for the true reward of every action, not only the logged one.

The policy is greedy (or explored at serving time) on the scores, which estimate rewards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import policies
from models.policies import PolicyNetwork
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.settings import setting
from policyloop.contract.signature import FeatureSchema, PolicyDefaults
from policyloop.contract.spec import PolicySpec
from policyloop.simulators.logged import (
    HEURISTIC_DESCRIPTION,
    LOGGING_POLICIES,
    LoggedBandit,
    collect_logs,
    logging_probabilities,
    true_policy_value,
)
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one offline training run depends on; the same config gives the same model.
    ``policyloop train`` builds it from these defaults, a TOML file, ``POLICYLOOP_*`` variables
    and its flags (``policyloop/contract/settings.py``)."""

    scenario: str = setting("recsys", "simulator: recsys (scoring network) or routing "
                            "(Q-network)", choices=("recsys", "routing"))
    n_logged: int = setting(20_000, "logged events to learn from")
    epochs: int = setting(8, "passes over the logs, split between the two DR stages")
    batch_size: int = setting(256, "examples per gradient step")
    lr: float = setting(3e-3, "Adam's learning rate")
    objective: str = setting("dr", "ips, or dr: ips then doubly-robust pseudo-rewards",
                             choices=("ips", "dr"))
    clip: float = setting(50.0, "importance weights are min(1 / propensity, this)")
    hidden: int = setting(64, "hidden layer width")
    embedding_dim: int = setting(32, "H, the width the neural-linear head reads")
    logging_policy: str = setting("heuristic", "the policy that logged the data "
                                  "(policyloop/simulators/logged.py)", choices=LOGGING_POLICIES)
    seed: int = setting(0, "seed of the logs, the shuffling and torch")
    env: dict[str, Any] = setting(help="simulator keyword argument, e.g. seed=3 for another "
                                  "world (repeatable; VALUE a TOML value; a [env] table in "
                                  "the file)", factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in ("recsys", "routing"):
            raise InvalidArgument(f"scenario must be recsys or routing, got {self.scenario!r}")
        if self.objective not in ("ips", "dr"):
            raise InvalidArgument(f"objective must be ips or dr, got {self.objective!r}")
        if self.logging_policy not in LOGGING_POLICIES:
            raise InvalidArgument(f"logging_policy must be one of {LOGGING_POLICIES}, "
                                  f"got {self.logging_policy!r}")
        for name in ("n_logged", "epochs", "batch_size", "hidden", "embedding_dim"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if not self.clip >= 1:
            raise InvalidArgument(f"clip must be >= 1, got {self.clip}")


@dataclass
class TrainResult:
    model: PolicyNetwork
    env: RecsysEnv | RoutingEnv
    config: TrainConfig
    summary: dict[str, Any]


def make_env(scenario: str, **kwargs: Any) -> RecsysEnv | RoutingEnv:
    return RecsysEnv(**kwargs) if scenario == "recsys" else RoutingEnv(**kwargs)


def new_network(features: FeatureSchema, n_actions: int, cfg: TrainConfig) -> PolicyNetwork:
    """A scoring network when candidates have features (ranking), else a Q-network over
    ``n_actions`` fixed actions; sized from the feature names."""
    dc = len(features.context)
    if features.action:
        return policies.ScoringNetwork(dc, len(features.action), hidden=cfg.hidden,
                                       embedding_dim=cfg.embedding_dim)
    return policies.QNetwork(dc, n_actions, hidden=cfg.hidden, embedding_dim=cfg.embedding_dim)


def train_logged(data: LoggedBandit, cfg: TrainConfig) -> PolicyNetwork:
    """The policy's network trained on ``data`` (a simulator's logs or an app's file) with
    ``cfg``'s objective; in eval mode. Seeded by ``cfg.seed``."""
    if data.features is None:
        raise InvalidArgument("training data must name its features (LoggedBandit.features)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = new_network(data.features, len(data.actions), cfg)
    fit(model, data, cfg, rng, epochs=cfg.epochs, objective=cfg.objective)
    model.eval()
    return model


def _tensors(data: LoggedBandit) -> tuple[torch.Tensor, torch.Tensor | None]:
    ctx = torch.from_numpy(data.context)
    act = None if data.action_features is None else torch.from_numpy(data.action_features)
    return ctx, act


def predict(model: PolicyNetwork, context: np.ndarray, action_features: np.ndarray | None,
            batch: int = 4096) -> np.ndarray:
    """Scores [N, K] in numpy, in batches."""
    out = []
    with torch.no_grad():
        for s in range(0, len(context), batch):
            ctx = torch.from_numpy(context[s:s + batch])
            act = None if action_features is None else torch.from_numpy(
                action_features[s:s + batch])
            out.append(policies.score(model, ctx, act)[0].numpy())
    return np.concatenate(out).astype(np.float64)


def fit(model: PolicyNetwork, data: LoggedBandit, cfg: TrainConfig, rng: np.random.Generator, *,
        epochs: int, objective: str = "dr") -> None:
    """The offline objective on logged data (module docstring): IPS-weighted regression on the
    logged action for all ``epochs`` (``ips``) or the first half, then regression on
    doubly-robust pseudo-rewards for the rest (``dr``). Offline training and the network
    learner both train with it."""
    ips_epochs = epochs if objective == "ips" else max(1, epochs // 2)
    _regress(model, data, cfg, ips_epochs, None, rng)
    if objective == "dr" and epochs > ips_epochs:
        q = predict(model, data.context, data.action_features)
        _regress(model, data, cfg, epochs - ips_epochs, dr_targets(q, data, cfg.clip), rng)


def _regress(model: PolicyNetwork, data: LoggedBandit, cfg: TrainConfig, epochs: int,
             targets: np.ndarray | None, rng: np.random.Generator) -> None:
    """IPS-weighted regression on the logged action (targets None), or full-information
    regression of every action's score on ``targets`` [N, K]."""
    ctx, act = _tensors(data)
    weights = torch.from_numpy(np.minimum(1.0 / data.propensity, cfg.clip)).float()
    weights = weights / weights.mean()
    reward = torch.from_numpy(data.reward).float()
    action = torch.from_numpy(data.action)
    full = None if targets is None else torch.from_numpy(targets).float()
    # padded candidates (rows with fewer than K) take no part in the full-information loss
    mask = None if data.mask is None else torch.from_numpy(data.mask).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(data)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            scores, _ = policies.score(model, ctx[idx], None if act is None else act[idx])
            if full is None:
                taken = scores.gather(1, action[idx, None]).squeeze(1)
                loss = (weights[idx] * (taken - reward[idx]) ** 2).mean()
            else:
                squared = (scores - full[idx]) ** 2
                loss = (squared.mean() if mask is None
                        else (mask[idx] * squared).sum() / mask[idx].sum())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def dr_targets(q: np.ndarray, data: LoggedBandit, clip: float) -> np.ndarray:
    """Doubly-robust pseudo-rewards [N, K] (module docstring)."""
    rows = np.arange(len(data))
    w = np.minimum(1.0 / data.propensity, clip)
    targets = q.copy()
    targets[rows, data.action] += w * (data.reward - q[rows, data.action])
    return targets


def train_offline(cfg: TrainConfig) -> TrainResult:
    """Collect logs under the logging policy, train, and measure on the simulator's truth."""
    start = time.perf_counter()
    env = make_env(cfg.scenario, **cfg.env)
    data = collect_logs(env, cfg.n_logged, seed=cfg.seed, logging_policy=cfg.logging_policy)
    model = train_logged(data, cfg)
    summary = {
        "scenario": cfg.scenario, "objective": cfg.objective, "n_logged": len(data),
        "logged_reward_mean": float(data.reward.mean()),
        "logging_policy": (HEURISTIC_DESCRIPTION if cfg.logging_policy == "heuristic"
                           else cfg.logging_policy),
        **evaluate(model, env, seed=cfg.seed + 10_000, logging_policy=cfg.logging_policy),
        "seconds": round(time.perf_counter() - start, 2),
        "config": asdict(cfg),
    }
    log.info("trained %s: %s", cfg.scenario, {k: v for k, v in summary.items()
                                               if k.startswith("value")})
    return TrainResult(model, env, cfg, summary)


def evaluate(model: PolicyNetwork, env: RecsysEnv | RoutingEnv, *, seed: int, n: int = 5000,
             logging_policy: str = "heuristic") -> dict[str, float]:
    """True expected reward, on n fresh contexts, of: the trained greedy policy, the logging
    policy, uniform random, and the oracle (the best action of every context)."""
    context, action_features, expected = env.sample_contexts(n, np.random.default_rng(seed))
    scores = predict(model, context, action_features)
    greedy = np.zeros_like(expected)
    greedy[np.arange(n), scores.argmax(axis=1)] = 1.0
    return {
        "value_trained": true_policy_value(greedy, expected),
        "value_logging": true_policy_value(
            logging_probabilities(env, context, action_features, policy=logging_policy),
            expected),
        "value_uniform": float(expected.mean()),
        "value_oracle": float(expected.max(axis=1).mean()),
    }


def save_checkpoint(result: TrainResult, path: Path) -> None:
    """One .pt file: the network's config and weights, the simulator it was trained on, the
    feature schema, the fixed action names (routing) and the training summary."""
    env = result.env
    torch.save({
        "network": result.model.config.to_dict(), "state_dict": result.model.state_dict(),
        "scenario": env.scenario, "env": result.config.env,
        "features": {"context": list(env.feature_schema.context),
                     "action": list(env.feature_schema.action)},
        "actions": list(getattr(env, "action_names", ())), "training": result.summary,
    }, path)


def load_checkpoint(path: Path) -> tuple[PolicyNetwork, str, dict[str, Any], dict[str, Any]]:
    """(network in eval mode, scenario, simulator keyword arguments, training summary)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = policies.build(state["network"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state["scenario"], state["env"], state["training"]


def train_on_file(cfg: TrainConfig, spec: PolicySpec, data_path: Path, *,
                  spec_path: Path | None = None,
                  ) -> tuple[PolicyNetwork, LoggedBandit, dict[str, Any]]:
    """``train --spec SPEC --data FILE``: the app's own log, read and checked against the spec
    (``policyloop/simulators/logfile.py``), trained on with ``cfg``'s objective; (network,
    the rows used, summary). ``spec_path``: where the spec was read, for the summary."""
    from policyloop.simulators.logfile import read_logs

    start = time.perf_counter()
    if spec.model.type == "mlp":  # the spec's sizes over the flags'
        cfg = replace(cfg, hidden=spec.model.hidden, embedding_dim=spec.model.embedding)
    data, report = read_logs(data_path, spec)
    model = train_logged(data, cfg)
    training = {k: v for k, v in asdict(cfg).items()
                if k not in ("scenario", "n_logged", "logging_policy", "env")}
    summary = {"spec": str(spec_path or spec.name), "spec_name": spec.name,
               "policy_kind": spec.kind,
               "objective": cfg.objective, "data": report.summary(),
               "n_logged": len(data),  # rows trained on (a growing SquareCB's clock)
               "logged_reward_mean": float(data.reward.mean()),
               "seconds": round(time.perf_counter() - start, 2), "config": training}
    log.info("trained %s on %s: %s", spec.name, data_path, report.summary())
    return model, data, summary


def train_command(cfg: TrainConfig, *, registry: Path | None, policy: str | None,
                  checkpoint: Path | None, registry_kafka: str = "",
                  spec: Path | None = None, data: Path | None = None) -> int:
    """``policyloop train``: train on a simulator's logs (``cfg.scenario``) or, with ``spec``
    and ``data``, on an app's log file; print the summary, then export and register unless
    told not to (``registry`` None); with ``registry_kafka`` on the Kafka-backed registry,
    cached in ``registry``. The export checks parity on, and fits the posterior to, the rows
    trained on."""
    import json

    if (spec is None) != (data is None):
        raise InvalidArgument("--spec and --data go together: the spec names the file's "
                              "columns and features")
    source: LoggedBandit | RecsysEnv | RoutingEnv
    if spec is not None and data is not None:
        if checkpoint is not None:
            raise InvalidArgument("--checkpoint: not available with --data yet (export "
                                  "reads a simulator's checkpoint)")
        from policyloop.contract.spec import load_spec

        loaded = load_spec(spec)
        model, source, summary = train_on_file(cfg, loaded, data, spec_path=spec)
        name = policy or loaded.name
        defaults = loaded.defaults
    else:
        defaults = PolicyDefaults()
        result = train_offline(cfg)
        model, source, summary, name = result.model, result.env, result.summary, (
            policy or cfg.scenario)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(result, checkpoint)
    report = {k: v for k, v in summary.items() if k != "config"}
    if registry is not None:
        from models.export import export_and_register
        from policyloop.registry.interface import open_registry

        target = open_registry(registry, kafka=registry_kafka)
        try:
            version = export_and_register(model, source, target, policy=name,
                                          training=summary, seed=cfg.seed, defaults=defaults)
        finally:
            target.close()
        report.update(policy=name, version=version.version, registry=str(registry),
                      parity_max_abs_diff=version.manifest.training["parity_max_abs_diff"])
    print(json.dumps(report, indent=2))
    return 0
