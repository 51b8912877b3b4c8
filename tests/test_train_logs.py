"""Training on your own logs: a simulator writes the file (so the truth is known), ``train
--spec --data`` reads it back through the checks at the door, and what it learns and publishes
is held to what the built-in training reaches on the same rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.training import TrainConfig, evaluate, train_logged, train_on_file
from policyloop import cli
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.spec import load_spec, parse_spec
from policyloop.registry.local import LocalRegistry
from policyloop.simulators.logfile import read_logs, simulate_logs, write_logs
from policyloop.simulators.logged import collect_logs
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

# Measured with models.training.train_offline(TrainConfig(scenario="recsys", n_logged=5000,
# seed=0)) on the same simulator world and rows: trained 0.2894, logging policy 0.1158 by true
# expected reward on 5,000 fresh users, a margin of 0.1736 (oracle 0.3809).
BUILTIN_MARGIN = 0.1736
NOISE = 0.02

ACTIONS_SPEC = parse_spec('name = "r"\nkind = "actions"\nactions = ["a", "b"]\n'
                          '[features]\ncontext = ["x", "y"]\n')
RANKING_SPEC = parse_spec('name = "k"\nkind = "ranking"\n'
                          '[features]\ncontext = ["x"]\naction = ["price"]\n')


def test_a_ranking_policy_trained_from_a_parquet_log_beats_its_logging_policy(tmp_path):
    env = RecsysEnv()
    path = tmp_path / "logs.parquet"
    rows, spec_path = simulate_logs(env, path, 5000, seed=0)
    assert rows == 5000 and spec_path == tmp_path / "logs.spec.toml"
    model, data, summary = train_on_file(TrainConfig(seed=0), load_spec(spec_path), path)
    assert summary["data"]["rows_used"] == 5000
    value = evaluate(model, env, seed=10_000)
    margin = value["value_trained"] - value["value_logging"]
    assert margin >= BUILTIN_MARGIN - NOISE, value


def test_train_from_a_csv_publishes_the_spec_policy_with_parity_and_posterior_on_its_rows(
        tmp_path, capsys):
    path = tmp_path / "routing.csv"
    assert cli.main(["simulate", "--scenario", "routing", "--log-to", str(path),
                     "--events", "400"]) == 0
    registry = tmp_path / "registry"
    assert cli.main(["train", "--spec", str(tmp_path / "routing.spec.toml"), "--data",
                     str(path), "--registry", str(registry), "--epochs", "2",
                     "--policy", "router"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["data"] == {"file": str(path), "rows_read": 400, "rows_used": 400,
                              "rows_dropped": 0, "dropped_by_field": {}}
    version = LocalRegistry(registry).current("router")
    env = RoutingEnv()
    assert version.manifest.actions == env.action_names
    assert version.manifest.features.context == env.feature_schema.context
    assert version.manifest.training["parity_max_abs_diff"] <= 1e-5
    assert version.manifest.training["data"]["rows_used"] == 400
    assert version.manifest.examples_learned == 400  # a growing SquareCB starts from here


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v
                              for k, v in row.items()} for row in rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


GOOD = {"x": 0.5, "y": 1.0, "action": "a", "reward": 1.0, "propensity": 0.5}
GOOD_RANKED = {"x": 0.5, "action": "i1", "reward": 0.0, "propensity": 0.25,
               "candidates": [{"id": "i1", "features": {"price": 1.0}},
                              {"id": "i2", "features": {"price": 2.0}}]}

# (case, spec, the bad row, its field, the message after "FIELD: ")
BAD_ROWS = [
    ("wrong type", ACTIONS_SPEC, {**GOOD, "x": "abc"}, "x", "'abc' is not a number"),
    ("missing value", ACTIONS_SPEC, {**GOOD, "y": None}, "y", "missing"),
    ("NaN reward", ACTIONS_SPEC, {**GOOD, "reward": float("nan")}, "reward", "is not finite"),
    ("propensity 0", ACTIONS_SPEC, {**GOOD, "propensity": 0.0}, "propensity",
     "0.0 is not in (0, 1]"),
    ("propensity 1.5", ACTIONS_SPEC, {**GOOD, "propensity": 1.5}, "propensity",
     "1.5 is not in (0, 1]"),
    ("unknown action", ACTIONS_SPEC, {**GOOD, "action": "c"}, "action",
     "'c' is not one of the spec's actions"),
    ("action not a candidate", RANKING_SPEC, {**GOOD_RANKED, "action": "i9"}, "action",
     "'i9' is not among the row's candidate ids"),
    ("candidate feature missing", RANKING_SPEC,
     {**GOOD_RANKED, "candidates": [{"id": "i1", "features": {}}]},
     "candidates[0].features.price", "missing"),
    ("candidates not a list", RANKING_SPEC, {**GOOD_RANKED, "candidates": "{}"}, "candidates",
     'a non-empty list of {"id", "features"} is required'),
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize(("case", "spec", "row", "field", "message"), BAD_ROWS,
                         ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_is_dropped_and_reported_with_its_line_and_field(
        tmp_path, suffix, case, spec, row, field, message):
    good = GOOD if spec is ACTIONS_SPEC else GOOD_RANKED
    path = _write(tmp_path / f"logs{suffix}", [good, row, good])
    data, report = read_logs(path, spec)
    line = 3 if suffix == ".csv" else 2  # the CSV header is line 1
    if message == "is not finite":
        message = ("'nan' is not finite" if suffix == ".csv" else "nan is not finite")
    assert report.problems == [f"{path}:{line}: {field}: {message}"]
    assert (report.rows_read, report.rows_used, report.dropped) == (3, 2, {field: 1})
    assert len(data) == 2


def test_a_bad_parquet_row_is_reported_by_its_row_index(tmp_path):
    path = _write(tmp_path / "logs.parquet", [GOOD, GOOD, {**GOOD, "propensity": 1.5}])
    _, report = read_logs(path, ACTIONS_SPEC)
    assert report.problems == [f"{path} row 2: propensity: 1.5 is not in (0, 1]"]


@pytest.mark.parametrize(("case", "content", "message"), [
    ("missing column", "x,y,action,reward\n1,2,a,1\n", "column 'propensity' is missing"),
    ("empty file", "", "no rows"),
    ("header only", "x,y,action,reward,propensity\n", "no rows"),
    ("no usable row", "x,y,action,reward,propensity\n1,2,a,1,0\n", "no usable rows"),
])
def test_a_file_that_cannot_train_is_one_line_a_nonzero_exit_and_nothing_published(
        tmp_path, capsys, case, content, message):
    path = tmp_path / "logs.csv"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=message) as err:
        read_logs(path, ACTIONS_SPEC)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    spec = tmp_path / "r.toml"
    spec.write_text('name = "r"\nkind = "actions"\nactions = ["a", "b"]\n'
                    '[features]\ncontext = ["x", "y"]\n')
    registry = tmp_path / "registry"
    assert cli.main(["train", "--spec", str(spec), "--data", str(path),
                     "--registry", str(registry)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith(f"policyloop train: {path}: ")
    assert not registry.exists() or not LocalRegistry(registry).policies()


def test_an_empty_jsonl_or_parquet_file_is_refused(tmp_path):
    jsonl = tmp_path / "logs.jsonl"
    jsonl.write_text("\n")
    with pytest.raises(InvalidArgument, match=f"{jsonl}: no rows"):
        read_logs(jsonl, ACTIONS_SPEC)
    parquet = tmp_path / "logs.parquet"
    pq.write_table(pa.table({"x": pa.array([], pa.float64())}), parquet)
    with pytest.raises(InvalidArgument, match=f"{parquet}: no rows"):
        read_logs(parquet, ACTIONS_SPEC)


@pytest.mark.parametrize("env", [RecsysEnv(n_candidates=5), RoutingEnv()],
                         ids=["recsys", "routing"])
def test_csv_jsonl_and_parquet_read_the_same_rows_the_simulator_logged(tmp_path, env):
    from policyloop.simulators.logfile import scenario_spec

    spec = parse_spec(scenario_spec(env))
    logged = collect_logs(env, 200, seed=3)
    read = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        path = tmp_path / f"logs{suffix}"
        assert write_logs(path, logged, spec) == 200
        data, report = read_logs(path, spec)
        assert report.rows_used == 200
        read.append(data)
    for data in read:
        np.testing.assert_array_equal(data.context, logged.context)
        np.testing.assert_array_equal(data.action, logged.action)
        np.testing.assert_array_equal(data.propensity, logged.propensity)
        np.testing.assert_array_equal(data.reward, logged.reward)
        if logged.action_features is None:
            assert data.action_features is None and data.actions == env.action_names
        else:
            np.testing.assert_array_equal(data.action_features, logged.action_features)
            assert data.action_ids == logged.action_ids
        assert data.mask is None


def test_the_data_table_names_the_columns_and_rows_may_have_fewer_candidates(tmp_path):
    spec = parse_spec('name = "k"\nkind = "ranking"\n[features]\ncontext = ["x"]\n'
                      'action = ["price"]\n[data]\naction = "item_id"\nreward = "click"\n'
                      'propensity = "pscore"\ncandidates = "items"\n')
    items = [{"id": "i1", "features": {"price": 1.0}}, {"id": "i2", "features": {"price": 2.0}},
             {"id": "i3", "features": {"price": 3.0}}]
    rows = [{"x": 0.1 * i, "item_id": f"i{1 + i % 2}", "click": float(i % 3 == 0),
             "pscore": 0.5, "items": items[:2 + i % 2]} for i in range(40)]
    data, _ = read_logs(_write(tmp_path / "logs.jsonl", rows), spec)
    assert data.action_features is not None and data.action_features.shape == (40, 3, 1)
    assert data.mask is not None and data.mask.sum(axis=1).tolist() == [2 + i % 2
                                                                         for i in range(40)]
    train_logged(data, TrainConfig(epochs=2))  # the padded candidates are masked out of DR
    with pytest.raises(InvalidArgument, match="data.pscore: unknown key"):
        parse_spec('name = "k"\nkind = "actions"\nactions = ["a"]\n[features]\n'
                   'context = ["x"]\n[data]\npscore = "p"\n')


def test_simulate_needs_a_target_or_a_file(capsys):
    assert cli.main(["simulate", "--scenario", "routing"]) == 2
    assert "--log-to" in capsys.readouterr().err


def test_evaluate_reads_a_log_through_the_spec_and_values_the_policy_trained_on_another(
        tmp_path, capsys):
    """A policy trained on one simulated log, valued by evaluate on a fresh one in the same
    spec's columns: its SNIPS estimate beats what the logging policy earned there (0.19 vs
    0.12 with these seeds; the truth agrees that the trained policy is better)."""
    train_log, fresh = tmp_path / "recsys.csv", tmp_path / "fresh.csv"
    for path, seed in ((train_log, "0"), (fresh, "1")):
        assert cli.main(["simulate", "--scenario", "recsys", "--log-to", str(path),
                         "--events", "3000", "--seed", seed]) == 0
    spec, registry = tmp_path / "recsys.spec.toml", tmp_path / "registry"
    assert cli.main(["train", "--spec", str(spec), "--data", str(train_log), "--registry",
                     str(registry), "--epochs", "4", "--policy", "shop"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(fresh), "--spec", str(spec), "--policy", "shop",
                     "--registry", str(registry), "--json"]) == 0
    captured = capsys.readouterr()
    estimates = {e["estimator"]: e for e in json.loads(captured.out)}
    assert json.loads(captured.err.strip().splitlines()[-1])["data"]["rows_used"] == 3000
    logged = float(np.mean([float(r["reward"]) for r in csv.DictReader(fresh.open())]))
    assert estimates["snips"]["value"] > logged + 0.03, (estimates["snips"], logged)


def test_evaluate_refuses_a_spec_whose_features_are_not_the_models(tmp_path, capsys):
    path = tmp_path / "routing.csv"
    assert cli.main(["simulate", "--scenario", "routing", "--log-to", str(path),
                     "--events", "300"]) == 0
    spec, registry = tmp_path / "routing.spec.toml", tmp_path / "registry"
    assert cli.main(["train", "--spec", str(spec), "--data", str(path), "--registry",
                     str(registry), "--epochs", "1", "--policy", "router"]) == 0
    text = spec.read_text()
    swapped = spec.with_name("swapped.toml")  # the same names, two of them in another order
    swapped.write_text(text.replace('"topic_billing", "topic_technical"',
                                    '"topic_technical", "topic_billing"'))
    assert swapped.read_text() != text
    capsys.readouterr()
    assert cli.main(["evaluate", str(path), "--spec", str(swapped), "--policy", "router",
                     "--registry", str(registry)]) == 2
    assert "router v1 reads features ['topic_billing', 'topic_technical'" in capsys.readouterr().err


def test_a_feature_named_like_a_log_column_is_refused():
    with pytest.raises(InvalidArgument, match="'reward' is also the log's reward column"):
        parse_spec('name = "r"\nkind = "actions"\nactions = ["a"]\n'
                   '[features]\ncontext = ["x", "reward"]\n')


def test_a_spec_mlp_sets_the_sizes_of_the_network_train_fits(tmp_path, capsys):
    spec = tmp_path / "mlp.toml"
    spec.write_text('name = "r"\nkind = "actions"\nactions = ["a", "b"]\n[features]\n'
                    'context = ["x", "y"]\n[model]\ntype = "mlp"\nhidden = 12\nembedding = 5\n')
    data = _write(tmp_path / "logs.jsonl", [{**GOOD, "x": i / 10} for i in range(40)])
    assert cli.main(["train", "--spec", str(spec), "--data", str(data), "--registry",
                     str(tmp_path / "registry"), "--epochs", "1", "--hidden", "64"]) == 0
    manifest = LocalRegistry(tmp_path / "registry").current("r").manifest
    assert manifest.head.dim == 5 and manifest.training["network"]["hidden"] == 12


def test_evaluate_target_values_what_a_running_server_serves(tmp_path, capsys):
    """--target reads the served version (here pinned to v1 while v2 is current) and strategy
    from the server and values exactly that, as --version and --strategy would."""
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc
    from serving.config import PolicyConfig
    from tests.server_harness import channel, running_server, serve_config

    path = tmp_path / "routing.csv"
    assert cli.main(["simulate", "--scenario", "routing", "--log-to", str(path),
                     "--events", "300"]) == 0
    spec, registry = tmp_path / "routing.spec.toml", tmp_path / "registry"
    for epochs in ("1", "3"):
        assert cli.main(["train", "--spec", str(spec), "--data", str(path), "--registry",
                         str(registry), "--epochs", epochs, "--policy", "router"]) == 0
    config = serve_config(tmp_path, policies={"router": PolicyConfig(strategy="softmax:0.5")})
    common = ["evaluate", str(path), "--spec", str(spec), "--policy", "router", "--registry",
              str(registry), "--json"]
    with running_server(config) as server, channel(server.target) as ch:
        pb_grpc.AdminServiceStub(ch).Pin(pb.PinRequest(policy="router", version=1), timeout=5)
        capsys.readouterr()
        assert cli.main([*common, "--target", server.target]) == 0
        captured = capsys.readouterr()
    assert json.loads(captured.err.strip().splitlines()[-1])["served"] == {
        "target": server.target, "policy": "router", "version": 1, "strategy": "softmax:0.5"}
    assert cli.main([*common, "--version", "1", "--strategy", "softmax:0.5"]) == 0
    assert json.loads(captured.out) == json.loads(capsys.readouterr().out)
    assert cli.main([*common, "--target", "127.0.0.1:1"]) == 2  # nothing listens there
    assert "--target 127.0.0.1:1: GetPolicyInfo('router') failed: UNAVAILABLE" in (
        capsys.readouterr().err)
