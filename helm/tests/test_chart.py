"""The freshet Helm chart, rendered offline by the real Helm engine (Helm v4 SDK) and
checked: lint, Kubernetes schemas, labels and selectors, scaling, security, config."""

from __future__ import annotations

import functools
import re
import tomllib
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml

from conftest import NAMESPACE, RELEASE, REQUIRED, VALUE_SETS, Helm, Rendered, merge, sha256

# kubernetes-validate reads its JSON schemas from disk on every call; they never change.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

# The oldest version worth checking that is still widely run, and the newest schemas the
# installed kubernetes-validate bundles.
K8S_VERSIONS = ["1.30.0", kv_utils.latest_version()]

# Custom resources have no schema in kubernetes-validate (it knows only built-in kinds), so
# they are skipped from schema validation, explicitly: the Prometheus Operator's
# ServiceMonitor. Its shape is checked by test_service_monitor_selects_metrics_services.
NO_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor")}

STANDARD_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
}
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
TOML_SECTIONS = {"cluster", "server", "worker", "cycle", "ingest", "storage", "catalog", "log", "tables"}

SETS = sorted(VALUE_SETS)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def render_error(h: Helm, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as err:
        h.render(values)
    return str(err.value)


# ---------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("name", SETS)
def test_lint_strict_is_clean(h: Helm, name: str) -> None:
    report = h.lint(VALUE_SETS[name], strict=True)
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; --strict fails on either. The one INFO finding,
    # "icon is recommended", is left: the project has no icon yet.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_manifests_validate_against_kubernetes_schemas(
    rendered_sets: dict[str, Rendered], name: str, version: str
) -> None:
    checked = 0
    for doc in rendered_sets[name].docs:
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 7


def test_custom_resources_are_the_only_unvalidated_kinds(rendered_sets: dict[str, Rendered]) -> None:
    kinds = {(d["apiVersion"], d["kind"]) for r in rendered_sets.values() for d in r.docs}
    assert ("monitoring.coreos.com/v1", "ServiceMonitor") in kinds
    for api, kind in kinds & NO_SCHEMA:
        with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
            kubernetes_validate.validate({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}}, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- labels and selectors


@pytest.mark.parametrize("name", SETS)
def test_every_resource_has_standard_labels(rendered_sets: dict[str, Rendered], name: str) -> None:
    for doc in rendered_sets[name].docs:
        labels = doc["metadata"].get("labels", {})
        assert STANDARD_LABELS <= labels.keys(), (doc["kind"], doc["metadata"]["name"], labels)
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "freshet"
        assert labels["helm.sh/chart"] == "freshet-0.1.0"
        assert doc["metadata"].get("namespace") == NAMESPACE


@pytest.mark.parametrize("name", SETS)
def test_workload_selectors_are_stable_and_match_their_pods(rendered_sets: dict[str, Rendered], name: str) -> None:
    r = rendered_sets[name]
    components = set()
    for w in r.workloads():
        selector = w["spec"]["selector"]["matchLabels"]
        assert set(selector) == SELECTOR_KEYS, selector
        assert selects(selector, pod_labels(w))
        assert STANDARD_LABELS <= pod_labels(w).keys()
        component = selector["app.kubernetes.io/component"]
        assert component == w["metadata"]["labels"]["app.kubernetes.io/component"]
        components.add(component)
    for w in r.workloads():
        others = [o for o in r.workloads() if o is not w]
        assert not any(selects(w["spec"]["selector"]["matchLabels"], pod_labels(o)) for o in others)
    assert {"coordinator", "worker"} <= components


@pytest.mark.parametrize("name", SETS)
def test_services_select_their_components_pods(rendered_sets: dict[str, Rendered], name: str) -> None:
    r = rendered_sets[name]
    for svc in r.all("Service"):
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        selected = [w for w in r.workloads() if selects(svc["spec"]["selector"], pod_labels(w))]
        assert [w["metadata"]["labels"]["app.kubernetes.io/component"] for w in selected] == [component], svc["metadata"]["name"]
        # Every target port is a named port of the selected pods' containers.
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)


