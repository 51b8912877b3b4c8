"""PyTorch policies in neural-linear form: a body that embeds, a last linear layer that scores.

The online learner refreshes only the last layer (and its posterior), without torch: it reads
the embeddings the ONNX model outputs, fits a Bayesian linear regression on them, and writes the
new weights into the ONNX file (``policyloop/registry/onnx_head.py``). So every network here
returns both ``scores`` and the ``embedding`` the head reads, and scores are predicted rewards
(trained by regression), the same units the linear learner works in.

Each network is the torch counterpart of one policy kind (``policyloop/contract/kinds.py``):
it knows the kind, its own configuration, and the example inputs its export traces. Adding a
kind adds its network here and one entry in ``NETWORKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.kinds import PolicyKind, kind_of


@dataclass(frozen=True)
class NetworkConfig:
    """What rebuilds a network (checkpoints and manifests store it as a dict)."""

    kind: str  # a policy kind's name
    context_dim: int
    action_dim: int = 0  # per-candidate features (ranking)
    n_actions: int = 0  # size of the fixed action set
    hidden: int = 64
    embedding_dim: int = 32  # H, the width the neural-linear head reads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NetworkConfig:
        try:
            return cls(**raw)
        except TypeError as exc:
            raise InvalidArgument(f"network config {raw!r} is malformed: {exc}") from exc


class ScoringNetwork(nn.Module):
    """Scores a variable candidate set: context [B, Dc] and action_features [B, K, Da] ->
    scores [B, K] and embedding [B, K, H].

    The body sees the context, the candidate, and their elementwise product in a shared
    projection, so bilinear user-item affinities are easy to represent.
    """

    kind: ClassVar[PolicyKind] = kind_of("scoring")
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {
        "context": {0: "batch"}, "action_features": {0: "batch", 1: "candidates"},
        "scores": {0: "batch", 1: "candidates"}, "embedding": {0: "batch", 1: "candidates"}}

    def __init__(self, context_dim: int, action_dim: int, *, hidden: int = 64,
                 embedding_dim: int = 32) -> None:
        super().__init__()
        self.config = NetworkConfig("scoring", context_dim, action_dim=action_dim,
                                    hidden=hidden, embedding_dim=embedding_dim)
        self.context_proj = nn.Linear(context_dim, hidden)
        self.action_proj = nn.Linear(action_dim, hidden)
        self.body = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, embedding_dim), nn.Tanh())
        self.head = nn.Linear(embedding_dim, 1)

    def example_inputs(self, batch: int, candidates: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch, self.config.context_dim),
                torch.zeros(batch, candidates, self.config.action_dim))

    def forward(self, context: torch.Tensor,
                action_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.action_proj(action_features)
        c = self.context_proj(context).unsqueeze(1).expand_as(a)
        embedding = self.body(torch.cat([c, a, c * a], dim=-1))
        return self.head(embedding).squeeze(-1), embedding


class QNetwork(nn.Module):
    """Action values of a fixed action set: context [B, Dc] -> scores [B, A] and
    embedding [B, H]; one head row per action."""

    kind: ClassVar[PolicyKind] = kind_of("qnet")
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {
        "context": {0: "batch"}, "scores": {0: "batch"}, "embedding": {0: "batch"}}

    def __init__(self, context_dim: int, n_actions: int, *, hidden: int = 64,
                 embedding_dim: int = 32) -> None:
        super().__init__()
        self.config = NetworkConfig("qnet", context_dim, n_actions=n_actions, hidden=hidden,
                                    embedding_dim=embedding_dim)
        self.body = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, embedding_dim), nn.Tanh())
        self.head = nn.Linear(embedding_dim, n_actions)

    def example_inputs(self, batch: int, candidates: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch, self.config.context_dim),)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(context)
        return self.head(embedding), embedding


PolicyNetwork = ScoringNetwork | QNetwork  # a network of any kind

# kind name -> its network, built from a config
NETWORKS: dict[str, Callable[[NetworkConfig], PolicyNetwork]] = {
    "scoring": lambda c: ScoringNetwork(c.context_dim, c.action_dim, hidden=c.hidden,
                                        embedding_dim=c.embedding_dim),
    "qnet": lambda c: QNetwork(c.context_dim, c.n_actions, hidden=c.hidden,
                               embedding_dim=c.embedding_dim),
}


def build(config: NetworkConfig | dict[str, Any]) -> PolicyNetwork:
    """Rebuild a network from its config (checkpoints store it as a dict)."""
    if isinstance(config, dict):
        config = NetworkConfig.from_dict(config)
    if config.kind not in NETWORKS:
        raise InvalidArgument(f"unknown network kind {config.kind!r}; kinds with a network "
                              f"are {sorted(NETWORKS)}")
    return NETWORKS[config.kind](config)


def score(model: PolicyNetwork, context: torch.Tensor,
          action_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a network of any kind with the inputs it takes."""
    if isinstance(model, ScoringNetwork):
        assert action_features is not None, "a ranking network scores candidates' features"
        return model(context, action_features)
    return model(context)
