"""The freshet Helm chart, rendered offline by the real Helm engine (Helm v4 SDK) and
checked: lint, Kubernetes schemas, labels and selectors, scaling, security, config."""

from __future__ import annotations

import base64
import functools
import re
import tomllib
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml

from conftest import INSECURE, NAMESPACE, RELEASE, REPO as REPO_ROOT, REQUIRED, TLS_SECRET, VALUE_SETS, Helm, Rendered, merge, sha256

# kubernetes-validate reads its JSON schemas from disk on every call; they never change.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

# The oldest version worth checking that is still widely run, and the newest schemas the
# installed kubernetes-validate bundles.
K8S_VERSIONS = ["1.30.0", kv_utils.latest_version()]

# Custom resources have no schema in kubernetes-validate (it knows only built-in kinds), so
# they are skipped from schema validation, explicitly: the Prometheus Operator's
# ServiceMonitor. Its shape is checked by test_service_monitor_selects_metrics_services.
NO_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}

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
TOML_SECTIONS = {"cluster", "server", "worker", "cycle", "ingest", "storage", "catalog", "log", "tables", "tls", "auth", "secrets", "sources"}
# Sections present in every render (tls and auth are opt-outs; the rest optional).
TOML_ALWAYS = {"cluster", "server", "worker", "cycle", "ingest", "storage", "catalog", "log"}

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


