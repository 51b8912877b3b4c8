"""The Kubernetes manifests (k8s/) and container images (docker/), checked without a cluster.

Every overlay is rendered with the pinned kustomize binary, every native object is validated
offline against the Kubernetes schema in strict mode, the CRD objects (Strimzi topics,
Prometheus Operator monitors) are checked for what their operators need, and the settings that
matter at run time are checked against the code they configure: the CLI parser, the server's
config loader, the tokens loader and the topic specs. The images cannot be built here (no
container engine): their dependency export is run for real and the file set they copy is
rebuilt in a folder, imported with torch blocked and started.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import functools
import io
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from policyloop import cli
from policyloop.bus.topics import DEFAULT_TOPICS
from policyloop.cli import build_parser
from serving.auth import load_tokens
from serving.config import ServeConfig, load_serve_config
from serving.exploration import strategy_from_spec

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE = ROOT / ".tools" / "bin" / "kustomize"
K8S_VERSION = "1.32.0"
APP_OVERLAYS = ["dev", "prod", "gpu"]
OVERLAYS = [*APP_OVERLAYS, "strimzi", "seed"]
CRD_KINDS = {"KafkaTopic", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
SERVING = {"app.kubernetes.io/name": "policyloop", "app.kubernetes.io/component": "serving"}
LEARNER = {"app.kubernetes.io/name": "policyloop", "app.kubernetes.io/component": "learner"}


# ---- rendering and lookup


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    if not KUSTOMIZE.exists():
        pytest.fail(f"{KUSTOMIZE} is missing: run scripts/bootstrap.sh (it builds the pinned "
                    "kustomize into .tools/bin)")
    result = subprocess.run([str(KUSTOMIZE), "build", str(ROOT / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    return [dict(doc) for doc in _render(overlay)]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def serving(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "policyloop-serving")


def learners(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [s for s in objects(docs, "StatefulSet")
             if s["spec"]["template"]["metadata"]["labels"].get(
                 "app.kubernetes.io/component") == "learner"]
    assert found, "no learner StatefulSet rendered"
    return found


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return objects(docs, "Deployment") + objects(docs, "StatefulSet")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def port(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name!r}: {ports}"
    return ports[name]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# Labels the StatefulSet controller puts on each pod (not in the template).
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def resolved_args(docs: list[dict[str, Any]], workload: dict[str, Any],
                  pod_index: int = 0) -> list[str]:
    """The container's args with every $(VAR) replaced as the kubelet would: literal env
    values, ConfigMap keys (from the same render) and pod-label field references (for a
    StatefulSet, of its pod ``pod_index``)."""
    c = container(workload)
    labels = dict(workload["spec"]["template"]["metadata"]["labels"])
    if workload["kind"] == "StatefulSet":
        labels[POD_INDEX_LABEL] = str(pod_index)
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            assert label, f"unexpected fieldRef {path}"
            assert label.group(1) in labels, f"pod template has no label {label.group(1)}"
            env[var["name"]] = labels[label.group(1)]
        else:
            pytest.fail(f"unexpected env source {source}")

    def substitute(arg: str) -> str:
        def one_var(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's env"
            return env[m.group(1)]
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one_var, arg)

    return [substitute(a) for a in (c.get("command", []) + c.get("args", []))]


def parse_cli(args: list[str]) -> Any:
    """Parse with the real ``policyloop`` parser; an unknown flag fails the test."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"policyloop rejects {args}:\n{stderr.getvalue()}")


def mounts(workload: dict[str, Any]) -> list[tuple[PurePosixPath, dict[str, Any], bool]]:
    """(mount path, volume source, read-only) for the container, PVC templates included."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim["spec"]}
    out = []
    for m in container(workload).get("volumeMounts", []):
        assert m["name"] in volumes, f"mount of unknown volume {m['name']}"
        out.append((PurePosixPath(m["mountPath"]), volumes[m["name"]], m.get("readOnly", False)))
    return out


def writable_volume(workload: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The volume a process writing ``path`` writes to; fails on the read-only root."""
    target = PurePosixPath(str(path))
    holders = [(p, v) for p, v, ro in mounts(workload)
               if not ro and (target == p or p in target.parents)]
    assert holders, f"{workload['metadata']['name']} writes {target}, on no writable volume"
    return max(holders, key=lambda pv: len(pv[0].parts))[1]


