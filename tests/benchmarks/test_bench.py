"""The load generator behind `fastserve bench --triton`, against the real server."""

from __future__ import annotations

from benchmarks.bench import load


def test_load_spreads_streams_over_client_processes(smollm2_server):
    prompts = [f"Count to {i}:" for i in range(6)]
    result = load(smollm2_server.grpc_url, "tiny", prompts, [8] * 6, concurrency=4, procs=2)
    assert result["client_processes"] == 2 and result["errors"] == 0
    assert result["requests"] == 6 and result["output_tokens"] == 48
    assert result["seconds"] > 0 and result["ttft_s"]["p50"] <= result["jct_s"]["p50"]


def test_offline_and_triton_take_turns_and_write_json(serving_repo, tmp_path):
    """`fastserve bench --offline --triton` on the CPU: the engine and the server's runs alternate, and
    both, with their ratio, land in the JSON."""
    import json

    from fastserve.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--offline", "--triton", "--repository", str(serving_repo), "--model", "tiny"]
    args += ["--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--repeats", "2", "--baselines", ""]
    assert main([*args, "--concurrency", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    offline, triton = result["systems"]["fastserve"], result["systems"]["fastserve_triton"]
    assert len(offline["runs_output_tokens_per_s"]) == len(triton["runs_output_tokens_per_s"]) == 2
    assert triton["errors"] == 0 and triton["output_tokens"] == 16
    ratio = result["ratios"]["fastserve_triton_vs_fastserve_offline"]
    assert ratio == triton["output_tokens_per_s"] / offline["output_tokens_per_s"]
