"""Monitoring as an operator gets it: the compose file's Prometheus and Grafana services, the
provisioned dashboard, and the real Prometheus scraping a live server and finding every series the
dashboard plots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from python_backend.serve import free_port
from tests.conftest import FRONT_KEY

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fastserve.json"


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def _series_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:fastserve|nv)_[a-z_]+)\b", expr))


def test_compose_runs_prometheus_and_grafana_with_the_dashboard_provisioned():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"fastserve", "prometheus", "grafana"} <= set(services)
    assert "9000:9000" in services["fastserve"]["ports"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (DOCKER / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["fastserve:8002"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/fastserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in ("Time to first token", "Inter-token latency", "Tokens per second", "KV-cache blocks in use"):
        assert wanted in titles
    assert any(t.startswith("Pool") for t in titles) and any("restarts" in t for t in titles)


def _prometheus_query(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is absent: install Debian's package (apt-get install prometheus) to run this",
)
def test_prometheus_scrapes_a_live_server_and_finds_every_series_the_dashboard_plots(front, tmp_path):
    api = openai.OpenAI(base_url=front.url, api_key=FRONT_KEY, max_retries=0)
    for model in ("smollm2", "tiny_mlfq", "pool"):  # latency histograms, MLFQ levels, the pool's routing
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    target = urllib.parse.urlparse(front.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [{"job_name": "fastserve", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wanted = set().union(*(_series_names(q) for q in _queries()))
        deadline = time.monotonic() + 90
        found: set[str] = set()
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                found = set(_prometheus_query(base, "/api/v1/label/__name__/values"))
                if wanted <= found:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert wanted <= found, f"series the dashboard plots but Prometheus never saw: {sorted(wanted - found)}"
        up = _prometheus_query(base, "/api/v1/query", query='up{job="fastserve"}')["result"]
        assert up and up[0]["value"][1] == "1"
        for q in _queries():  # every panel's query is valid PromQL that Prometheus evaluates
            _prometheus_query(base, "/api/v1/query", query=q.replace("$__rate_interval", "1m").replace("$model", ".*"))
        used = _prometheus_query(base, "/api/v1/query", query='fastserve_kv_blocks{state="used",model="smollm2"}')
        assert used["result"], "no KV-block series for smollm2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