def serve_config(docs: list[dict[str, Any]], tmp: Path) -> tuple[ServeConfig, Any]:
    """The serving container's config as ``policyloop serve`` builds it: its TOML from the
    mounted ConfigMap through the server's own loader, then its flags."""
    deployment = serving(docs)
    args = parse_cli(resolved_args(docs, deployment))
    assert args.command == "serve"
    assert args.config is not None, "serving runs without --config"
    source = [(p, v) for p, v, _ in mounts(deployment) if p == PurePosixPath(str(args.config))]
    assert source and "configMap" in source[0][1], f"--config {args.config} is not a ConfigMap"
    cm = one(docs, "ConfigMap", source[0][1]["configMap"]["name"])
    key = next(m["subPath"] for m in container(deployment)["volumeMounts"]
               if m["mountPath"] == str(args.config))
    path = tmp / "serve.toml"
    path.write_text(cm["data"][key])
    return cli.serve_config(argparse.Namespace(**{**vars(args), "config": path}), {}), args


def test_a_missing_kustomize_fails_and_names_the_bootstrap(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setattr(sys.modules[__name__], "KUSTOMIZE", tmp_path / "kustomize")
    with pytest.raises(pytest.fail.Exception, match="scripts/bootstrap.sh"):
        _render.__wrapped__("dev")


# ---- schema validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_native_object_validates_strictly_against_kubernetes(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{overlay}: no schema for {doc['kind']} {doc['apiVersion']}: "
                        f"{exc.message}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                        f"at {list(exc.path)}")


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = serving(render("dev"))
    container(deployment)["readinessProbes"] = {}  # a misspelling strict mode must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_has_a_name_and_the_overlay_namespace(overlay: str) -> None:
    docs = render(overlay)
    expected = "kafka" if overlay == "strimzi" else "policyloop"
    for doc in docs:
        assert doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == expected, doc["metadata"]


# ---- CRD objects


def test_kafka_topics_are_the_ones_policyloop_topics_creates() -> None:
    topics = {t["metadata"]["name"]: t for t in render("strimzi")}
    assert all(t["apiVersion"] == "kafka.strimzi.io/v1beta2" and t["kind"] == "KafkaTopic"
               for t in topics.values())
    assert set(topics) == {spec.name for spec in DEFAULT_TOPICS}
    for spec in DEFAULT_TOPICS:
        topic = topics[spec.name]
        assert topic["spec"]["partitions"] == spec.partitions, spec.name
        assert isinstance(topic["spec"]["replicas"], int) and topic["spec"]["replicas"] >= 3
        config = {k: str(v) for k, v in topic["spec"]["config"].items()}
        assert config == spec.configs(), f"{spec.name}: {config} != {spec.configs()}"


def test_kafka_topics_belong_to_the_cluster_the_workloads_connect_to() -> None:
    bootstrap = one(render("prod"), "ConfigMap",
                    next(c["metadata"]["name"] for c in objects(render("prod"), "ConfigMap")
                         if "bootstrap" in c.get("data", {})))["data"]["bootstrap"]
    # Strimzi's bootstrap Service is <cluster>-kafka-bootstrap.<namespace>.svc
    found = re.fullmatch(r"([a-z0-9-]+)-kafka-bootstrap\.([a-z0-9-]+)\.svc(\.[a-z.]+)?:\d+",
                         bootstrap)
    assert found, f"bootstrap {bootstrap!r} is not a Strimzi bootstrap Service"
    for topic in render("strimzi"):
        assert topic["metadata"]["labels"].get("strimzi.io/cluster") == found.group(1)
        assert topic["metadata"]["namespace"] == found.group(2)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_learner_partitions_equal_the_event_topics_partitions(overlay: str) -> None:
    docs = render(overlay)
    topics = {t["metadata"]["name"]: t["spec"]["partitions"] for t in render("strimzi")}
    for learner in learners(docs):
        config = cli.learn_config(parse_cli(resolved_args(docs, learner)), {})
        assert config.partitions == topics["decisions"] == topics["rewards"], (
            "the reward join waits for every partition: --partitions must equal the topics'")


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_monitors_select_the_rendered_service_and_pods(overlay: str) -> None:
    docs = render(overlay)
    monitors = objects(docs, "ServiceMonitor")
    assert monitors, f"{overlay} does not include k8s/monitoring"
    services = objects(docs, "Service")
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [s for s in services
                    if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                    and s["metadata"]["namespace"] == monitor["metadata"]["namespace"]]
        assert any(s["metadata"]["name"] == "policyloop-serving" for s in selected)
        for endpoint in monitor["spec"]["endpoints"]:
            for service in selected:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    pod_monitors = objects(docs, "PodMonitor")
    assert pod_monitors
    for monitor in pod_monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        pods = [w for w in workloads(docs)
                if matches(monitor["spec"]["selector"]["matchLabels"],
                           w["spec"]["template"]["metadata"]["labels"])]
        assert {w["metadata"]["name"] for w in pods} >= {w["metadata"]["name"]
                                                         for w in learners(docs)}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for pod in pods:
                port(container(pod), endpoint["port"])
    for rule in objects(docs, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["metadata"]["namespace"] == "policyloop"
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            assert all(("alert" in r or "record" in r) and r.get("expr") for r in group["rules"])


def test_prod_includes_the_monitoring_folder() -> None:
    kustomization = yaml.safe_load((ROOT / "k8s/overlays/prod/kustomization.yaml").read_text())
    assert "../../monitoring" in kustomization["resources"]


# ---- serving


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_serving_probes_ask_the_grpc_health_service_on_the_grpc_port(overlay: str) -> None:
    c = container(serving(render(overlay)))
    grpc_port = port(c, "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c, f"serving has no {probe}"
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == grpc_port, probe
        # "" is the server's overall status: SERVING only once every policy is loaded.
        assert c[probe]["grpc"].get("service", "") == "", probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "too little load time"


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_termination_period_covers_prestop_drain_and_log_flush(overlay: str, tmp_path: Path
                                                              ) -> None:
    docs = render(overlay)
    deployment = serving(docs)
    config, args = serve_config(docs, tmp_path)
    assert args.grace_period_s is not None, "the drain grace must be an explicit --grace flag"
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    # serving/server.py: server.stop(grace), then decision_log.close(grace).
    period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period > pre_stop + 2 * config.grace_period_s, (period, pre_stop, config.grace_period_s)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_serving_config_is_accepted_by_the_server_and_matches_the_ports(overlay: str,
                                                                       tmp_path: Path) -> None:
    docs = render(overlay)
    deployment = serving(docs)
    config, _ = serve_config(docs, tmp_path)
    c = container(deployment)
    assert config.host == "0.0.0.0"
    assert config.port == port(c, "grpc") == 50051
    assert config.metrics_port == port(c, "metrics") == 9464
    assert config.bus == "kafka" and config.kafka_bootstrap
    assert config.registry_kafka == config.kafka_bootstrap, "registry and bus on one cluster"
    # Named policies: with none the server would report SERVING with nothing loaded.
    assert set(config.policies) == {"recsys", "routing"}
    for policy in config.policies.values():
        strategy_from_spec(policy.strategy)
    learned = {parse_cli(resolved_args(docs, s)).policy for s in learners(docs)}
    assert learned == set(config.policies), "every served policy needs its learner"


def test_the_server_config_loader_refuses_an_unknown_key(tmp_path: Path) -> None:
    """What the manifest check relies on: a misspelt key fails instead of being ignored."""
    cm = next(c for c in objects(render("dev"), "ConfigMap") if "serve.toml" in c["data"])
    path = tmp_path / "serve.toml"
    path.write_text(cm["data"]["serve.toml"].replace("spool_dir", "spool_directory"))
    with pytest.raises(Exception, match="spool_directory"):
        load_serve_config(path, {}, environ={})


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_serving_writes_only_to_its_volumes(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    deployment = serving(docs)
    config, _ = serve_config(docs, tmp_path)
    written = [config.registry, config.spool_dir] + ([config.bus_path]
                                                     if config.bus == "local" else [])
    for path in written:
        assert "emptyDir" in writable_volume(deployment, path)
    spool = writable_volume(deployment, config.spool_dir)["emptyDir"]
    limit = spool["sizeLimit"]
    assert limit.endswith("Mi"), "sizeLimit in Mi expected"
    assert config.spool_budget_bytes < int(limit[:-2]) << 20, (
        "the spool budget must stay below the volume limit, or the pod is evicted")
    assert writable_volume(deployment, "/tmp")


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_tokens_come_from_a_secret_that_holds_no_token(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    deployment = serving(docs)
    config, _ = serve_config(docs, tmp_path)
    assert config.tokens_file is not None, "serving runs without --tokens-file"
    source = [v for p, v, ro in mounts(deployment)
              if ro and p in PurePosixPath(str(config.tokens_file)).parents]
    assert source and "secret" in source[0], "--tokens-file is not on a mounted Secret"
    secret = one(docs, "Secret", source[0]["secret"]["secretName"])
    data = base64.b64decode(secret["data"][config.tokens_file.name]).decode()
    path = tmp_path / "tokens.toml"
    path.write_text(data)
    tokens = load_tokens(path)  # the server's own loader
    assert tokens
    assert not re.search(r"^\s*token\s*=", data, re.M), "the example Secret holds a token"


# ---- learners


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_each_learner_pod_is_one_shard_with_its_checkpoint_on_a_claim(overlay: str) -> None:
    from online.shards import parse_shard

    docs = render(overlay)
    groups = set()
    for learner in learners(docs):
        name = learner["metadata"]["name"]
        replicas = learner["spec"]["replicas"]
        shards = [parse_cli(resolved_args(docs, learner, i)) for i in range(replicas)]
        assert [parse_shard(a.shard) for a in shards] == [(i, replicas) for i in
                                                          range(replicas)], (
            f"{name}: pod i must be shard i/{replicas}")
        assert all(a.command == "learn" for a in shards)
        configs = [cli.learn_config(a, {}) for a in shards]
        assert len({(c.group, c.policy, c.partitions) for c in configs}) == 1
        config = configs[0]
        assert 1 <= replicas <= config.partitions, f"{name}: more shards than partitions"
        assert name == f"policyloop-learner-{config.policy}"
        assert config.bus == "kafka" and config.kafka_bootstrap
        assert config.registry_kafka == config.kafka_bootstrap
        assert "persistentVolumeClaim" in writable_volume(learner, config.checkpoint), (
            f"{name}: --checkpoint {config.checkpoint} is not on the claim")
        assert "emptyDir" in writable_volume(learner, config.registry)
        assert config.metrics_port == port(container(learner), "metrics")
        assert learner["spec"]["serviceName"] in {s["metadata"]["name"]
                                                  for s in objects(docs, "Service")}
        groups.add(config.group)
    assert len(groups) == len(learners(docs)), "learners of different policies share a group"


# ---- security and resources


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_the_namespace_enforces_the_restricted_pod_security_standard(overlay: str) -> None:
    namespace = one(render(overlay), "Namespace", "policyloop")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", [*APP_OVERLAYS, "seed"])
def test_every_pod_is_non_root_restricted_and_sized(overlay: str) -> None:
    docs = render(overlay)
    for workload in workloads(docs) + objects(docs, "Job"):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("runAsUser", 1) != 0, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{name} {bound}"
            assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", c["image"]), c["image"]
            assert not c["image"].endswith(":latest"), c["image"]
        account = one(docs, "ServiceAccount", pod["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False, name
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole",
                                                  "ClusterRoleBinding")]
    accounts = [w["spec"]["template"]["spec"]["serviceAccountName"]
                for w in workloads(docs) + objects(docs, "Job")]
    assert len(set(accounts)) == len(accounts), "workloads share a ServiceAccount"


def _policies_for(docs: list[dict[str, Any]], workload: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return [p for p in objects(docs, "NetworkPolicy")
            if matches(p["spec"]["podSelector"].get("matchLabels", {}), labels)]


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_network_policies_admit_only_grpc_metrics_kafka_and_dns(overlay: str) -> None:
    docs = render(overlay)
    for workload in workloads(docs):
        policies = _policies_for(docs, workload)
        name = workload["metadata"]["name"]
        kinds = {t for p in policies for t in p["spec"]["policyTypes"]}
        assert kinds == {"Ingress", "Egress"}, f"{name} is not isolated both ways"
        c = container(workload)
        names = {p["name"] for p in c["ports"]}
        ingress = [r for p in policies for r in p["spec"].get("ingress", [])]
        allowed = {pt["port"] for r in ingress for pt in r["ports"]}
        assert allowed <= names, f"{name}: ingress to ports it does not have: {allowed}"
        for rule in ingress:
            assert rule.get("from"), f"{name}: an ingress rule open to everyone"
            if {pt["port"] for pt in rule["ports"]} == {"metrics"}:
                assert all(peer.get("namespaceSelector", {}).get("matchLabels") ==
                           {"kubernetes.io/metadata.name": "monitoring"} for peer in rule["from"])
        expected = {"grpc", "metrics"} if workload["kind"] == "Deployment" else {"metrics"}
        assert allowed == expected, f"{name}: ingress on {allowed}"
        egress = [r for p in policies for r in p["spec"].get("egress", [])]
        assert egress and all(r.get("to") and r.get("ports") for r in egress), name
        ports = {(pt["port"], pt["protocol"]) for r in egress for pt in r["ports"]}
        assert ports == {(9092, "TCP"), (53, "UDP"), (53, "TCP")}, f"{name}: egress {ports}"


# ---- overlays


def test_dev_runs_one_serving_replica_without_autoscaling() -> None:
    docs = render("dev")
    assert serving(docs)["spec"]["replicas"] == 1
    assert not objects(docs, "HorizontalPodAutoscaler")
    assert not objects(docs, "PodDisruptionBudget")
    assert all(":dev" in c["image"] for w in workloads(docs)
               for c in w["spec"]["template"]["spec"]["containers"])


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_prod_autoscales_from_three_keeps_two_and_spreads(overlay: str) -> None:
    docs = render(overlay)
    deployment = serving(docs)
    assert "replicas" not in deployment["spec"], "an apply would reset the HPA's count"
    hpa = one(docs, "HorizontalPodAutoscaler", "policyloop-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "policyloop-serving"}
    assert 3 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = one(docs, "PodDisruptionBudget", "policyloop-serving")
    assert 2 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert matches(pdb["spec"]["selector"]["matchLabels"],
                   deployment["spec"]["template"]["metadata"]["labels"])
    pod = deployment["spec"]["template"]["spec"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in pod["topologySpreadConstraints"]:
        assert matches(constraint["labelSelector"]["matchLabels"],
                       deployment["spec"]["template"]["metadata"]["labels"])
    assert pod["affinity"]["podAntiAffinity"]


def test_gpu_serving_takes_one_gpu_on_gpu_nodes() -> None:
    docs = render("gpu")
    pod = serving(docs)["spec"]["template"]["spec"]
    c = container(serving(docs))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "serving-gpu" in c["image"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for learner in learners(docs):
        assert "nvidia.com/gpu" not in container(learner)["resources"]["limits"]
    assert "nvidia.com/gpu" not in container(serving(render("prod")))["resources"]["limits"]


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_services_expose_grpc_and_metrics_of_serving(overlay: str) -> None:
    docs = render(overlay)
    service = one(docs, "Service", "policyloop-serving")
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051,
                                                                      "metrics": 9464}
    assert service["spec"]["selector"] == SERVING
    labels = serving(docs)["spec"]["template"]["metadata"]["labels"]
    assert matches(service["spec"]["selector"], labels)
    c = container(serving(docs))
    for p in service["spec"]["ports"]:
        port(c, p["targetPort"])


# ---- seeding the registry


def test_the_seed_job_trains_scenarios_the_cli_knows_and_uses_the_base_kafka() -> None:
    docs = render("seed")
    job = one(docs, "Job", "policyloop-seed")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = container(job)
    # The Kafka ConfigMap comes from the base the Job is applied next to.
    bootstrap, topic, *policies = resolved_args(render("prod") + docs, job)[len(c["command"]):]
    assert bootstrap == one(render("prod"), "ConfigMap", "policyloop-kafka")["data"]["bootstrap"]
    assert topic == ServeConfig().registry_topic
    assert set(policies) == {"recsys", "routing"}
    script = [v for p, v, _ in mounts(job) if p in PurePosixPath(c["command"][1]).parents]
    assert script and "configMap" in script[0]
    source = one(docs, "ConfigMap", script[0]["configMap"]["name"])["data"]["seed.py"]
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "main"]
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.List)
    for policy in policies:
        argv: list[str] = []
        for e in calls[0].args[0].elts:
            arg = e.value if isinstance(e, ast.Constant) else policy
            assert isinstance(arg, str), f"seed.py passes {arg!r} to main, not a string"
            argv.append(arg)
        args = parse_cli(argv)
        assert args.command == "train" and args.policy == policy and args.scenario == policy
        assert "emptyDir" in writable_volume(job, PurePosixPath(c["workingDir"]) / args.registry)
    assert "head.npz" in source and "KafkaRegistry" in source
    assert any(v.get("name") == "HOME" and v.get("value", "").startswith(c["workingDir"])
               for v in c["env"]), "torch and friends write under $HOME"


# ---- images

DOCKER = ROOT / "docker"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _uv_export(dockerfile: Path, variant: str) -> str:
    """Run the dependency export the Dockerfile runs, for a VARIANT build arg."""
    runs = [rest for word, rest in _instructions(dockerfile)
            if word == "RUN" and "uv export" in rest]
    assert len(runs) == 1, f"{dockerfile.name}: one RUN with uv export expected"
    script = runs[0]
    extra = ""
    gpu = re.search(r'extra="([^"]*)"; fi', script)
    if variant == "gpu":
        assert gpu, f"{dockerfile.name} has no gpu variant"
        extra = gpu.group(1)
    command = re.search(r"uv export ([^;]*?) --output-file \S+", script)
    assert command, script
    argv = shlex.split(command.group(1).replace("$extra", extra))
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH"
    result = subprocess.run([uv, "export", *argv, "--no-hashes"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _packages(requirements: str) -> set[str]:
    return {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", requirements, re.M)}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_serving_image_dependencies_exclude_torch(variant: str) -> None:
    packages = _packages(_uv_export(DOCKER / "serving.Dockerfile", variant))
    assert {"grpcio", "kafka-python", "numpy"} <= packages
    assert not {p for p in packages if p == "torch" or p.startswith("nvidia-")}, packages
    ort = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
    assert ort[variant] in packages
    assert ort["gpu" if variant == "cpu" else "cpu"] not in packages


def test_trainer_image_dependencies_include_torch() -> None:
    assert "torch" in _packages(_uv_export(DOCKER / "trainer.Dockerfile", "cpu"))


def _copied(dockerfile: Path) -> list[Path]:
    """The repository files the final stage copies from the build context."""
    files: list[Path] = []
    for word, rest in _instructions(dockerfile):
        if word == "COPY" and "--from=" not in rest:
            *sources, _ = shlex.split(rest)
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{dockerfile.name} copies missing {source}"
                files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [f for f in files if "__pycache__" not in f.parts]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Subcommands whose code the serving and learner images leave out (the trainer image has it).
_TRAINER_ONLY = {("policyloop/cli.py", "_train"), ("policyloop/cli.py", "_export"),
                 ("policyloop/cli.py", "_train_flags"),
                 ("policyloop/cli.py", "_network_learner"),
                 ("policyloop/demo.py", "train_start_policy"),
                 ("policyloop/create.py", "_mlp")}


def _imports(path: Path) -> Iterator[tuple[str, str | None]]:
    """(imported module, enclosing function or None) for every import in the file."""
    tree = ast.parse(path.read_text())

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[str, str | None]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((a.name, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                yield child.module, function
                yield from ((f"{child.module}.{a.name}", function) for a in child.names)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else function
            yield from walk(child, inner)

    yield from walk(tree, None)


def test_serving_image_copies_no_torch_module_and_every_module_it_needs() -> None:
    files = _copied(DOCKER / "serving.Dockerfile")
    copied = {_module(f) for f in files if f.suffix == ".py"}
    assert {"serving.server", "online.learner", "policyloop.cli",
            "policyloop.registry.local"} <= copied
    project = ("models", "serving", "online", "policyloop", "protos")
    for path in files:
        if path.suffix != ".py":
            continue
        rel = path.relative_to(ROOT).as_posix()
        for name, function in _imports(path):
            top = name.split(".")[0]
            assert top != "torch", f"{rel} imports torch"
            if top not in project or (rel, function) in _TRAINER_ONLY:
                continue
            # `from pkg import name` may name an attribute, not a module: accept either.
            assert name in copied or name.rpartition(".")[0] in copied, (
                f"{rel} imports {name}, which the serving image does not copy")
    left_out = {_module(f) for f in (ROOT / "models").glob("*.py")} - copied
    assert {"models.export", "models.training", "models.policies"} <= left_out


def test_learner_image_is_the_serving_image_with_its_own_check_and_command() -> None:
    steps = _instructions(DOCKER / "learner.Dockerfile")
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms == ["${SERVING_IMAGE}"]
    assert not [w for w, _ in steps if w in ("COPY", "ADD", "RUN")], "learner adds files"
    default = next(rest for w, rest in steps if w == "ARG" and rest.startswith("SERVING_IMAGE="))
    assert "policyloop/serving:" in default
    check = next(rest for w, rest in steps if w == "HEALTHCHECK")
    assert ":9464/metrics" in check
    learner = container(learners(render("prod"))[0])
    assert port(learner, "metrics") == 9464


def _user(dockerfile: Path) -> str:
    users = [rest for word, rest in _instructions(dockerfile) if word == "USER"]
    assert users, f"{dockerfile.name} has no USER"
    return users[-1]


@pytest.mark.parametrize("name", ["serving", "learner", "trainer"])
def test_images_pin_their_base_and_run_as_the_pods_user(name: str) -> None:
    dockerfile = DOCKER / f"{name}.Dockerfile"
    steps = _instructions(dockerfile)
    for word, rest in steps:
        if word == "ARG" and rest.startswith("PYTHON_IMAGE="):
            assert re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-[a-z]+"
                                r"(@sha256:[0-9a-f]{64})?", rest), rest
        if word == "FROM":
            assert "latest" not in rest and rest.split()[0].startswith("${"), rest
    uid = int(one(render("prod"), "Deployment", "policyloop-serving")
              ["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
    assert _user(dockerfile) == f"{uid}:{uid}"
    checks = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert checks and (checks[-1] == "NONE") == (name == "trainer")


def test_dockerignore_keeps_local_state_out_but_not_what_is_copied() -> None:
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert {".git", ".venv", "var", "tests"} <= set(ignored)
    needed = {"pyproject.toml", "uv.lock"} | {
        f.relative_to(ROOT).parts[0]
        for d in ("serving", "trainer") for f in _copied(DOCKER / f"{d}.Dockerfile")}
    for pattern in ignored:
        assert not any(PurePosixPath(n).match(pattern) for n in needed), pattern


def test_the_serving_image_file_set_serves_and_passes_its_health_check(tmp_path: Path) -> None:
    """The files serving.Dockerfile copies, alone in a folder, run `policyloop serve` the way
    the image's ENTRYPOINT does, with torch unimportable, and the image's HEALTHCHECK command
    reports it healthy, then unhealthy once it has stopped."""
    from tests.server_harness import make_registry

    app = tmp_path / "app"
    for path in _copied(DOCKER / "serving.Dockerfile"):
        target = app / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    # torch is not in the image: a stand-in that refuses to import shadows the one installed.
    (app / "torch").mkdir()
    (app / "torch" / "__init__.py").write_text("raise ImportError('no torch in this image')\n")
    make_registry(tmp_path / "registry")
    env = {"PYTHONPATH": str(app), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "policyloop.cli", "serve", "--registry", str(tmp_path / "registry"),
         "--port", "0", "--metrics-port", "0", "--bus-path", str(tmp_path / "bus"),
         "--spool-dir", str(tmp_path / "spool"), "--grace", "1"],
        cwd=app, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"grpc=[\d.]+:(\d+)", line)
        assert found, f"serve did not start: {(tmp_path / 'serve.log').read_text()[-3000:]}"
        check = next(rest for word, rest in _instructions(DOCKER / "serving.Dockerfile")
                     if word == "HEALTHCHECK")
        argv = yaml.safe_load(check[check.index("CMD") + 3:])  # the JSON exec form
        assert argv[0] == "python" and "127.0.0.1:50051" in argv[2]
        probe = [sys.executable, argv[1], argv[2].replace("50051", found.group(1))]
        deadline = time.monotonic() + 20
        while (result := subprocess.run(probe, cwd=app, env=env, capture_output=True)
               ).returncode != 0:
            assert time.monotonic() < deadline, result.stderr.decode()
            time.sleep(0.2)
        server.terminate()
        assert server.wait(timeout=20) == 0
        assert subprocess.run(probe, cwd=app, env=env, capture_output=True).returncode != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
