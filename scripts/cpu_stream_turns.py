"""One stream, 64 prompt tokens -> 128 new (EOS ignored), through Engine.generate for several engine
folders loaded side by side in one process, in turns: each round runs every engine (the order
reversed every other round) and keeps its best of two, so that a machine's drift hits all of them
alike. Writes each engine's figures per round, medians, and per-round ratios to the first engine.

    python scripts/cpu_stream_turns.py R/bf16/1/engine R/onnx_int4_awq/1/engine --rounds 6 --out turns.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python_backend.engine.engine import Engine  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dirs", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    names = [str(Path(d).resolve().parent.parent.name) for d in args.engine_dirs]
    engines = dict(zip(names, (Engine.from_folder(d) for d in args.engine_dirs)))
    ids = list(range(1000, 1064))
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            best = 0.0
            for _ in range(2):
                start = time.perf_counter()
                [result] = engines[name].generate([ids], params)
                best = max(best, len(result.token_ids) / (time.perf_counter() - start))
            per_round[name].append(round(best, 1))
    first = names[0]
    out = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""),
        "workload": "one stream, 64 -> 128 tokens, EOS ignored, Engine.generate; best of 2 per round, in turns",
        "tok_s_per_round": per_round,
        "median_tok_s": {n: statistics.median(v) for n, v in per_round.items()},
        f"ratio_to_{first}_per_round": {
            n: [round(a / b, 2) for a, b in zip(per_round[n], per_round[first])] for n in names[1:]
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["median_tok_s"]))


if __name__ == "__main__":
    main()