def test_secure_resources_are_on_and_optional_ones_off_by_default(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["default"]
    kinds = sorted({d["kind"] for d in r.docs})
    # NetworkPolicies and the generated token Secret by default; no ServiceMonitor, no HPA.
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "Pod", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]


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
    assert env[advertise]["value"] == f"https://$(POD_IP):{grpc}"
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
    (cm,) = [s["configMap"] for s in vols["config"]["projected"]["sources"] if "configMap" in s]
    assert cm["name"] == rendered_sets["default"].get("ConfigMap")["metadata"]["name"]
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
    assert c["args"] == ["--endpoint", f"https://{svc}.{NAMESPACE}.svc:50051", "admin", "tables"]
    env = env_of(c)
    assert env["FRESHET_TLS_CA"]["value"] == "/etc/freshet/tls/ca.crt"
    assert env["FRESHET_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": r.get("Secret", "auth")["metadata"]["name"], "key": "admin-token", "optional": False}
    assert {"name": "tls", "mountPath": "/etc/freshet/tls", "readOnly": True} in c["volumeMounts"]
    (tls,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == TLS_SECRET and tls["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
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
    assert set(config) >= TOML_ALWAYS
    assert config["server"]["listen"] == "0.0.0.0:50051" and config["server"]["http_listen"] == "0.0.0.0:9090"
    assert config["worker"]["listen"] == "0.0.0.0:50061" and config["worker"]["http_listen"] == "0.0.0.0:9091"
    assert "advertise" not in config["server"] and "advertise" not in config["worker"]
    assert config["catalog"]["uri"] == VALUE_SETS[name]["config"]["catalog"]["uri"]
    endpoints = config["cluster"]["etcd_endpoints"]
    assert endpoints and all(e.startswith(("http://", "https://")) for e in endpoints)
    if VALUE_SETS[name]["etcd"].get("bundled", {}).get("enabled"):
        # The bundled etcd speaks the chart's TLS when it is on.
        scheme = "https://" if "tls" in config else "http://"
        assert all(e.startswith(scheme) for e in endpoints)
    assert config["storage"]["allowed_prefixes"], "storage.allowed_prefixes is never empty"
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
    assert message in render_error(h, merge({"tls": {"existingSecret": TLS_SECRET}}, values))


def test_bundled_etcd_needs_no_endpoints(h: Helm) -> None:
    r = h.render({"config": {"catalog": {"uri": "s3://b/c"}}, "etcd": {"bundled": {"enabled": True}}, "tls": {"existingSecret": TLS_SECRET}})
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
    for forbidden in ("AWS_SECRET", "aws_secret", "AWS_ACCESS_KEY", "freshet-s3-credentials", "password"):
        assert forbidden not in cm, forbidden
    # The generated admin token is in its Secret only; the ConfigMap names the tokens file.
    token = base64.b64decode(r.get("Secret", "auth")["data"]["admin-token"]).decode()
    assert token not in cm and sha256(token) not in cm
    assert r.toml["auth"]["tokens_file"] == "/etc/freshet/auth/tokens.toml"
    for component in ("coordinator", "worker"):
        c = r.get("Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "freshet-s3-credentials"}} in c["envFrom"]
        assert not any(e.get("value") and "SECRET" in e["name"] for e in c["env"])
    assert [s["metadata"]["name"] for s in r.all("Secret")] == [f"{RELEASE}-freshet-auth"]


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
    args = dict((a.removeprefix("--").split("=", 1) + [""])[:2] for a in c["args"])
    host = lambda i: f"{name}-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"  # noqa: E731
    assert args["initial-cluster"] == ",".join(f"{name}-{i}=https://{host(i)}:2380" for i in range(3))
    assert args["initial-cluster-state"] == "new"
    assert args["name"] == "$(POD_NAME)"
    # TLS for clients and peers from the cert-manager Certificate; client certificates required.
    assert args["listen-client-urls"] == "https://0.0.0.0:2379" and args["listen-peer-urls"] == "https://0.0.0.0:2380"
    for flag in ("client-cert-auth", "peer-client-cert-auth"):
        assert flag in args
    assert (args["cert-file"], args["key-file"], args["trusted-ca-file"]) == ("/etc/etcd/tls/tls.crt", "/etc/etcd/tls/tls.key", "/etc/etcd/tls/ca.crt")
    assert args["peer-trusted-ca-file"] == "/etc/etcd/tls/ca.crt"
    (tls,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == f"{name}-tls" == r.get("Certificate", "etcd")["spec"]["secretName"]
    # Metrics and probes stay plain HTTP on 2381.
    assert args["listen-metrics-urls"] == "http://0.0.0.0:2381"
    # Coordinators and workers present their own certificate to etcd.
    assert {k: v for k, v in r.toml["cluster"].items() if k.startswith("etcd_") and k != "etcd_endpoints"} == {
        "etcd_ca_file": "/etc/freshet/tls/ca.crt", "etcd_cert_file": "/etc/freshet/tls/tls.crt", "etcd_key_file": "/etc/freshet/tls/tls.key"}
    assert r.toml["cluster"]["etcd_endpoints"] == [f"https://{host(i)}:2379" for i in range(3)]
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


# ---------------------------------------------------------------- secure defaults: TLS


def projected(r: Rendered, component: str) -> list[dict[str, Any]]:
    spec = r.get("Deployment", component)["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "config"]
    return vol["projected"]["sources"]


def secret_items(r: Rendered, component: str) -> dict[str, tuple[str, str]]:
    """path under /etc/freshet -> (Secret, key) of a component's projected volume."""
    return {i["path"]: (s["secret"]["name"], i["key"]) for s in projected(r, component) if "secret" in s for i in s["secret"]["items"]}


def test_tls_without_material_fails_naming_the_choices_and_the_opt_out(h: Helm) -> None:
    values = {"config": {"catalog": {"uri": "s3://b/c"}}, "etcd": {"endpoints": ["http://etcd:2379"]}}
    err = render_error(h, values)
    for text in ("tls.existingSecret", "tls.certManager.enabled=true", "tls.enabled=false", "development only"):
        assert text in err, text
    assert "choose one" in render_error(h, merge(values, {"tls": {"existingSecret": "s", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}))
    assert "tls.certManager.issuerRef.name" in render_error(h, merge(values, {"tls": {"certManager": {"enabled": True}}}))
    # The explicit opt-out renders (plaintext).
    assert "tls" not in h.render(merge(values, {"tls": {"enabled": False}})).toml


@pytest.mark.parametrize("component", ["coordinator", "worker"])
def test_tls_secret_is_mounted_and_configured(rendered_sets: dict[str, Rendered], component: str) -> None:
    r = rendered_sets["default"]
    assert r.toml["tls"] == {
        "cert_file": "/etc/freshet/tls/tls.crt", "key_file": "/etc/freshet/tls/tls.key", "ca_file": "/etc/freshet/tls/ca.crt",
        "require_client_cert": False, "worker_server_name": f"{RELEASE}-freshet-worker",
    }
    items = secret_items(r, component)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        assert items[f"tls/{key}"] == (TLS_SECRET, key)
    # Probes stay plain HTTP on the metrics port.
    c = r.get("Deployment", component)["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["port"] == "http-metrics" and "scheme" not in c["readinessProbe"]["httpGet"]


# A subset of cert-manager's Certificate CRD (cert-manager.io/v1), for what the chart sets:
# kubernetes-validate has no schemas for custom resources.
CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "secretTemplate": {"type": "object", "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}}, "additionalProperties": False},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}},
                "ipAddresses": {"type": "array", "items": {"type": "string", "format": "ipv4"}},
                "duration": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                "renewBefore": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "rotationPolicy": {"enum": ["Never", "Always"]},
                    "size": {"type": "integer"}, "encoding": {"enum": ["PKCS1", "PKCS8"]}}},
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
                    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
                    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                    "microsoft sgc", "netscape sgc"]}},
                "issuerRef": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                    "name": {"type": "string", "minLength": 1}, "kind": {"type": "string"}, "group": {"type": "string"}}},
            },
        },
    },
}


