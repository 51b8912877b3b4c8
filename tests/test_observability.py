"""Alerts, dashboard and JSON logs checked against the real thing.

The rules are the PrometheusRule in k8s/monitoring (checked and unit-tested with promtool);
every metric a dashboard panel or an alert selects is one a running ``policyloop serve`` or
``policyloop learn`` exports; a real Prometheus scrapes both, loads the rules and sees the
metrics move; and every stderr line of both processes under ``--log-format json`` is one JSON
object, decision-related ones with their policy, model version or event id as fields.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from policyloop.logs import JsonFormatter, setup_logging
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from tests import prom_tools
from tests.server_harness import channel, make_registry
from tests.test_server import recsys_request

ROOT = Path(__file__).resolve().parents[1]
# What each sample of a family of this type is called (the family name is the base).
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("_sum", "_count"), "info": ("_info",), "gauge": ("",),
             "untyped": ("",)}


# -- the rules and the dashboard, without a server -------------------------------------------

def test_metric_names_finds_selectors_and_skips_labels_functions_and_keywords() -> None:
    expr = ('sum by (le, policy) (rate(foo_bucket{code!="OK", x=~"a|b"}[5m] offset 1m)) '
            '/ on (policy) group_left(method) bar:rate5m > 0.5 and time() - baz unless inf')
    assert prom_tools.metric_names(expr) == {"foo_bucket", "bar:rate5m", "baz"}


def test_a_missing_promtool_fails_and_names_the_bootstrap(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="run scripts/bootstrap.sh"):
        prom_tools.require_tool("promtool")


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = prom_tools.write_rules(tmp_path)
    done = prom_tools.promtool("check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(prom_tools.rules())} rules found" in done.stdout, done.stdout


def test_every_alert_has_a_duration_a_severity_and_a_runbook() -> None:
    names = [a["alert"] for a in prom_tools.alerts()]
    assert len(names) == len(set(names)) >= 10, names
    for alert in prom_tools.alerts():
        name = alert["alert"]
        assert alert.get("for"), f"{name}: no for:"
        assert alert.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key), f"{name}: no {key} annotation"
        anchor = f"#{name.lower()}"
        assert anchor in annotations["runbook"], f"{name}: runbook does not point at {anchor}"
        doc = (ROOT / "docs" / "observability.md").read_text()
        assert f"### {name}" in doc, f"docs/observability.md has no runbook section for {name}"


def test_alert_unit_tests_pass_with_a_firing_and_a_quiet_case_per_alert(tmp_path: Path) -> None:
    prom_tools.write_rules(tmp_path)
    tests = yaml.safe_load(prom_tools.ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["rules.yaml"], tests["rule_files"]
    cases: dict[str, set[bool]] = {}
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for name in (a["alert"] for a in prom_tools.alerts()):
        assert cases.get(name) == {True, False}, f"{name}: needs a firing and a quiet case"
    shutil.copy(prom_tools.ALERT_TESTS, tmp_path / "alerts_test.yaml")
    done = prom_tools.promtool("test", "rules", tmp_path / "alerts_test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_the_alert_unit_tests_fail_when_an_alert_never_fires(tmp_path: Path) -> None:
    """Each alert's firing case really depends on its expression: silenced, the case fails."""
    tests = yaml.safe_load(prom_tools.ALERT_TESTS.read_text())
    for name in (a["alert"] for a in prom_tools.alerts()):
        # Only the groups testing this alert: promtool then runs in a fraction of the time.
        groups = [g for g in tests["tests"]
                  if any(c["alertname"] == name for c in g["alert_rule_test"])]
        (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump({**tests, "tests": groups}))
        spec = prom_tools.rule_spec()
        for group in spec["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    rule["expr"] = "vector(1) == 0"
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        done = prom_tools.promtool("test", "rules", tmp_path / "alerts_test.yaml")
        assert done.returncode != 0 and f"alertname: {name}" in done.stdout + done.stderr, (
            f"silencing {name} did not fail its unit test:\n{done.stdout}{done.stderr}")


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = prom_tools.dashboard_queries()
    assert len(queries) >= 20, queries
    done = prom_tools.check_expressions([expr for _, expr in queries], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_shows_every_alerts_signal() -> None:
    shown = set().union(*(prom_tools.metric_names(e) for _, e in prom_tools.dashboard_queries()))
    for alert in prom_tools.alerts():
        missing = prom_tools.metric_names(alert["expr"]) - shown
        assert not missing, f"{alert['alert']}: no panel shows {sorted(missing)}"


def test_kustomize_renders_the_monitors_the_rules_and_the_dashboard_configmap() -> None:
    kustomize = ROOT / ".tools" / "bin" / "kustomize"
    if not kustomize.is_file():
        pytest.fail("kustomize not found in .tools/bin: run scripts/bootstrap.sh", pytrace=False)
    done = subprocess.run([str(kustomize), "build", str(prom_tools.MONITORING)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(done.stdout)}
    assert set(objects) == {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"policyloop"}
    serving = objects["ServiceMonitor"]["spec"]
    assert serving["selector"]["matchLabels"] == {"app.kubernetes.io/name": "policyloop",
                                                  "app.kubernetes.io/component": "serving"}
    assert [e["port"] for e in serving["endpoints"]] == ["metrics"]
    learner = objects["PodMonitor"]["spec"]
    assert learner["selector"]["matchLabels"]["app.kubernetes.io/component"] == "learner"
    assert [e["port"] for e in learner["podMetricsEndpoints"]] == ["metrics"]
    assert objects["PrometheusRule"]["spec"] == prom_tools.rule_spec()
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["name"] == "policyloop-grafana-dashboard"  # no hash suffix
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["policyloop.json"]) == json.loads(
        prom_tools.DASHBOARD.read_text())


# -- a running server and learner, scraped by a real Prometheus ------------------------------

@dataclass
class Stack:
    target: str
    serve_metrics: str
    learn_metrics: str
    serve_log: Path
    learn_log: Path
    registry: Path
    prom: prom_tools.Prometheus


def _read_line(proc: subprocess.Popen[str], prefix: str, log: Path) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(prefix), f"{line!r}\n{log.read_text()[-3000:]}"
    return line


def routing_request(rng: np.random.Generator) -> pb.DecideRequest:
    return pb.DecideRequest(policy="routing", context=pb.Features(dense=rng.standard_normal(5)))


def _traffic(target: str, n: int, seed: int) -> None:
    """``n`` routing and ``n // 4`` recsys decisions, each rewarded, and two bad requests."""
    rng = np.random.default_rng(seed)
    with channel(target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        for i in range(n):
            out = stub.Decide(routing_request(rng), timeout=5)
            stub.Reward(pb.RewardRequest(event_id=out.event_id, policy="routing",
                                         value=float(out.chosen[0].action_id == "queue-0")),
                        timeout=5)
            if i % 4 == 0:
                out = stub.Decide(recsys_request(seed=None), timeout=5)
                stub.Reward(pb.RewardRequest(event_id=out.event_id, policy="recsys",
                                             value=1.0), timeout=5)
        for bad in (pb.DecideRequest(policy="routing", event_id="bad id!"),
                    pb.DecideRequest(policy="nope")):
            with pytest.raises(grpc.RpcError):
                stub.Decide(bad, timeout=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    make_registry(tmp / "registry")
    cli = [sys.executable, "-m", "policyloop.cli", "--log-format", "json"]
    serve_log, learn_log = tmp / "serve.stderr", tmp / "learn.stderr"
    procs: list[subprocess.Popen[str]] = []
    try:
        with serve_log.open("w") as err:
            procs.append(subprocess.Popen(
                [*cli, "serve", "--registry", str(tmp / "registry"), "--port", "0",
                 "--metrics-port", "0", "--bus", "local", "--bus-path", str(tmp / "bus"),
                 "--spool-dir", str(tmp / "spool"), "--watch-interval", "0.2",
                 "--policy", "recsys=epsilon_greedy:0.1", "--policy", "routing=softmax:0.5"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True))
        line = _read_line(procs[0], "policyloop serve: grpc=", serve_log)
        ports = dict(part.split("=", 1) for part in line.split()[2:])
        with learn_log.open("w") as err:
            procs.append(subprocess.Popen(
                [*cli, "learn", "--registry", str(tmp / "registry"), "--policy", "routing",
                 "--bus-path", str(tmp / "bus"), "--checkpoint", str(tmp / "ckpt.json"),
                 "--window-ms", "200", "--publish-every", "40", "--publish-interval", "1",
                 "--no-gate", "--metrics-port", "0"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True))
        learn_metrics = _read_line(procs[1], "policyloop learn: metrics=",
                                   learn_log).split("=", 1)[1].strip()
        _read_line(procs[1], "policyloop learn: consuming", learn_log)
        _traffic(ports["grpc"], 120, seed=0)
        targets = {"policyloop-serving": (ports["metrics"], "serving"),
                   "policyloop-learner": (learn_metrics, "learner")}
        with prom_tools.prometheus(tmp, targets, [prom_tools.write_rules(tmp)]) as prom:
            yield Stack(ports["grpc"], ports["metrics"], learn_metrics, serve_log, learn_log,
                        tmp / "registry", prom)
    finally:
        for proc in procs:
            prom_tools.stop_process(proc)


def _families(address: str) -> dict[str, str]:
    """Family name -> type of everything ``address``/metrics exports."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _exported_names(stack: Stack) -> set[str]:
    names: set[str] = set()
    for address in (stack.serve_metrics, stack.learn_metrics):
        for family, kind in _families(address).items():
            names.update(family + suffix for suffix in _SUFFIXES[kind])
    return names


def _unexported(exprs: list[tuple[str, str]], exported: set[str]) -> list[str]:
    known = exported | prom_tools.recorded_names() | {"up"}  # up: Prometheus's own per target
    return [f"{where}: {name}" for where, expr in exprs
            for name in sorted(prom_tools.metric_names(expr)) if name not in known]


def test_every_dashboard_and_alert_metric_is_exported(stack: Stack) -> None:
    exported = _exported_names(stack)
    assert "policyloop_requests_total" in exported and "policyloop_join_events_total" in exported
    queries = prom_tools.dashboard_queries()
    rules = [(r.get("alert") or r["record"], r["expr"]) for r in prom_tools.rules()]
    missing = _unexported(queries + rules, exported)
    assert not missing, f"selected but exported by neither serve nor learn: {missing}"
    # The same check does catch a name nobody exports.
    assert _unexported([("probe", "rate(policyloop_no_such_metric_total[5m])")], exported)


def test_prometheus_loads_every_rule_healthy(stack: Stack) -> None:
    expected = {r.get("alert") or r["record"] for r in prom_tools.rules()}

    def evaluated() -> dict[str, str] | None:
        got = {rule["name"]: rule["health"]
               for group in stack.prom.api("/api/v1/rules")["groups"]
               for rule in group["rules"]}
        return got if set(got) == expected and "unknown" not in got.values() else None

    health = stack.prom.wait_for("every rule loaded and evaluated", evaluated)
    assert set(health.values()) == {"ok"}, health


def _value(stack: Stack, promql: str) -> float | None:
    result = stack.prom.query(promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sees_requests_increase_after_traffic(stack: Stack) -> None:
    query = 'sum(policyloop_requests_total{job="policyloop-serving", method="Decide"})'
    before = stack.prom.wait_for("Decide requests scraped", lambda: _value(stack, query))
    _traffic(stack.target, 20, seed=1)
    # 20 routing + 5 recsys decisions + 2 refused requests.
    stack.prom.wait_for(f"Decide requests grow from {before} by 27",
                        lambda: (_value(stack, query) or 0) >= before + 27)
    errors = stack.prom.wait_for(
        "refused requests counted by code",
        lambda: stack.prom.query('policyloop_requests_total{code!="OK"}'))
    assert {r["metric"]["code"] for r in errors} >= {"INVALID_ARGUMENT", "NOT_FOUND"}, errors
    stack.prom.wait_for("the recorded request rate",
                        lambda: stack.prom.query('policyloop:requests:rate5m{method="Decide"}'))


def test_prometheus_sees_the_learner_consume_and_lag(stack: Stack) -> None:
    examples = stack.prom.wait_for(
        "learner examples > 0",
        lambda: _value(stack, 'policyloop_learner_examples_total{policy="routing", '
                       'component="learner"}'))
    assert examples > 0
    lag = stack.prom.wait_for("learner lag present",
                              lambda: _value(stack, 'policyloop_learner_lag_seconds'
                                             '{policy="routing"}'))
    assert 0 <= lag < 600, lag
    rewarded = stack.prom.wait_for(
        "rewarded joins", lambda: _value(
            stack, 'policyloop_join_events_total{policy="routing", outcome="rewarded"}'))
    assert rewarded > 0


def test_the_served_version_gauge_equals_the_version_decide_answers_with(stack: Stack) -> None:
    rng = np.random.default_rng(2)
    with channel(stack.target) as ch:
        stub = pb_grpc.DecisionServiceStub(ch)

        def agree() -> tuple[float, int] | None:
            served = stub.Decide(routing_request(rng), timeout=5).model_version
            gauge = _value(stack, 'policyloop_model_version{policy="routing"}')
            return (gauge, served) if gauge is not None and gauge == served > 1 else None

        # The learner publishes every 40 examples and the server swaps them in: a version
        # beyond the first shows the whole loop, and the gauge must follow it.
        stack.prom.wait_for("policyloop_model_version equal to Decide's model_version > 1",
                            agree, timeout=45)
    age = _value(stack, 'policyloop:model_age_seconds{policy="routing"}')
    assert age is not None and 0 <= age < 600, age


def test_a_rejected_load_is_logged_with_its_version_and_raises_the_alert(stack: Stack) -> None:
    from policyloop.registry.local import LocalRegistry
    from tests.onnx_models import scoring_model

    bad = LocalRegistry(stack.registry).publish("recsys", *scoring_model(seed=5),
                                                make_current=False)
    bad.model_path.write_bytes(b"\x08garbage" + bad.model_path.read_bytes()[8:])
    with channel(stack.target) as ch:
        admin = pb_grpc.AdminServiceStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            admin.Pin(pb.PinRequest(policy="recsys", version=bad.version), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    line = _wait_for_log(stack.serve_log, lambda e: e["message"].startswith("rejected model"))
    assert line["level"] == "ERROR" and line["logger"] == "serving.model_store", line
    assert line["policy"] == "recsys" and line["model_version"] == bad.version, line
    # The counter existed at 0 before, so increase() sees this first rejection.
    firing = stack.prom.wait_for(
        "PolicyloopModelLoadRejected pending or firing",
        lambda: [a for a in stack.prom.api("/api/v1/alerts")["alerts"]
                 if a["labels"]["alertname"] == "PolicyloopModelLoadRejected"])
    assert [a["labels"]["policy"] for a in firing] == ["recsys"], firing
    assert firing[0]["labels"]["reason"] == "checksum", firing


# -- JSON logs --------------------------------------------------------------------------------

def _json_lines(path: Path) -> list[dict]:
    """Every complete stderr line as JSON; fails on the first line that is not one object."""
    entries = []
    for n, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break  # still being written
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{path.name} line {n} is not JSON ({exc}): {line!r}") from exc
        assert isinstance(entry, dict), f"{path.name} line {n}: {line!r}"
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        entries.append(entry)
    return entries


def _wait_for_log(path: Path, match: Callable[[dict[str, Any]], bool],
                  timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _json_lines(path) if match(e)]
        if found:
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"no such log line in {path.name} within {timeout}s:\n"
                         f"{path.read_text()[-3000:]}")


def test_json_logs_carry_the_policy_and_version_of_each_load(stack: Stack) -> None:
    serving = _wait_for_log(stack.serve_log, lambda e: e["message"].startswith("serving routing v")
                            and e.get("model_version", 0) > 1)
    assert serving["policy"] == "routing", serving
    assert serving["message"].startswith(f"serving routing v{serving['model_version']} "), serving
    assert serving["time"].endswith("Z") and serving["level"] == "INFO", serving
    for entry in _json_lines(stack.serve_log):
        if entry["message"].startswith(("serving ", "rejected model")):
            assert {"policy", "model_version"} <= entry.keys(), entry
    assert _json_lines(stack.learn_log), "the learner logged nothing (no publish line?)"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_writes_the_chosen_format(fmt: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("info", fmt)
        logging.getLogger("serving.decision_log").warning(
            "spooled %d", 3, extra={"event_id": "e-1", "policy": "routing"})
        logging.getLogger("x").debug("below the level")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    (line,) = capsys.readouterr().err.splitlines()
    if fmt == "text":
        assert line.endswith(" WARNING serving.decision_log: spooled 3"), line
    else:
        assert json.loads(line) | {"time": "-"} == {
            "time": "-", "level": "WARNING", "logger": "serving.decision_log",
            "message": "spooled 3", "event_id": "e-1", "policy": "routing"}, line


def test_spool_and_drop_log_lines_name_an_event_they_concern(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from serving.decision_log import DecisionLog
    from tests.test_decision_log import DownProducer

    ids = {f"event-{i}" for i in range(100)}
    log = DecisionLog(DownProducer(), spool_dir=tmp_path / "spool",
                      spool_budget_bytes=1000, max_backoff_s=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="serving.decision_log"):
            for event_id in sorted(ids):
                log.submit("decisions", event_id.encode(), b"x" * 40)
            deadline = time.monotonic() + 10
            while not (_logged(caplog, "the bus failed") and _logged(caplog, "DROPPED")):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.02)
    finally:
        log.close(0.1)
    for record in _logged(caplog, "the bus failed") + _logged(caplog, "DROPPED"):
        entry = json.loads(JsonFormatter().format(record))
        assert entry.get("event_id") in ids, entry


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]
