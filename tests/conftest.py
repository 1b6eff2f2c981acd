"""Shared fixtures: a real tritonserver on free ports, the shared prompts, the SmolLM2 file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from python_backend.serve import TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TEST_REPOS = Path(__file__).resolve().parent / "repos"


def start_server(repository: Path, **kw) -> TritonServer:
    """A real tritonserver on free ports; the caller stops it."""
    return TritonServer(
        repository=repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **kw
    ).start(timeout=600)


@pytest.fixture(scope="session")
def echo_server():
    server = start_server(TEST_REPOS / "good")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_prompts() -> list[dict]:
    path = SHARED / "data" / "prompts.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not here: the shared data sits beside the checkout")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
