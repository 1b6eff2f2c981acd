"""Two pool members sharing a CPU: the median time per output token of each, alone and with a
quarter of the stream on the other, under a given environment for tritonserver and its engines
(for example OpenMP's wait policy).

    python scripts/cpu_member_contention.py R --strong fp32 --fast q4 --env OMP_WAIT_POLICY=PASSIVE
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.routing import load_prompts, make_stream, replay  # noqa: E402
from python_backend.serve import TritonServer, free_port  # noqa: E402


def per_token_ms(records) -> dict:
    by: dict[str, list[float]] = {}
    for r in records:
        if r.tokens > 1 and r.ttft_s is not None and not r.error:
            by.setdefault(r.member, []).append((r.latency_s - r.ttft_s) / (r.tokens - 1))
    out = {m: round(statistics.median(v) * 1e3, 1) for m, v in by.items()}
    return {**out, "mean_latency_s": round(statistics.fmean(r.latency_s for r in records), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repository")
    p.add_argument("--pool", default="pool")
    p.add_argument("--strong", required=True)
    p.add_argument("--fast", required=True)
    p.add_argument("--share", type=float, default=0.25, help="share of the stream on the strong member")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for tritonserver and its engines")
    args = p.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    stream = make_stream(load_prompts(), args.requests, args.rate, 0)
    rng = random.Random(1)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    result = {"env": env, "share": args.share}
    with TritonServer(Path(args.repository), env=env, **ports) as server:
        alone = replay(server.grpc_url, args.pool, stream[: args.requests // 2], 48, lambda a: args.fast)
        result["fast alone"] = per_token_ms(alone)
        mixed = replay(
            server.grpc_url, args.pool, stream, 48, lambda a: args.strong if rng.random() < args.share else args.fast
        )
        result["mixed"] = per_token_ms(mixed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