def test_cert_manager_certificates(rendered_sets: dict[str, Rendered]) -> None:
    import jsonschema

    r = rendered_sets["bundled-etcd"]
    certs = {c["metadata"]["labels"]["app.kubernetes.io/component"]: c for c in r.all("Certificate")}
    assert set(certs) == {"coordinator", "worker", "etcd"}
    for component, cert in certs.items():
        jsonschema.validate(cert, CERTIFICATE_SCHEMA)
        spec = cert["spec"]
        assert spec["issuerRef"] == {"name": "freshet-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert {"server auth", "client auth"} <= set(spec["usages"])
        # ECDSA keys sign; key encipherment is for RSA only.
        assert spec["privateKey"]["algorithm"] == "ECDSA" and "key encipherment" not in spec["usages"]
        assert spec["secretName"] == f"{RELEASE}-freshet-{component}-tls"
        if component != "etcd":
            items = secret_items(r, component)
            assert items["tls/tls.crt"] == (spec["secretName"], "tls.crt") and items["tls/ca.crt"] == (spec["secretName"], "ca.crt")
    coordinator = f"{RELEASE}-freshet-coordinator"
    for name in (coordinator, f"{coordinator}.{NAMESPACE}.svc", f"{coordinator}.{NAMESPACE}.svc.cluster.local", "localhost"):
        assert name in certs["coordinator"]["spec"]["dnsNames"]
    # The coordinator verifies this fixed name in every worker's certificate.
    assert r.toml["tls"]["worker_server_name"] in certs["worker"]["spec"]["dnsNames"]
    assert f"{RELEASE}-freshet-worker.{NAMESPACE}.svc.cluster.local" in certs["worker"]["spec"]["dnsNames"]
    # Every bundled etcd endpoint is named by the etcd certificate's wildcard.
    wildcards = [n.removeprefix("*.") for n in certs["etcd"]["spec"]["dnsNames"] if n.startswith("*.")]
    for endpoint in r.toml["cluster"]["etcd_endpoints"]:
        host = endpoint.removeprefix("https://").rsplit(":", 1)[0]
        assert host.split(".", 1)[1] in wildcards, host
    sts = r.get("StatefulSet", "etcd")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": certs["etcd"]["spec"]["secretName"]}} in sts["volumes"]
    # Off unless asked for; never with an existing Secret.
    assert rendered_sets["default"].find("Certificate") is None


def test_cert_manager_certificates_validate_for_every_set(rendered_sets: dict[str, Rendered]) -> None:
    import jsonschema

    seen = 0
    for r in rendered_sets.values():
        for cert in r.all("Certificate"):
            jsonschema.validate(cert, CERTIFICATE_SCHEMA)
            seen += 1
    assert seen >= 5  # autoscaling (2) + bundled-etcd (3)


# ---------------------------------------------------------------- secure defaults: tokens


def test_auth_secret_holds_a_random_admin_token_and_its_hash(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["default"]
    secret = r.get("Secret", "auth")
    assert secret["metadata"]["name"] == f"{RELEASE}-freshet-auth" and secret["type"] == "Opaque"
    token = base64.b64decode(secret["data"]["admin-token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", token)
    tokens = tomllib.loads(base64.b64decode(secret["data"]["tokens.toml"]).decode())
    assert tokens == {"tokens": [{"name": "admin", "sha256": sha256(token), "roles": ["admin"]}]}
    assert r.toml["auth"] == {"tokens_file": "/etc/freshet/auth/tokens.toml", "reflection": False}
    # Coordinators read the file; workers never see it.
    assert secret_items(r, "coordinator")["auth/tokens.toml"] == (secret["metadata"]["name"], "tokens.toml")
    assert not any(p.startswith("auth/") for p in secret_items(r, "worker"))
    # Each install draws a new token (an upgrade keeps the live one: `lookup`).
    other = base64.b64decode(h.render(REQUIRED).get("Secret", "auth")["data"]["admin-token"]).decode()
    assert other != token


def test_auth_extra_tokens_by_hash(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    secret = rendered_sets["sources"].get("Secret", "auth")
    tokens = tomllib.loads(base64.b64decode(secret["data"]["tokens.toml"]).decode())["tokens"]
    assert [t["name"] for t in tokens] == ["admin", "etl"]
    assert tokens[1] == {"name": "etl", "sha256": sha256("foo"), "roles": ["ingest:orders", "read"]}
    bad = render_error(h, merge(REQUIRED, {"auth": {"tokens": [{"name": "x", "sha256": "my-plain-token", "roles": ["admin"]}]}}))
    assert "auth.tokens[0].sha256 must be 64 hex digits" in bad and "my-plain-token" not in bad
    assert "is not a role" in render_error(h, merge(REQUIRED, {"auth": {"tokens": [{"name": "x", "sha256": "a" * 64, "roles": ["root"]}]}}))


def test_auth_existing_secret_and_opt_out(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"auth": {"existingSecret": "my-tokens"}}))
    assert r.find("Secret") is None
    assert secret_items(r, "coordinator")["auth/tokens.toml"] == ("my-tokens", "tokens.toml")
    (c,) = r.get("Pod", "test")["spec"]["containers"]
    assert env_of(c)["FRESHET_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-tokens", "key": "admin-token", "optional": True}
    off = h.render(merge(REQUIRED, {"auth": {"enabled": False}}))
    assert "auth" not in off.toml and off.find("Secret") is None
    assert "FRESHET_TOKEN" not in env_of(off.get("Pod", "test")["spec"]["containers"][0])


def test_token_changes_do_not_roll_coordinators(h: Helm) -> None:
    """The coordinator re-reads tokens_file when the mounted Secret changes: no restart."""
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return h.render(values).get("Deployment", "coordinator")["spec"]["template"]["metadata"]["annotations"]

    more = merge(REQUIRED, {"auth": {"tokens": [{"name": "x", "sha256": "b" * 64, "roles": ["read"]}]}})
    assert annotations(REQUIRED) == annotations(more)


def test_notes_tell_how_to_read_and_use_the_token(rendered_sets: dict[str, Rendered]) -> None:
    notes = rendered_sets["default"].notes
    for text in (
        f"kubectl -n {NAMESPACE} get secret {RELEASE}-freshet-auth -o jsonpath='{{.data.admin-token}}' | base64 -d",
        "export FRESHET_TOKEN=",
        f"kubectl -n {NAMESPACE} get secret {TLS_SECRET} -o jsonpath='{{.data.ca\\.crt}}' | base64 -d",
        "FRESHET_TLS_CA=",
        "https://localhost:50051",
    ):
        assert text in notes, text
    dev = rendered_sets["insecure-dev"].notes
    assert "FRESHET_TOKEN" not in dev and "development only" in dev


# ---------------------------------------------------------------- secure defaults: network


def test_network_policies_are_on_by_default(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["default"]
    coord, worker = r.get("NetworkPolicy", "coordinator"), r.get("NetworkPolicy", "worker")
    # Clients: this release's pods and, by default, every pod of the namespace.
    grpc_in = coord["spec"]["ingress"][0]
    assert {"podSelector": {}} in grpc_in["from"] and grpc_in["ports"] == [{"protocol": "TCP", "port": "grpc"}]
    assert not any("namespaceSelector" in p for p in grpc_in["from"])
    # Workers: gRPC from coordinators only.
    w_in = worker["spec"]["ingress"][0]
    coord_selector = {k: v for k, v in pod_labels(r.get("Deployment", "coordinator")).items() if k in SELECTOR_KEYS}
    assert w_in["from"] == [{"podSelector": {"matchLabels": coord_selector}}]

    def egress_ports(policy: dict[str, Any]) -> set[tuple[str, int]]:
        return {(p["protocol"], p["port"]) for e in policy["spec"]["egress"] for p in e["ports"]}

    for policy in (coord, worker):
        assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 2379)} <= egress_ports(policy)
    # PostgreSQL: the leader runs sources; workers never connect to it.
    assert ("TCP", 5432) in egress_ports(coord) and ("TCP", 5432) not in egress_ports(worker)
    assert rendered_sets["insecure-dev"].find("NetworkPolicy") is None


def test_network_policy_peers_for_postgres_and_the_s3_endpoint_port(h: Helm, rendered_sets: dict[str, Rendered]) -> None:
    coord = rendered_sets["sources"].get("NetworkPolicy", "coordinator")
    (pg,) = [e for e in coord["spec"]["egress"] if e["ports"] == [{"protocol": "TCP", "port": 5432}]]
    assert pg["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    # MinIO's port comes from storage.s3.endpoint without listing it.
    s3 = rendered_sets["s3-secret"].get("NetworkPolicy", "worker")
    assert {p["port"] for e in s3["spec"]["egress"] for p in e["ports"]} >= {443, 9000}
    r = h.render(merge(REQUIRED, {"networkPolicy": {"postgresPorts": []}}))
    assert not any(p["port"] == 5432 for e in r.get("NetworkPolicy", "coordinator")["spec"]["egress"] for p in e["ports"])


# ---------------------------------------------------------------- secure defaults: storage


@pytest.mark.parametrize(
    "name, prefixes",
    [
        ("default", ["s3://freshet-test"]),
        ("s3-secret", ["s3://lake"]),
        ("azure", ["az://freshet"]),
        ("local", ["file:///data"]),
        ("sources", ["s3://lake/freshet", "s3://lake/shop"]),
    ],
)
def test_allowed_prefixes_are_derived_or_given(rendered_sets: dict[str, Rendered], name: str, prefixes: list[str]) -> None:
    assert rendered_sets[name].toml["storage"]["allowed_prefixes"] == prefixes


def test_allowed_prefixes_cover_every_configured_table(h: Helm) -> None:
    r = h.render(merge(REQUIRED, {"config": {"tables": [{"name": "t", "uri": "s3://other-bucket/t", "primary_key": ["k"], "columns": [{"name": "k", "type": "int64"}]}]},
                                  "sources": [{"name": "s", "connection": "host=db", "publication": "p", "slot": "s", "tables": [{"source": "public.x", "name": "x", "uri": "gs://third/x"}]}]}))
    assert r.toml["storage"]["allowed_prefixes"] == ["s3://freshet-test", "s3://other-bucket", "gs://third"]


# ---------------------------------------------------------------- sources


def rust_fields(path: str, struct: str) -> set[str]:
    """The serde fields of a Rust struct (pub fields), read from the source."""
    text = (REPO_ROOT / path).read_text()
    body = text[text.index(f"pub struct {struct} {{"):]
    body = body[: body.index("\n}\n")]
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))


