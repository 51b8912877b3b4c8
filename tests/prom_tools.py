"""What the observability tests need around Prometheus: the rules and the dashboard as files,
PromQL metric names, promtool, and a real Prometheus server as a subprocess.

The PrometheusRule manifest (``k8s/monitoring/prometheusrule.yaml``) is the one source of the
rules; its ``spec`` is already in Prometheus's rule-file format and is written out as is.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "monitoring"
RULES_MANIFEST = MONITORING / "prometheusrule.yaml"
ALERT_TESTS = MONITORING / "tests" / "alerts_test.yaml"
DASHBOARD = MONITORING / "dashboards" / "policyloop.json"

# Grafana's variables, replaced by what they stand for when a query runs.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$policy": ".*"}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def require_tool(name: str) -> str:
    """The tool's path; a missing one fails the test (it is part of the setup, not optional)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run scripts/bootstrap.sh (it installs Debian's "
                    "'prometheus' package, which brings prometheus and promtool)", pytrace=False)
    return path


def rule_spec() -> dict[str, Any]:
    manifest = yaml.safe_load(RULES_MANIFEST.read_text())
    assert manifest["kind"] == "PrometheusRule", manifest["kind"]
    return manifest["spec"]


def write_rules(folder: Path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file ``folder/rules.yaml``."""
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    return path


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_spec()["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables replaced) for every panel target."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names a PromQL expression selects.

    Strings, label matchers, ranges and grouping label lists are removed first, then every
    identifier that is not a keyword or a function call is a name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name, call in _NAME.findall(text)
            if not call and name.lower() not in _KEYWORDS}


def promtool(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def check_expressions(exprs: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on a rule file with one recording rule per expression: the
    real PromQL parser, so a query that Prometheus would refuse fails here."""
    path = folder / "expressions.yaml"
    group = {"name": "parse", "rules": [{"record": f"parse:expr_{i}", "expr": e}
                                        for i, e in enumerate(exprs)]}
    path.write_text(yaml.safe_dump({"groups": [group]}))
    return promtool("check", "rules", path)


class Prometheus:
    """A running ``prometheus`` server and its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant-vector results of ``promql`` now."""
        return self.api("/api/v1/query", query=promql)["result"]

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll ``probe`` until it returns something truthy; fail naming ``what`` and the last
        value otherwise."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {what} within {timeout:.0f}s (last: {last!r}); "
                             f"its log: {self.log}")


@contextmanager
def prometheus(folder: Path, targets: dict[str, tuple[str, str]],
               rule_files: list[Path]) -> Iterator[Prometheus]:
    """A Prometheus scraping every second ``targets`` (job -> (HOST:PORT, component)) and
    evaluating ``rule_files`` every second; stopped on exit whatever happened."""
    binary = require_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "scrape_timeout": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [
                {"targets": [address], "labels": {"component": component}}]}
            for job, (address, component) in targets.items()],
    }
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = promtool("check", "config", config_path)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_ports(1)[0]
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 20 s; returns once the process is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