def test_coordinator_service_exposes_grpc_and_metrics(rendered_sets: dict[str, Rendered]) -> None:
    svc = rendered_sets["default"].get("Service", "coordinator")
    assert svc["metadata"]["name"] == f"{RELEASE}-freshet-coordinator"
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("grpc", 50051), ("http-metrics", 9090)}
    assert svc["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("name", SETS)
def test_pdb_selectors_match_one_workload(rendered_sets: dict[str, Rendered], name: str) -> None:
    r = rendered_sets[name]
    for pdb in r.all("PodDisruptionBudget"):
        selected = [w for w in r.workloads() if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))]
        assert len(selected) == 1
        assert selected[0]["metadata"]["name"] == pdb["metadata"]["name"]


@pytest.mark.parametrize("name", SETS)
def test_network_policies_select_workloads(rendered_sets: dict[str, Rendered], name: str) -> None:
    r = rendered_sets[name]
    for np in r.all("NetworkPolicy"):
        selected = [w for w in r.workloads() if selects(np["spec"]["podSelector"]["matchLabels"], pod_labels(w))]
        assert len(selected) == 1, np["metadata"]["name"]


def test_network_policy_rules(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["netpol-monitor"]
    coord = r.get("NetworkPolicy", "coordinator")
    worker = r.get("NetworkPolicy", "worker")
    etcd = r.get("NetworkPolicy", "etcd")
    coord_pod = pod_labels(r.get("Deployment", "coordinator"))
    worker_pod = pod_labels(r.get("Deployment", "worker"))
    test_pod = r.get("Pod", "test")["metadata"]["labels"]

    def peers_allowed(rule: dict[str, Any], labels: dict[str, str]) -> bool:
        return any("podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"]["matchLabels"], labels) for p in rule.get("from", rule.get("to", [])))

    grpc_in = coord["spec"]["ingress"][0]
    assert grpc_in["ports"] == [{"protocol": "TCP", "port": "grpc"}]
    for labels in (worker_pod, coord_pod, test_pod):
        assert peers_allowed(grpc_in, labels)
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "etl"}}} in grpc_in["from"]
    # Workers take gRPC from coordinators only.
    w_in = worker["spec"]["ingress"][0]
    assert peers_allowed(w_in, coord_pod) and not peers_allowed(w_in, test_pod)
    # Coordinators reach workers' gRPC port; both reach etcd, DNS and object storage (9000 for MinIO).
    assert any(peers_allowed(e, worker_pod) and e["ports"][0]["port"] == 50061 for e in coord["spec"]["egress"])
    for policy in (coord, worker):
        egress_ports = {p["port"] for e in policy["spec"]["egress"] for p in e["ports"]}
        assert {2379, 53, 443, 9000} <= egress_ports
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # etcd: clients from coordinators and workers, peers from etcd.
    assert peers_allowed(etcd["spec"]["ingress"][0], coord_pod) and peers_allowed(etcd["spec"]["ingress"][0], worker_pod)
    assert etcd["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 2380}]


def test_service_monitor_selects_metrics_services(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["netpol-monitor"]
    sm = r.get("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    sel = sm["spec"]["selector"]
    (expr,) = sel["matchExpressions"]
    scraped = []
    for svc in r.all("Service"):
        labels = svc["metadata"]["labels"]
        if selects(sel["matchLabels"], labels) and labels[expr["key"]] in expr["values"]:
            if any(p["name"] == "http-metrics" for p in svc["spec"]["ports"]):
                scraped.append(labels["app.kubernetes.io/component"])
    assert sorted(scraped) == ["coordinator", "etcd", "worker"]
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert rendered_sets["default"].find("ServiceMonitor") is None


def test_optional_resources_are_off_by_default(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["default"]
    kinds = sorted({d["kind"] for d in r.docs})
    assert kinds == ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service", "ServiceAccount"]


# ---------------------------------------------------------------- scaling


def test_autoscaling_renders_hpa_and_drops_replicas(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["autoscaling"]
    worker = r.get("Deployment", "worker")
    assert "replicas" not in worker["spec"]
    hpa = r.get("HorizontalPodAutoscaler", "worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 20)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"] if m["type"] != "Resource"}
    resources = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert resources == {"cpu": 75, "memory": 80}
    ext = metrics["External"]["external"]
    assert ext["metric"]["name"] == "freshet_pending_bytes"
    assert ext["target"] == {"type": "AverageValue", "averageValue": "512Mi"}
    # The coordinators are never autoscaled.
    assert r.get("Deployment", "coordinator")["spec"]["replicas"] == 2


def test_pods_custom_metric(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"worker": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None, "customMetric": {"enabled": True, "type": "Pods", "name": "freshet_worker_busy_tasks", "targetAverageValue": "2"}}}}))
    (m,) = r.get("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert m == {"type": "Pods", "pods": {"metric": {"name": "freshet_worker_busy_tasks"}, "target": {"type": "AverageValue", "averageValue": "2"}}}


def test_without_autoscaling_there_is_no_hpa_and_replicas_are_set(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    assert rendered_sets["default"].find("HorizontalPodAutoscaler") is None
    assert rendered_sets["default"].get("Deployment", "worker")["spec"]["replicas"] == 2
    r = h.render(merge(REQUIRED, {"worker": {"replicas": 7}}))
    assert r.get("Deployment", "worker")["spec"]["replicas"] == 7


@pytest.mark.parametrize(
    "override, coordinator_pdb, worker_pdb",
    [
        ({}, True, True),
        ({"coordinator": {"replicas": 1}, "worker": {"replicas": 1}}, False, False),
        ({"coordinator": {"replicas": 3}, "worker": {"replicas": 1}}, True, False),
        ({"worker": {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 1}}}, True, False),
        ({"worker": {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 3}}}, True, True),
        ({"worker": {"pdb": {"enabled": False}}, "coordinator": {"pdb": {"enabled": False}}}, False, False),
    ],
)
def test_pdb_only_with_more_than_one_replica(h: Helm, override: dict[str, Any], coordinator_pdb: bool, worker_pdb: bool) -> None:
    r = h.render(merge(REQUIRED, override))
    assert (r.find("PodDisruptionBudget", "coordinator") is not None) == coordinator_pdb
    assert (r.find("PodDisruptionBudget", "worker") is not None) == worker_pdb
    for pdb in r.all("PodDisruptionBudget"):
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_pdb_min_available_wins(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"worker": {"replicas": 4, "pdb": {"minAvailable": "50%"}}}))
    spec = r.get("PodDisruptionBudget", "worker")["spec"]
    assert spec["minAvailable"] == "50%" and "maxUnavailable" not in spec


