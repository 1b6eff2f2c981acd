"""The real tritonserver, started the way `fastserve serve` starts it, answers over HTTP and gRPC."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from python_backend.serve import ServerError, TritonServer, free_port
from tests.conftest import ROOT, TEST_REPOS


def _inputs(module, x: np.ndarray, text: list[str]):
    a = module.InferInput("x", list(x.shape), "FP32")
    a.set_data_from_numpy(x)
    t = np.array([[s.encode()] for s in text], dtype=np.object_)
    b = module.InferInput("text", list(t.shape), "BYTES")
    b.set_data_from_numpy(t)
    return [a, b]


def test_ready_endpoint(echo_server):
    with urllib.request.urlopen(f"http://{echo_server.http_url}/v2/health/ready") as r:
        assert r.status == 200


def test_http_inference(echo_server):
    client = httpclient.InferenceServerClient(echo_server.http_url)
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    result = client.infer("echo", _inputs(httpclient, x, ["hello"]))
    np.testing.assert_allclose(result.as_numpy("y"), [[3.0, -4.0]])
    assert result.as_numpy("upper")[0][0] == b"HELLO"


def test_grpc_inference_batched(echo_server):
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    result = client.infer("echo", _inputs(grpcclient, x, ["a", "bé", "c"]))
    np.testing.assert_allclose(result.as_numpy("y"), x * 2)
    assert [r[0].decode() for r in result.as_numpy("upper")] == ["A", "BÉ", "C"]


def test_failed_model_raises_with_reason():
    server = TritonServer(TEST_REPOS / "broken", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with pytest.raises(ServerError, match="missing engine.json"):
        server.start(timeout=120)
    assert server.proc is not None and server.proc.poll() is not None


def test_cli_serve_exits_nonzero_on_failed_model():
    cmd = [
        sys.executable,
        "-m",
        "fastserve.cli",
        "serve",
        "--repository",
        str(TEST_REPOS / "broken"),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--timeout",
        "120",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "missing engine.json" in proc.stderr


def test_cli_serve_missing_repository():
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve.cli", "serve", "--repository", "/nonexistent/repo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "/nonexistent/repo" in proc.stderr
