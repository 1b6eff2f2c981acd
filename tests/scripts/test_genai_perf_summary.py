"""scripts/genai_perf_summary.py reads genai-perf's CSVs (numbers with thousands separators) and
reports each OpenAI path's median throughput against the gRPC path's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import genai_perf_summary  # noqa: E402

HEADER = "Metric,avg,min,max,p99,p95,p90,p75,p50,p25,p10,p5,p1\n"


def _csv(ttft_p50: str, tok_s: float) -> str:
    return (
        HEADER
        + f'Time To First Token (ms),"1,552.16",432.77,"2,395.21","2,394.52",1,1,1,"{ttft_p50}",1,1,1,1\n'
        + "\nMetric,Value\n"
        + f"Output Token Throughput (tokens/sec),{tok_s}\nRequest Count (count),300.00\n"
    )


def test_runs_medians_and_ratios(tmp_path):
    runs = {"grpc-seed1": 200.0, "chat-seed2": 150.0, "grpc-seed3": 220.0, "chat-seed4": 170.0}
    for name, tok_s in runs.items():
        folder = tmp_path / name / "bf16-profile"
        folder.mkdir(parents=True)
        (folder / "profile_export_genai_perf.csv").write_text(_csv("1,576.49", tok_s))
    genai_perf_summary.main(str(tmp_path), str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2, 3, 4]
    assert summary["runs"][0]["Time To First Token (ms)"] == {"avg": 1552.16, "p50": 1576.49, "p99": 2394.52}
    assert summary["runs"][1]["Request Count (count)"] == 300.0
    assert summary["median_output_tok_s"] == {"chat": 160.0, "grpc": 210.0}
    assert summary["chat_over_grpc"] == 160.0 / 210.0