def test_worker_termination_grace_exceeds_shutdown_grace(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    spec = rendered_sets["default"].get("Deployment", "worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 45  # 30 s grace + 15 s
    r = h.render(merge(REQUIRED, {"config": {"worker": {"shutdown_grace_ms": 120500}}}))
    assert r.get("Deployment", "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 136
    r = h.render(merge(REQUIRED, {"worker": {"terminationGracePeriodSeconds": 90}}))
    assert r.get("Deployment", "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    err = render_error(h, merge(REQUIRED, {"worker": {"terminationGracePeriodSeconds": 30}}))
    assert "worker.terminationGracePeriodSeconds" in err and "shutdown_grace_ms" in err


# ---------------------------------------------------------------- pods: security, env, probes


@pytest.mark.parametrize("name", SETS)
def test_pods_are_non_root_read_only_and_drop_all(rendered_sets: dict[str, Rendered], name: str) -> None:
    specs = rendered_sets[name].pod_specs()
    assert len(specs) >= 3
    for pod, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, pod
        assert psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001, pod
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, pod
        assert spec["automountServiceAccountToken"] is False, pod
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (pod, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (pod, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (pod, c["name"])
            assert "add" not in sc["capabilities"]
            assert not sc.get("privileged"), (pod, c["name"])


def test_service_account_token_can_be_enabled(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    assert rendered_sets["default"].get("ServiceAccount")["automountServiceAccountToken"] is False
    r = h.render(merge(REQUIRED, {"serviceAccount": {"automountServiceAccountToken": True}}))
    assert r.get("Deployment", "worker")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


@pytest.mark.parametrize("component, grpc, http, advertise", [("coordinator", 50051, 9090, "FRESHET__SERVER__ADVERTISE"), ("worker", 50061, 9091, "FRESHET__WORKER__ADVERTISE")])
def test_freshet_containers(rendered_sets: dict[str, Rendered], component: str, grpc: int, http: int, advertise: str) -> None:
    d = rendered_sets["default"].get("Deployment", component)
    spec = d["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["freshet"]
    assert c["args"] == [component, "--config", "/etc/freshet/freshet.toml"]
    assert c["image"] == "freshet/freshet:0.1.0"
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {("grpc", grpc), ("http-metrics", http)}
    names = [e["name"] for e in c["env"]]
    env = env_of(c)
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env[advertise]["value"] == f"http://$(POD_IP):{grpc}"
    # $(POD_IP) expands only when POD_IP is defined earlier in the list.
    assert names.index("POD_IP") < names.index(advertise)
    assert spec["enableServiceLinks"] is False
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http-metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http-metrics"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/freshet"] == "config" and mounts["/tmp"] == "tmp"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["config"]["configMap"]["name"] == rendered_sets["default"].get("ConfigMap")["metadata"]["name"]
    assert "emptyDir" in vols["tmp"]
    assert spec["serviceAccountName"] == rendered_sets["default"].get("ServiceAccount")["metadata"]["name"]


def test_coordinator_grpc_liveness_probe(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"coordinator": {"probes": {"liveness": {"type": "grpc"}, "startup": {"enabled": False}}}}))
    (c,) = r.get("Deployment", "coordinator")["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["grpc"] == {"port": 50051} and "httpGet" not in c["livenessProbe"]
    assert "startupProbe" not in c
    assert "type" in render_error(h, merge(REQUIRED, {"coordinator": {"probes": {"liveness": {"type": "tcp"}}}}))


def test_extra_env_volumes_and_scheduling(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {
        "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
        "worker": {"extraEnv": [{"name": "FRESHET__WORKER__CAPACITY", "value": "8"}], "nodeSelector": {"pool": "workers"}, "tolerations": [{"key": "w", "operator": "Exists"}]},
        "extraVolumes": [{"name": "ca", "secret": {"secretName": "ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}],
        "nodeSelector": {"zone": "a"},
        "tolerations": [{"key": "all", "operator": "Exists"}],
        "podAnnotations": {"a": "1"},
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"tag": "1.2.3"},
        "priorityClassName": "high",
        "coordinator": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "x", "operator": "Exists"}]}]}}}},
    }))
    w = r.get("Deployment", "worker")["spec"]["template"]
    c = w["spec"]["containers"][0]
    assert env_of(c)["RUST_LOG"]["value"] == "debug" and env_of(c)["FRESHET__WORKER__CAPACITY"]["value"] == "8"
    assert {"name": "ca", "mountPath": "/etc/ca"} in c["volumeMounts"]
    assert w["spec"]["nodeSelector"] == {"zone": "a", "pool": "workers"}
    assert [t["key"] for t in w["spec"]["tolerations"]] == ["all", "w"]
    assert w["metadata"]["annotations"]["a"] == "1"
    assert w["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert w["spec"]["priorityClassName"] == "high"
    assert c["image"] == "freshet/freshet:1.2.3"
    assert "podAntiAffinity" in w["spec"]["affinity"]
    co = r.get("Deployment", "coordinator")["spec"]["template"]["spec"]
    assert list(co["affinity"]) == ["nodeAffinity"]
    assert "RUST_LOG" in env_of(co["containers"][0]) and "FRESHET__WORKER__CAPACITY" not in env_of(co["containers"][0])
    r = h.render(merge(REQUIRED, {"image": {"digest": "sha256:" + "a" * 64}}))
    assert r.get("Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]["image"] == "freshet/freshet@sha256:" + "a" * 64


def test_helm_test_pod_calls_admin_through_the_coordinator_service(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["default"]
    pod = r.get("Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    svc = r.get("Service", "coordinator")["metadata"]["name"]
    assert c["command"] == ["freshet"]
    assert c["args"] == ["--endpoint", f"http://{svc}.{NAMESPACE}.svc:50051", "admin", "tables"]
    assert c["image"] == r.get("Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0]["image"]


def test_notes_explain_admin_port_forward_and_scaling(rendered_sets: dict[str, Rendered]) -> None:
    notes = rendered_sets["default"].notes
    for text in ("freshet admin leader", "freshet admin workers", "freshet admin cycles", "freshet admin watch",
                 "port-forward pod/", "kubectl -n freshet scale deploy/rel-freshet-worker --replicas=N", "helm test rel"):
        assert text in notes, text
    assert "HorizontalPodAutoscaler" in rendered_sets["autoscaling"].notes
    assert "<no value>" not in notes


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", SETS)
def test_rendered_toml_parses_with_known_sections_only(rendered_sets: dict[str, Rendered], name: str) -> None:
    r = rendered_sets[name]
    config = r.toml
    assert set(config) <= TOML_SECTIONS, set(config) - TOML_SECTIONS
    assert set(config) >= TOML_SECTIONS - {"tables"}
    assert config["server"]["listen"] == "0.0.0.0:50051" and config["server"]["http_listen"] == "0.0.0.0:9090"
    assert config["worker"]["listen"] == "0.0.0.0:50061" and config["worker"]["http_listen"] == "0.0.0.0:9091"
    assert "advertise" not in config["server"] and "advertise" not in config["worker"]
    assert config["catalog"]["uri"] == VALUE_SETS[name]["config"]["catalog"]["uri"]
    assert config["cluster"]["etcd_endpoints"] and all(e.startswith("http://") for e in config["cluster"]["etcd_endpoints"])
    assert all(isinstance(v, str) for v in config["storage"]["options"].values())
    assert config["log"]["json"] is True
    # Mounted where the container's --config points.
    for component in ("coordinator", "worker"):
        spec = r.get("Deployment", component)["spec"]["template"]["spec"]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config"]
        assert mount["mountPath"] + "/freshet.toml" == spec["containers"][0]["args"][-1]


def test_toml_carries_every_config_value(rendered_sets: dict[str, Rendered]) -> None:
    config = rendered_sets["s3-secret"].toml
    values = VALUE_SETS["s3-secret"]
    assert config["cluster"] == {"name": "freshet", "etcd_endpoints": ["http://etcd.etcd.svc:2379"], "lease_ttl_s": 10}
    assert config["cycle"] == {"interval_ms": 2000, "trigger_changes": 100000, "max_attempts": 3, "task_timeout_ms": 300000, "orphan_grace_ms": 3600000, "history": 1000, "max_changes_bytes": 134217728}
    assert config["ingest"] == {"max_batch_rows": 1000000, "max_batch_bytes": 67108864, "max_pending_bytes": 268435456}
    assert config["server"]["max_message_bytes"] == 268435456
    assert config["worker"]["capacity"] == 2 and config["worker"]["shutdown_grace_ms"] == 30000
    assert config["storage"]["options"] == {"aws_region": "us-east-1", "aws_endpoint": "http://minio.minio.svc:9000", "aws_allow_http": "true", "aws_virtual_hosted_style_request": "false"}
    # Keys left out of the values stay out of the TOML (the binary's defaults apply), except
    # partition_by, always written.
    expected_tables = [{"partition_by": [], **t} for t in values["config"]["tables"]]
    got = config["tables"]
    assert [t["name"] for t in got] == ["orders", "events"]
    for want, have in zip(expected_tables, got):
        assert have == want


def test_toml_strings_are_escaped(h: Helm) -> None:
    tricky = 'we"ird\\path\t\u00e9\u2603 <&> #x'
    r = h.render(merge(REQUIRED, {
        "config": {"cluster": {"name": tricky}, "tables": [{"name": "t", "uri": "s3://b/" + tricky, "primary_key": ["k\"1"], "columns": [{"name": "k\"1", "type": "string", "nullable": False}]}]},
        "storage": {"options": {"aws_request_payer": "true", "weird key=\"x\"": tricky, "aws_max_retries": 5}},
    }))
    config = r.toml
    assert config["cluster"]["name"] == tricky
    assert config["tables"][0]["uri"] == "s3://b/" + tricky
    assert config["tables"][0]["primary_key"] == ['k"1']
    assert config["storage"]["options"]["weird key=\"x\""] == tricky
    assert config["storage"]["options"]["aws_max_retries"] == "5"


def test_large_integers_render_exactly(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"config": {"ingest": {"max_pending_bytes": 1099511627776}, "cycle": {"orphan_grace_ms": 86400000}}}))
    assert r.toml["ingest"]["max_pending_bytes"] == 1099511627776
    assert r.toml["cycle"]["orphan_grace_ms"] == 86400000
    assert "e+" not in r.toml_text


@pytest.mark.parametrize(
    "override, message",
    [
        ({"config": {"cycle": {"interval_ms": "fast"}}}, "config.cycle.interval_ms must be an integer"),
        ({"config": {"cycle": {"interval_ms": 1.5}}}, "config.cycle.interval_ms must be an integer"),
        ({"config": {"log": {"json": "yes"}}}, "config.log.json must be true or false"),
        ({"config": {"cycle": {"intervall_ms": 5}}}, "config.cycle.intervall_ms is not a known setting"),
        ({"config": {"server": {"listen": "0.0.0.0:1"}}}, "config.server.listen is not a known setting"),
        ({"config": {"bogus": {}}}, "config.bogus is not a freshet.toml section"),
        ({"config": {"tables": [{"name": "t", "uri": "s3://b/t", "columns": [{"name": "k", "type": "int64"}]}]}}, "config.tables[0].primary_key is required"),
        ({"config": {"tables": [{"name": "t", "uri": "s3://b/t", "primary_key": ["k"]}]}}, "config.tables[0].columns is required"),
        ({"config": {"tables": [{"uri": "s3://b/t", "primary_key": ["k"], "columns": [{"name": "k", "type": "int64"}]}]}}, "config.tables[0].name is required"),
        ({"config": {"tables": [{"name": "t", "uri": "s3://b/t", "primary_key": ["k"], "columns": [{"name": "k"}]}]}}, "config.tables[0].columns[0].type is required"),
        ({"config": {"tables": [{"name": "t", "uri": "s3://b/t", "primary_key": ["k"], "pk": 1, "columns": [{"name": "k", "type": "int64"}]}]}}, "config.tables[0].pk is not a table setting"),
        ({"storage": {"type": "ftp"}}, "storage.type must be one of s3, gcs, azure, local"),
        ({"storage": {"type": "local"}}, "storage.local.existingClaim is required"),
        ({"etcd": {"endpoints": ["etcd:2379"]}}, "etcd.endpoints: \"etcd:2379\" is not an http:// or https:// URL"),
        ({"etcd": {"bundled": {"enabled": True, "replicas": 2}}}, "etcd.bundled.replicas must be odd"),
        ({"worker": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}}, "worker.autoscaling.minReplicas (5) exceeds maxReplicas (3)"),
        ({"worker": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}}, "worker.autoscaling.enabled needs at least one metric"),
    ],
)
def test_bad_values_fail_naming_the_value(h: Helm, override: dict[str, Any], message: str) -> None:
    assert message in render_error(h, merge(REQUIRED, override))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"etcd": {"endpoints": ["http://etcd:2379"]}}, "config.catalog.uri is required"),
        ({"config": {"catalog": {"uri": "s3://b/c"}}}, "etcd.endpoints is required"),
        ({"config": {"catalog": {"uri": "s3://b/c"}}, "etcd": {"endpoints": []}}, "etcd.endpoints is required"),
        ({}, "is required"),
    ],
)
def test_required_values_missing_fail_naming_the_value(h: Helm, values: dict[str, Any], message: str) -> None:
    assert message in render_error(h, values)


