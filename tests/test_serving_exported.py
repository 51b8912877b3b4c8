"""Exported torch policies are served as they are, with posterior-based exploration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.export import export_and_register
from models.policies import QNetwork, ScoringNetwork
from policyloop.registry.local import LocalRegistry
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.config import PolicyConfig
from tests.server_harness import ServerThread, channel, serve_config


def test_exported_policies_decide_with_ucb_and_thompson(tmp_path: Path) -> None:
    torch.manual_seed(0)
    registry = LocalRegistry(tmp_path / "registry")
    recsys, routing = RecsysEnv(n_items=100), RoutingEnv()
    export_and_register(ScoringNetwork(16, 16), recsys, registry, policy="recsys", training={})
    export_and_register(QNetwork(len(routing.feature_schema.context), 8), routing, registry,
                        policy="routing", training={})
    server = ServerThread(serve_config(tmp_path, policies={
        "recsys": PolicyConfig(strategy="ucb:1.0:0.05"),
        "routing": PolicyConfig(strategy="thompson:256:0.05")}))
    try:
        with channel(server.target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            obs, info = recsys.reset(seed=0)
            response = stub.Decide(pb.DecideRequest(
                policy="recsys", context=pb.Features(dense=obs["context"]), slots=3,
                candidates=[pb.Candidate(id=i, features=pb.Features(dense=f))
                            for i, f in zip(info["action_ids"], obs["action_features"],
                                            strict=True)]), timeout=5)
            assert response.strategy == "ucb(alpha=1,epsilon=0.05)"
            assert len(response.chosen) == 3
            assert all(0 < c.propensity <= 1 for c in response.chosen)
            obs, info = routing.reset(seed=0)
            names = list(routing.action_names)
            for seed in range(20):
                out = stub.Decide(pb.DecideRequest(
                    policy="routing", context=pb.Features(dense=obs["context"]), seed=seed),
                    timeout=5)
                assert out.chosen[0].action_id in names
                assert 0.05 / 8 <= out.chosen[0].propensity <= 1
    finally:
        server.stop()
    assert np.isfinite(response.chosen[0].propensity)
