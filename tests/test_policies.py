"""The torch policies: shapes for any candidate count, a replaceable head, rebuildable configs."""

from __future__ import annotations

import pytest
import torch

from models import policies
from models.policies import QNetwork, ScoringNetwork
from policyloop.contract.errors import InvalidArgument


def test_scoring_network_takes_any_number_of_candidates() -> None:
    torch.manual_seed(0)
    net = ScoringNetwork(4, 3, hidden=8, embedding_dim=5)
    context = torch.randn(2, 4)
    for k in (1, 7, 50):
        scores, emb = net(context, torch.randn(2, k, 3))
        assert scores.shape == (2, k) and emb.shape == (2, k, 5)


def test_scoring_network_scores_each_candidate_independently_of_the_others() -> None:
    torch.manual_seed(0)
    net = ScoringNetwork(4, 3, hidden=8, embedding_dim=5)
    context, candidates = torch.randn(3, 4), torch.randn(3, 6, 3)
    scores, _ = net(context, candidates)
    subset, _ = net(context, candidates[:, [4, 1]])
    torch.testing.assert_close(subset, scores[:, [4, 1]])


def test_qnetwork_scores_every_fixed_action() -> None:
    net = QNetwork(4, 6, hidden=8, embedding_dim=5)
    scores, emb = net(torch.randn(3, 4))
    assert scores.shape == (3, 6) and emb.shape == (3, 5)


def _apply_head(net: ScoringNetwork | QNetwork, embedding: torch.Tensor) -> torch.Tensor:
    scores = embedding @ net.head.weight.T + net.head.bias
    return scores.squeeze(-1) if net.kind.per_action_features else scores


@pytest.mark.parametrize("net, args", [
    (ScoringNetwork(4, 3, hidden=8, embedding_dim=5), (torch.randn(2, 4), torch.randn(2, 7, 3))),
    (QNetwork(4, 6, hidden=8, embedding_dim=5), (torch.randn(2, 4),)),
], ids=["scoring", "qnet"])
def test_scores_are_the_head_applied_to_the_embedding_so_the_head_is_replaceable(net,
                                                                                 args) -> None:
    with torch.no_grad():
        scores, emb = net(*args)
        torch.testing.assert_close(scores, _apply_head(net, emb))
        net.head.weight.copy_(torch.randn_like(net.head.weight))
        net.head.bias.fill_(0.25)
        new_scores, new_emb = net(*args)
    torch.testing.assert_close(new_emb, emb)  # the body is untouched
    torch.testing.assert_close(new_scores, _apply_head(net, emb))
    assert not torch.allclose(new_scores, scores)


@pytest.mark.parametrize("net", [ScoringNetwork(4, 3, hidden=8, embedding_dim=5),
                                 QNetwork(4, 6, hidden=8, embedding_dim=5)],
                         ids=["scoring", "qnet"])
def test_build_rebuilds_a_network_from_its_config(net) -> None:
    rebuilt = policies.build(net.config)
    rebuilt.load_state_dict(net.state_dict())
    context = torch.randn(2, 4)
    features = torch.randn(2, 5, 3) if net.kind.per_action_features else None
    with torch.no_grad():
        torch.testing.assert_close(policies.score(rebuilt, context, features)[0],
                                   policies.score(net, context, features)[0])


def test_build_refuses_an_unknown_kind() -> None:
    with pytest.raises(InvalidArgument, match="unknown network kind 'tree'"):
        policies.build({"kind": "tree", "context_dim": 4})