def test_bundled_etcd_needs_no_endpoints(h: Helm) -> None:
    r = h.render({"config": {"catalog": {"uri": "s3://b/c"}}, "etcd": {"bundled": {"enabled": True}}})
    assert len(r.toml["cluster"]["etcd_endpoints"]) == 3


# ---------------------------------------------------------------- checksum and secrets


def checksums(r: Rendered) -> set[str]:
    return {r.get("Deployment", c)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for c in ("coordinator", "worker")}


def test_config_checksum_follows_config_only(h: Helm) -> None:
    base = h.render(REQUIRED)
    (checksum,) = checksums(base)
    assert checksum == sha256(base.configmap_text)
    for override in (
        {"config": {"cycle": {"interval_ms": 500}}},
        {"config": {"tables": [{"name": "t", "uri": "s3://b/t", "primary_key": ["k"], "columns": [{"name": "k", "type": "int64"}]}]}},
        {"storage": {"s3": {"region": "eu-central-1"}}},
        {"etcd": {"endpoints": ["http://other-etcd:2379"]}},
        {"worker": {"ports": {"grpc": 50099}}},
    ):
        changed = h.render(merge(REQUIRED, override))
        (other,) = checksums(changed)
        assert other != checksum, override
    for override in (
        {"coordinator": {"resources": {"requests": {"cpu": "2"}}}, "worker": {"resources": {"limits": {"memory": "16Gi"}}}},
        {"worker": {"replicas": 9}, "coordinator": {"replicas": 3}},
        {"image": {"tag": "9.9.9"}},
        {"podAnnotations": {"x": "y"}},
        {"storage": {"existingSecret": "creds"}},
    ):
        (same,) = checksums(h.render(merge(REQUIRED, override)))
        assert same == checksum, override


