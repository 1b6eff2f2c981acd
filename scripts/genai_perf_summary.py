"""Gathers the runs of scripts/genai_perf_paths.sh into one JSON: every run's genai-perf figures,
the median output throughput of each path, and each OpenAI path's ratio to the gRPC path."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def read_run(csv_path: Path) -> dict:
    """genai-perf's CSV: a table of per-request metrics (avg, p50, p99, …), then one of totals."""
    metrics: dict[str, dict | float] = {}
    for row in csv.reader(csv_path.read_text().splitlines()):
        if len(row) > 2 and row[0] != "Metric":
            metrics[row[0]] = {"avg": _number(row[1]), "p50": _number(row[8]), "p99": _number(row[4])}
        elif len(row) == 2 and row[0] != "Metric":
            metrics[row[0]] = _number(row[1])
    return metrics


def main(out_dir: str, result: str) -> None:
    runs = []
    for csv_path in sorted(Path(out_dir).glob("*-seed*/*/profile_export_genai_perf.csv")):
        path, seed = csv_path.parent.parent.name.split("-seed")
        runs.append({"path": path, "seed": int(seed), **read_run(csv_path)})
    runs.sort(key=lambda r: r["seed"])
    key = "Output Token Throughput (tokens/sec)"
    paths = sorted({r["path"] for r in runs})
    median = {p: statistics.median(r[key] for r in runs if r["path"] == p) for p in paths}
    ratios = {f"{p}_over_grpc": median[p] / median["grpc"] for p in paths if p != "grpc"}
    Path(result).write_text(json.dumps({"runs": runs, "median_output_tok_s": median, **ratios}, indent=2) + "\n")
    print(json.dumps({"median_output_tok_s": median, **ratios}))


if __name__ == "__main__":
    main(*sys.argv[1:])
