"""The torch network learner: refits the whole network from joined bus examples, improves on
the simulator's truth, and resumes from its checkpoint to the uninterrupted run's network."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.export import export_and_register
from models.network_learner import NetworkLearner, network_learner
from models.training import TrainConfig, evaluate, save_checkpoint, train_offline
from online.config import LearnConfig
from online.learner import Learner
from policyloop.bus.local_log import LocalLog
from policyloop.contract.errors import InvalidArgument
from policyloop.registry.local import LocalRegistry
from tests.bandit_stream import routing_events, write


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weak start (500 logged events, one epoch) as v1 with its torch checkpoint, and 4,000
    uniformly logged routing events on the bus."""
    root = tmp_path_factory.mktemp("network")
    result = train_offline(TrainConfig(scenario="routing", n_logged=500, epochs=1))
    save_checkpoint(result, root / "start.pt")
    export_and_register(result.model, result.env, LocalRegistry(root / "registry"),
                        policy="routing", training=result.summary)
    producer = LocalLog(root / "bus", partitions=2).producer()
    write(producer, routing_events(4000, seed=2))
    producer.close()
    return root


def _learner(root: Path, **changes: Any) -> Learner:
    config = replace(LearnConfig(registry=root / "registry", policy="routing",
                                 bus_path=root / "bus", partitions=2,
                                 checkpoint=root / "ckpt.json", window_ms=1000,
                                 publish_every=1500, publish_interval_s=1e9,
                                 publish_ramp=False, idle_exit_s=2.0, gate=False), **changes)
    return Learner(config, network_learner(root / "start.pt", epochs=2))


def _network(learner: Learner) -> NetworkLearner:
    assert isinstance(learner.algorithm, NetworkLearner)
    return learner.algorithm


def _body(root: Path) -> dict[str, np.ndarray]:
    version = LocalRegistry(root / "registry").current("routing")
    graph = onnx.load_from_string(version.read_model()).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_the_network_learner_improves_the_whole_network(base: Path, tmp_path: Path) -> None:
    root = shutil.copytree(base, tmp_path / "run")
    learner = _learner(root)
    start = evaluate(_network(learner).network, _network(learner).env, seed=99)["value_trained"]
    learner.run()
    learner.finish()
    assert [p["version"] for p in learner.published] == [2, 3, 4]
    final = evaluate(_network(learner).network, _network(learner).env, seed=99)["value_trained"]
    assert final > start + 0.05, (start, final)
    first, last = _body(base), _body(root)
    changed = [name for name in first if not np.allclose(first[name], last[name])]
    head = LocalRegistry(root / "registry").current("routing").manifest.head
    assert len(set(changed) - {head.weight, head.bias}) >= 2, changed  # not only the head
    manifest = LocalRegistry(root / "registry").current("routing").manifest
    assert manifest.training["learner"] == "network"
    assert manifest.training["parity_max_abs_diff"] < 1e-5


def test_a_restarted_network_learner_ends_with_the_uninterrupted_network(
        base: Path, tmp_path: Path) -> None:
    clean_root = shutil.copytree(base, tmp_path / "clean")
    clean = _learner(clean_root)
    clean.run()
    clean.finish()
    root = shutil.copytree(base, tmp_path / "restarted")
    cut = _learner(root, max_examples=2500)  # one publish and checkpoint, then "killed"
    cut.run()
    checkpointed = json.loads((root / "ckpt.json").read_text())["examples"]
    resumed = _learner(root)
    assert resumed.examples == checkpointed < cut.examples  # the rest is read again
    assert 0 < len(_network(resumed).replay) < len(_network(cut).replay)
    resumed.run()
    resumed.finish()
    assert resumed.examples == clean.examples
    for name, values in _body(clean_root).items():
        np.testing.assert_allclose(_body(root)[name], values, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_the_network_learner_refuses_shards_and_q_learning(base: Path) -> None:
    with pytest.raises(InvalidArgument, match="runs alone"):
        _learner(base, shard_count=2)
    with pytest.raises(InvalidArgument, match="runs alone"):
        _learner(base, discount=0.5)
