"""Categorical features (issue 14): a spec names string-valued features with a vocabulary or a
number of hash buckets, and requests, log files and the model agree on the columns they become,
so a user never one-hots by hand."""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from policyloop_client import Categorical, Client
from policyloop_client import InvalidArgument as ClientInvalidArgument

from policyloop import cli
from policyloop.bus import interface as bus
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import DecisionEvent
from policyloop.contract.signature import Manifest
from policyloop.contract.spec import parse_spec
from policyloop.registry.cold_start import cold_start
from policyloop.registry.local import LocalRegistry
from serving.config import PolicyConfig
from tests.server_harness import ServerThread, serve_config
from tests.test_server import read_topic

SPEC = """
name = "router"
kind = "actions"
actions = ["billing", "tech"]
[features]
context = ["age", "plan", "country"]
[features.categorical]
plan = ["free", "pro"]
country = { hash = 8 }
"""
COLUMNS = ("age", "plan=free", "plan=pro", *(f"country#{i}" for i in range(8)))


def _bucket(value: str) -> int:
    return zlib.crc32(value.encode()) % 8


def test_a_categorical_feature_becomes_its_block_of_columns_in_the_spec_and_the_manifest(
        ) -> None:
    spec = parse_spec(SPEC)
    assert spec.features.context == COLUMNS
    assert [name for name, _ in spec.features.fields("context")] == ["age", "plan", "country"]
    _, manifest, _ = cold_start(spec)
    assert Manifest.from_json(manifest.to_json()).features == spec.features
    other = parse_spec(SPEC.replace('["free", "pro"]', '["free", "pro", "team"]'))
    assert other.features.hash != spec.features.hash  # a new vocabulary is another model


@pytest.mark.parametrize(("table", "message"), [
    ("colour = [\"red\"]", "features.categorical.colour: 'colour' is not in features.context"),
    ("plan = []", "features.categorical.plan: a vocabulary is a non-empty list"),
    ("plan = [\"a\", \"a\"]", "features.categorical.plan: 'a' appears twice"),
    ("plan = [\"a\", 3]", "features.categorical.plan: a vocabulary is a non-empty list of "
                          "non-empty strings, got ['a', 3]"),
    ("plan = { hash = 0 }", "features.categorical.plan.hash: the number of hashed columns, "
                            "an int in [1, 65536], got 0"),
    ("plan = { hash = true }", "features.categorical.plan.hash: the number of hashed columns"),
    ("plan = { buckets = 4 }", "features.categorical.plan: a list of values or { hash = N } "
                               "is required, got {'buckets': 4}"),
    ("plan = \"free\"", "features.categorical.plan: a list of values or { hash = N }"),
])
def test_a_bad_categorical_entry_is_refused_naming_the_key_and_value(table: str,
                                                                     message: str) -> None:
    text = ('name = "r"\nkind = "actions"\nactions = ["a", "b"]\n[features]\n'
            'context = ["plan"]\n[features.categorical]\n' + table + "\n")
    with pytest.raises(InvalidArgument, match="^" + message.replace("[", r"\[")
                       .replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        parse_spec(text)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("categorical")
    model, manifest, posterior = cold_start(parse_spec(SPEC))
    LocalRegistry(tmp / "registry").publish("router", model, manifest,
                                            {"head.npz": posterior.to_npz_bytes()})
    running = ServerThread(serve_config(tmp, policies={"router": PolicyConfig(strategy="greedy")}))
    yield running
    running.stop()


def _logged_context(server: ServerThread, event_id: str) -> np.ndarray:
    values = read_topic(server, bus.DECISIONS, event_id.encode())
    (event,) = [e for e in map(DecisionEvent.from_bytes, values) if e.event_id == event_id]
    return event.context


def test_the_client_sends_strings_and_the_model_sees_their_columns(server: ServerThread) -> None:
    with Client(server.target, timeout=10) as client:
        decision = client.decide("router", {"age": 41.0, "plan": "pro", "country": "FR"},
                                 event_id="cat-1")
        unseen = client.decide("router", {"age": 7.0, "plan": "gold", "country": "JP"},
                               event_id="cat-2")
        info = client.policy_info("router")
    assert info.context_features == COLUMNS
    assert info.categorical == (Categorical("plan", ("free", "pro"), 0),
                                Categorical("country", (), 8))
    assert decision.action in ("billing", "tech") and unseen.event_id == "cat-2"
    want = np.zeros(len(COLUMNS), np.float32)
    want[[0, 2, 3 + _bucket("FR")]] = [41.0, 1.0, 1.0]
    np.testing.assert_array_equal(_logged_context(server, "cat-1"), want)
    gold = np.zeros(len(COLUMNS), np.float32)  # outside the vocabulary: no plan column set
    gold[[0, 3 + _bucket("JP")]] = [7.0, 1.0]
    np.testing.assert_array_equal(_logged_context(server, "cat-2"), gold)


@pytest.mark.parametrize(("context", "message"), [
    ({"age": "old", "plan": "pro", "country": "FR"},
     "context.categorical: 'age' is numeric: send it in named"),
    ({"age": 1.0, "plan": 1.0, "country": "FR"},
     "context.named: 'plan' is categorical: send its value as a string in context.categorical"),
    ({"age": 1.0, "plan": "pro", "country": "FR", "city": "Lyon"},
     "context.categorical: 'city' is no categorical feature of the policy"),
    ({"age": 1.0, "country": "FR"},
     "context.named lacks 1 of the policy's 3 features ('plan')"),
])
def test_a_request_mixing_up_numbers_and_categories_is_refused_by_name(
        server: ServerThread, context: dict, message: str) -> None:
    with Client(server.target, timeout=10) as client, \
            pytest.raises(ClientInvalidArgument, match=message.replace("(", r"\(")
                          .replace(")", r"\)")):
        client.decide("router", context)


def test_a_policy_trained_on_a_csv_with_a_categorical_column_learns_what_it_means(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Logged uniformly at random: billing pays on the free plan, tech on the pro one. The
    plan is text in the file; the trained model must tell them apart through its columns."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(600):
        plan = str(rng.choice(["free", "pro"]))
        action = str(rng.choice(["billing", "tech"]))
        good = (plan == "free") == (action == "billing")
        rows.append({"age": round(float(rng.uniform(18, 80)), 1), "plan": plan,
                     "country": str(rng.choice(["FR", "US", "JP"])), "action": action,
                     "reward": float(good), "propensity": 0.5})
    data = tmp_path / "logs.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "spec.toml").write_text(SPEC)
    registry = tmp_path / "registry"
    assert cli.main(["train", "--spec", str(tmp_path / "spec.toml"), "--data", str(data),
                     "--registry", str(registry), "--epochs", "30"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["rows_used"] == 600
    version = LocalRegistry(registry).current("router")
    assert version.manifest.features.context == COLUMNS
    from policyloop.registry.onnx_model import open_model
    model = open_model(version.read_model(), version.manifest, None,
                       providers=["CPUExecutionProvider"])
    contexts = np.zeros((2, len(COLUMNS)), np.float32)
    contexts[:, 0] = 40.0
    contexts[0, 1] = contexts[1, 2] = 1.0  # free, pro
    scores, _ = model.run(contexts)
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1, scores
