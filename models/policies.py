"""PyTorch policies in neural-linear form: a body that embeds, a last linear layer that scores.

The online learner refreshes only the last layer (and its posterior), without torch: it reads
the embeddings the ONNX model outputs, fits a Bayesian linear regression on them, and writes the
new weights into the ONNX file (``policyloop/registry/onnx_head.py``). So every network here returns
both ``scores`` and the ``embedding`` the head reads, and scores are predicted rewards (trained
by regression), the same units the linear learner works in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from policyloop.contract.errors import InvalidArgument


class ScoringNetwork(nn.Module):
    """Scores a variable candidate set: context [B, Dc] and action_features [B, K, Da] ->
    scores [B, K] and embedding [B, K, H].

    The body sees the context, the candidate, and their elementwise product in a shared
    projection, so bilinear user-item affinities are easy to represent.
    """

    def __init__(self, context_dim: int, action_dim: int, *, hidden: int = 64,
                 embedding_dim: int = 32) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"kind": "scoring", "context_dim": context_dim,
                                       "action_dim": action_dim, "hidden": hidden,
                                       "embedding_dim": embedding_dim}
        self.context_proj = nn.Linear(context_dim, hidden)
        self.action_proj = nn.Linear(action_dim, hidden)
        self.body = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, embedding_dim), nn.Tanh())
        self.head = nn.Linear(embedding_dim, 1)

    def forward(self, context: torch.Tensor,
                action_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.action_proj(action_features)
        c = self.context_proj(context).unsqueeze(1).expand_as(a)
        embedding = self.body(torch.cat([c, a, c * a], dim=-1))
        return self.head(embedding).squeeze(-1), embedding


class QNetwork(nn.Module):
    """Action values of a fixed action set: context [B, Dc] -> scores [B, A] and
    embedding [B, H]; one head row per action."""

    def __init__(self, context_dim: int, n_actions: int, *, hidden: int = 64,
                 embedding_dim: int = 32) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"kind": "qnet", "context_dim": context_dim,
                                       "n_actions": n_actions, "hidden": hidden,
                                       "embedding_dim": embedding_dim}
        self.body = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, embedding_dim), nn.Tanh())
        self.head = nn.Linear(embedding_dim, n_actions)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(context)
        return self.head(embedding), embedding


def build(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its ``config`` (checkpoints store it)."""
    params = {k: v for k, v in config.items() if k != "kind"}
    if config["kind"] == "scoring":
        return ScoringNetwork(params.pop("context_dim"), params.pop("action_dim"), **params)
    if config["kind"] == "qnet":
        return QNetwork(params.pop("context_dim"), params.pop("n_actions"), **params)
    raise InvalidArgument(f"unknown network kind {config['kind']!r}")


def score(model: nn.Module, context: torch.Tensor,
          action_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call either kind with the inputs it takes."""
    if model.config["kind"] == "scoring":
        return model(context, action_features)
    return model(context)
