"""The client library and `fastserve generate`, against the real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from clients.client import Client, GenerateError
from tests.conftest import ROOT


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_stream_and_chat(smollm2_server, protocol):
    url = smollm2_server.grpc_url if protocol == "grpc" else smollm2_server.http_url
    c = Client(url, protocol, "smollm2")
    whole = c.generate("The capital of France is", max_tokens=12, temperature=0.0)
    assert "Paris" in whole.text and whole.num_output_tokens == 12 and whole.finish_reason == "length"
    pieces = list(c.stream("The capital of France is", max_tokens=12, temperature=0.0))
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    answer = c.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=30, temperature=0.0)
    assert "Paris" in answer.text and answer.finish_reason == "stop"
    stopped = c.generate("The capital of France is", max_tokens=12, temperature=0.0, stop=["."])
    assert stopped.text == whole.text.split(".")[0] and stopped.finish_reason == "stop"


def test_async_api(smollm2_server):
    c = Client(smollm2_server.grpc_url, "grpc", "smollm2")

    async def main():
        results = await asyncio.gather(
            *[c.agenerate(f"Number {i} is", max_tokens=5, temperature=0.0, ignore_eos=True) for i in range(4)]
        )
        pieces = [p async for p in c.astream("Hello there", max_tokens=6, temperature=0.0)]
        chat = await c.achat([{"role": "user", "content": "Hi"}], max_tokens=8)
        return results, pieces, chat

    results, pieces, chat = asyncio.run(main())
    assert all(r.num_output_tokens == 5 for r in results)
    assert "".join(pieces) == c.generate("Hello there", max_tokens=6, temperature=0.0).text
    assert chat.num_output_tokens <= 8


def test_a_connected_thread_reuses_its_stream_and_replaces_an_abandoned_one(smollm2_server):
    with Client(smollm2_server.grpc_url, "grpc", "smollm2") as c:
        c.connect()
        first = c._local.stream
        a = c.generate("The capital of France is", max_tokens=5, temperature=0.0)
        b = c.generate("The capital of France is", max_tokens=5, temperature=0.0)
        assert c._local.stream is first and a.text == b.text and b.num_output_tokens == 5
        pieces = c.stream("Count slowly to a thousand:", 2000, ignore_eos=True)
        next(pieces)
        pieces.close()  # abandoned mid-stream: the request is cancelled with its stream
        assert c._local.stream is not first
        assert c.generate("The capital of France is", max_tokens=5, temperature=0.0).text == a.text
    assert not c._streams


def test_errors_surface_as_generate_error(smollm2_server):
    for protocol, url in (("grpc", smollm2_server.grpc_url), ("http", smollm2_server.http_url)):
        with pytest.raises(GenerateError, match="top_p"):
            Client(url, protocol, "smollm2").generate("Hi", max_tokens=4, top_p=2.0)


def test_cli_generate(smollm2_server):
    base = [
        sys.executable,
        "-m",
        "fastserve.cli",
        "generate",
        "--url",
        smollm2_server.grpc_url,
        "--max-tokens",
        "20",
        "--temperature",
        "0",
    ]
    out = subprocess.run(
        base + ["--stream", "--chat", "What is the capital of France?"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "Paris" in out.stdout
    bad = subprocess.run(base + ["--top-p", "5", "Hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "top_p" in bad.stderr
