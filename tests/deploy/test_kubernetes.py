"""The Kubernetes manifests under deploy/: valid against the Kubernetes API's schemas (offline, with
kubernetes-validate), and consistent with what the server really exposes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")


def _resources() -> dict[str, dict]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            out[doc["kind"]] = doc
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly(version):
    resources = _resources()
    assert set(resources) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Job"}
    for doc in resources.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_refused():
    deployment = _resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_pieces_fit_together():
    r = _resources()
    deployment, service, hpa, job = r["Deployment"], r["Service"], r["HorizontalPodAutoscaler"], r["Job"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the ports the image exposes: Triton's HTTP, gRPC and metrics, and the OpenAI-compatible API
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1).split()
    assert sorted(ports.values()) == sorted(int(p) for p in exposed)
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    # probes on Triton's health endpoints
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    # the repository the server reads is the volume the build job writes
    claim = r["PersistentVolumeClaim"]["metadata"]["name"]
    serve_repo = container["command"][container["command"].index("--repository") + 1]
    build = job["spec"]["template"]["spec"]["containers"][0]
    build_repo = build["args"][build["args"].index("--repository") + 1]
    for spec, path in ((pod["spec"], serve_repo), (job["spec"]["template"]["spec"], build_repo)):
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == claim
    # the autoscaler scales this Deployment on a gauge the server exports
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f'"{metric}"' in (ROOT / "python_backend" / "metrics.py").read_text()
    adapter = yaml.safe_load((MANIFESTS / "prometheus-adapter.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == metric