def test_sources_render_with_the_binarys_field_names(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["sources"]
    config = r.toml
    source_fields = rust_fields("common/src/source.rs", "SourceConfig")
    table_fields = rust_fields("common/src/source.rs", "SourceTable")
    secret_fields = rust_fields("common/src/secrets.rs", "SecretConfig")
    assert {"connection", "publication", "slot", "password_secret", "tables"} <= source_fields
    shop, crm = config["sources"]
    assert set(shop) <= source_fields and set(crm) <= source_fields
    for t in shop["tables"] + crm["tables"]:
        assert set(t) <= table_fields
    assert shop == {
        "name": "shop", "kind": "postgres", "connection": "host=db.shop.svc port=5432 user=freshet dbname=shop",
        "password_secret": "shop", "publication": "freshet_shop", "slot": "freshet_shop", "heartbeat_ms": 5000,
        "tables": [{"source": "public.orders", "name": "orders", "uri": "s3://lake/shop/orders"},
                   {"source": "public.customers", "name": "customers", "uri": "s3://lake/shop/customers", "partition_by": ["c_region"], "target_file_size": 16777216}],
    }
    assert config["secrets"] == {
        "shop": {"password_file": "/etc/freshet/secrets/shop/password", "hosts": ["db.shop.svc"]},
        "crm": {"password_file": "/etc/freshet/secrets/crm/password"},
        "analytics": {"password_file": "/etc/freshet/secrets/analytics/password", "hosts": ["analytics.db.internal"]},
    }
    for s in config["secrets"].values():
        assert set(s) <= secret_fields
    # Passwords reach coordinators only, each at the path its [secrets.<name>] names.
    items = secret_items(r, "coordinator")
    assert items["secrets/shop/password"] == ("shop-pg", "pg-password")
    assert items["secrets/crm/password"] == ("crm-pg", "password")
    assert items["secrets/analytics/password"] == ("analytics-pg", "password")
    assert not any(p.startswith("secrets/") for p in secret_items(r, "worker"))
    assert "pg-password" not in r.configmap_text.replace("(key pg-password)", "")


@pytest.mark.parametrize(
    "source, message",
    [
        ({"connection": "host=db password=hunter2"}, "sources[0].connection must not hold a password"),
        ({"bogus": 1}, "sources[0].bogus is not a source setting"),
        ({"name": "a b"}, "letters, digits, _ and - only"),
        ({"tables": []}, "sources[0].tables is required"),
        ({"password": {"key": "pw"}}, "sources[0].password.secretName is required"),
        ({"tables": [{"source": "public.x", "name": "x"}]}, "sources[0].tables[0].uri is required"),
    ],
)
def test_bad_sources_fail_naming_the_value(h: Helm, source: dict[str, Any], message: str) -> None:
    base = {"name": "s", "connection": "host=db", "publication": "p", "slot": "s", "tables": [{"source": "public.x", "name": "x", "uri": "s3://b/x"}]}
    err = render_error(h, merge(REQUIRED, {"sources": [{**base, **source}]}))
    assert message in err and "hunter2" not in err


def test_source_secret_names_are_unique(h: Helm) -> None:
    values = merge(REQUIRED, {
        "sources": [{"name": "s", "connection": "host=db", "publication": "p", "slot": "s", "password": {"secretName": "pg"}, "tables": [{"source": "public.x", "name": "x", "uri": "s3://b/x"}]}],
        "sourceSecrets": [{"name": "s", "secretName": "other"}],
    })
    assert 'sourceSecrets[0].name "s" is already' in render_error(h, values)


# ---------------------------------------------------------------- etcd security


def test_external_etcd_tls_and_user(rendered_sets: dict[str, Rendered], h: Helm) -> None:
    r = rendered_sets["sources"]
    cluster = r.toml["cluster"]
    assert cluster["etcd_ca_file"] == "/etc/freshet/etcd/ca.crt"
    assert (cluster["etcd_cert_file"], cluster["etcd_key_file"]) == ("/etc/freshet/etcd/tls.crt", "/etc/freshet/etcd/tls.key")
    assert (cluster["etcd_user"], cluster["etcd_password_file"]) == ("freshet", "/etc/freshet/etcd/password")
    for component in ("coordinator", "worker"):
        items = secret_items(r, component)
        assert items["etcd/ca.crt"] == ("etcd-client-tls", "ca.crt") and items["etcd/tls.key"] == ("etcd-client-tls", "tls.key")
        assert items["etcd/password"] == ("etcd-freshet-password", "password")
    assert "etcd.tls.existingSecret is not set" in render_error(h, merge(REQUIRED, {"etcd": {"endpoints": ["https://etcd:2379"]}}))
    assert "is not https://" in render_error(h, merge(REQUIRED, {"etcd": {"tls": {"existingSecret": "e"}}}))
    assert "etcd.auth.existingSecret is required" in render_error(h, merge(REQUIRED, {"etcd": {"auth": {"user": "u"}}}))
    # The bundled etcd without TLS (development) stays plain.
    dev = rendered_sets["insecure-dev"]
    assert all(e.startswith("http://") for e in dev.toml["cluster"]["etcd_endpoints"])
    assert not any(k.startswith("etcd_") and k != "etcd_endpoints" for k in dev.toml["cluster"])


def test_insecure_opt_outs(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["insecure-dev"]
    assert not {"tls", "auth"} & set(r.toml)
    for component, var in (("coordinator", "FRESHET__SERVER__ADVERTISE"), ("worker", "FRESHET__WORKER__ADVERTISE")):
        c = r.get("Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(c)[var]["value"].startswith("http://")
        assert secret_items(r, component) == {}
    (c,) = r.get("Pod", "test")["spec"]["containers"]
    assert c["args"][1].startswith("http://") and c["args"][2:] == ["admin", "tables"] and "env" not in c
    assert r.find("Secret") is None and r.find("Certificate") is None
    assert "--client-cert-auth" not in r.get("StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"][0]["args"]