def test_secrets_are_never_inlined_into_the_configmap(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["s3-secret"]
    cm = r.configmap_text
    for forbidden in ("AWS_SECRET", "aws_secret", "AWS_ACCESS_KEY", "freshet-s3-credentials", "password", "token"):
        assert forbidden not in cm, forbidden
    for component in ("coordinator", "worker"):
        c = r.get("Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "freshet-s3-credentials"}} in c["envFrom"]
        assert not any(e.get("value") and "SECRET" in e["name"] for e in c["env"])
    assert r.find("Secret") is None


@pytest.mark.parametrize("key", ["aws_secret_access_key", "AWS_ACCESS_KEY_ID", "aws_session_token", "azure_storage_account_key", "google_service_account_key", "azure_storage_sas_key", "password"])
def test_credentials_in_storage_options_are_refused(h: Helm, key: str) -> None:
    secret = "hunter2-do-not-leak"
    err = render_error(h, merge(REQUIRED, {"storage": {"options": {key: secret}}}))
    assert f"storage.options.{key}" in err and "storage.existingSecret" in err
    assert secret not in err


def test_cloud_identity_through_service_account_annotations(rendered_sets: dict[str, Rendered]) -> None:
    sa = rendered_sets["irsa"].get("ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/freshet"}
    for component in ("coordinator", "worker"):
        spec = rendered_sets["irsa"].get("Deployment", component)["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == sa["metadata"]["name"]
        assert "envFrom" not in spec["containers"][0]
    assert rendered_sets["irsa"].toml["storage"]["options"] == {"aws_region": "eu-west-1"}
    gke = rendered_sets["gcs"].get("ServiceAccount")["metadata"]["annotations"]
    assert gke == {"iam.gke.io/gcp-service-account": "freshet@my-project.iam.gserviceaccount.com"}
    azure = rendered_sets["azure"]
    assert azure.toml["storage"]["options"] == {"azure_storage_account_name": "freshetlake"}
    assert pod_labels(azure.get("Deployment", "worker"))["azure.workload.identity/use"] == "true"


def test_existing_service_account(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"serviceAccount": {"create": False, "name": "freshet-sa"}}))
    assert r.find("ServiceAccount") is None
    assert r.get("Deployment", "worker")["spec"]["template"]["spec"]["serviceAccountName"] == "freshet-sa"


def test_local_storage_mounts_the_shared_claim(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["local"]
    for component in ("coordinator", "worker"):
        spec = r.get("Deployment", component)["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["data"]["persistentVolumeClaim"] == {"claimName": "freshet-data"}
        assert {"name": "data", "mountPath": "/data"} in spec["containers"][0]["volumeMounts"]
    assert r.toml["storage"]["options"] == {}
    assert r.find("PodDisruptionBudget") is None  # one of each


# ---------------------------------------------------------------- bundled etcd


def test_bundled_etcd_statefulset(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["bundled-etcd"]
    sts = r.get("StatefulSet", "etcd")
    name = sts["metadata"]["name"]
    assert name == f"{RELEASE}-freshet-etcd"
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = r.get("Service", "etcd", name=sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "quay.io/coreos/etcd:v3.5.21"
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    host = lambda i: f"{name}-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"  # noqa: E731
    assert args["initial-cluster"] == ",".join(f"{name}-{i}=http://{host(i)}:2380" for i in range(3))
    assert args["initial-cluster-state"] == "new"
    assert args["name"] == "$(POD_NAME)"
    assert r.toml["cluster"]["etcd_endpoints"] == [f"http://{host(i)}:2379" for i in range(3)]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["spec"]["storageClassName"] == "standard"
    assert {"name": "data", "mountPath": "/var/lib/etcd"} in c["volumeMounts"]
    assert args["data-dir"].startswith("/var/lib/etcd/")
    pdb = r.get("PodDisruptionBudget", "etcd")
    assert pdb["spec"]["minAvailable"] == 2
    client = r.get("Service", "etcd", name=name)
    assert {p["port"] for p in client["spec"]["ports"]} == {2379, 2381}
    assert c["readinessProbe"]["httpGet"]["port"] == "http-metrics"


def test_single_member_etcd_without_persistence(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["local"]
    sts = r.get("StatefulSet", "etcd")
    assert sts["spec"]["replicas"] == 1 and "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    assert r.find("PodDisruptionBudget", "etcd") is None
    assert len(r.toml["cluster"]["etcd_endpoints"]) == 1


def test_names_fit_kubernetes_limits(h: Helm) -> None:
    long = "a-very-long-release-name-that-goes-on-and-on-forever"  # 52 characters
    r = h.render(merge(REQUIRED, {"etcd": {"bundled": {"enabled": True}}}), release=long)
    for d in r.docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
        for v in d["metadata"]["labels"].values():
            assert len(str(v)) <= 63
    assert len(r.get("StatefulSet", "etcd")["metadata"]["name"]) <= 52
    for version in K8S_VERSIONS:
        for d in r.docs:
            kubernetes_validate.validate(d, version, strict=True)


def test_fullname_override(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"fullnameOverride": "fresh"}))
    assert r.get("Deployment", "worker")["metadata"]["name"] == "fresh-worker"
    r = h.render(REQUIRED, release="freshet")
    assert r.get("Deployment", "worker")["metadata"]["name"] == "freshet-worker"


# ---------------------------------------------------------------- values documentation


def test_every_value_is_documented_and_in_the_deploy_doc() -> None:
    import values_doc

    text = values_doc.VALUES.read_text()
    documented = values_doc.documented(text)
    values = yaml.safe_load(text)
    undocumented = [leaf for leaf in values_doc.leaves(values) if not any(leaf == p or leaf.startswith(p + ".") for p in documented)]
    assert undocumented == [], f"values without a `# --` comment: {undocumented}"
    for path in documented:
        values_doc.lookup(values, path)  # documents an existing value
    doc = values_doc.DEPLOY_DOC.read_text()
    assert values_doc.updated_doc(doc, values_doc.table(text)) == doc, "docs/deploy.md's values table is stale: run python helm/tests/values_doc.py --write"


def test_chart_metadata(h: Helm) -> None:
    meta = h.chart.metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "freshet"
    assert meta["appVersion"] and meta["version"]
    assert re.match(r"^>=1\.\d+", meta["kubeVersion"])
