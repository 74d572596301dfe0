"""Shared helpers of the chart tests: render helm/freshet with the real Helm engine (Helm
v4's Go SDK, through the helm-python-sdk package's libhelm_c; no cluster, no network)
into parsed YAML documents.
"""

from __future__ import annotations

import copy
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "freshet"
CI_VALUES = CHART / "ci"
RELEASE = "rel"
NAMESPACE = "freshet"

# The two values without defaults, and the TLS material the secure default needs (a
# Secret the chart only references).
TLS_SECRET = "freshet-tls"
REQUIRED: dict[str, Any] = {
    "config": {"catalog": {"uri": "s3://freshet-test/freshet/catalog"}},
    "etcd": {"endpoints": ["http://etcd.etcd.svc:2379"]},
    "tls": {"existingSecret": TLS_SECRET},
}
# The development opt-outs: plaintext, no tokens, no NetworkPolicies.
INSECURE: dict[str, Any] = {"tls": {"enabled": False}, "auth": {"enabled": False}, "networkPolicy": {"enabled": False}}

# Each helm/freshet/ci/<name>-values.yaml (chart-testing's convention) is a value set.
VALUE_SETS: dict[str, dict[str, Any]] = {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
    for p in sorted(CI_VALUES.glob("*-values.yaml"))
}


def merge(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge (later wins); lists are replaced, not concatenated."""
    out = copy.deepcopy(base)
    for override in overrides:
        for k, v in override.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


@dataclass
class Rendered:
    """The manifests of one render: raw text per template and the parsed documents."""

    manifests: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, text in sorted(self.manifests.items()):
            if name.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.docs.append(doc)

    @property
    def notes(self) -> str:
        return next((t for n, t in self.manifests.items() if n.endswith("NOTES.txt")), "")

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, component: str | None = None, name: str | None = None) -> dict[str, Any]:
        found = self.find(kind, component, name)
        assert found is not None, f"no {kind} (component={component}, name={name}) rendered"
        return found

    def find(
        self, kind: str, component: str | None = None, name: str | None = None
    ) -> dict[str, Any] | None:
        for d in self.all(kind):
            labels = d["metadata"].get("labels", {})
            if component is not None and labels.get("app.kubernetes.io/component") != component:
                continue
            if name is not None and d["metadata"]["name"] != name:
                continue
            return d
        return None

    @property
    def configmap_text(self) -> str:
        return next(t for n, t in self.manifests.items() if n.endswith("templates/configmap.yaml"))

    @property
    def toml_text(self) -> str:
        return self.get("ConfigMap")["data"]["freshet.toml"]

    @property
    def toml(self) -> dict[str, Any]:
        return tomllib.loads(self.toml_text)

    def workloads(self) -> list[dict[str, Any]]:
        """Deployments and StatefulSets."""
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]

    def pod_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, pod spec) of every workload's template and of bare Pods (the helm test)."""
        out = [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in self.workloads()]
        out += [(p["metadata"]["name"], p["spec"]) for p in self.all("Pod")]
        return out


class Helm:
    """The chart loaded once; renders and lints it offline."""

    def __init__(self) -> None:
        self.chart = helm.Chart.load(str(CHART))

    def render(
        self, values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
    ) -> Rendered:
        manifests = self.chart.render(
            values or {}, name=release, namespace=namespace, is_install=True
        )
        return Rendered(manifests)

    def lint(self, values: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return helm.lint(str(CHART), values, namespace=NAMESPACE, **kw)

    def close(self) -> None:
        self.chart.close()


@pytest.fixture(scope="session")
def h() -> Helm:
    helm.disable_logging()
    engine = Helm()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def rendered_sets(h: Helm) -> dict[str, Rendered]:
    """Every value set of helm/freshet/ci, rendered once."""
    return {name: h.render(values) for name, values in VALUE_SETS.items()}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
