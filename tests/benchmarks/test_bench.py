"""The load generator behind `fastserve bench --triton`, against the real server."""

from __future__ import annotations

from benchmarks.bench import load


def test_load_spreads_streams_over_client_processes(smollm2_server):
    prompts = [f"Count to {i}:" for i in range(6)]
    result = load(smollm2_server.grpc_url, "tiny", prompts, [8] * 6, concurrency=4, procs=2)
    assert result["client_processes"] == 2 and result["errors"] == 0
    assert result["requests"] == 6 and result["output_tokens"] == 48
    assert result["seconds"] > 0 and result["ttft_s"]["p50"] <= result["jct_s"]["p50"]
