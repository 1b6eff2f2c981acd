"""Each entry of a repository served by the real Triton server: one greedy answer and its decode rate
through gRPC, for the compression comparison.

    python scripts/compression_served.py REPO original two_four structured student --out served.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.client import Client  # noqa: E402
from python_backend.serve import TritonServer, free_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repository")
    p.add_argument("models", nargs="+")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    served = {}
    with TritonServer(Path(args.repository), **ports) as server:
        for name in args.models:
            client = Client(server.grpc_url, model=name)
            client.chat(MESSAGES, max_tokens=4, temperature=0.0)  # warm-up
            rates, answer = [], None
            for _ in range(3):
                start = time.perf_counter()
                answer = client.chat(MESSAGES, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
                rates.append(answer.num_output_tokens / (time.perf_counter() - start))
            short = client.chat(MESSAGES, max_tokens=args.max_tokens, temperature=0.0)
            served[name] = {
                "served_tok_s_best_of_3": round(max(rates), 1),
                "output_tokens": answer.num_output_tokens,
                "answer": short.text,
            }
            print(name, served[name], flush=True)
    Path(args.out).write_text(json.dumps(served, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
