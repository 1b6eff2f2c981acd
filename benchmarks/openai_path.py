"""The OpenAI API against Triton's gRPC path: one `fastserve serve` (Triton and the OpenAI API),
the same chat workload through each in turns (closed loop, `--concurrency` streams, EOS ignored so
every request makes exactly its output length), the median of `--repeats` rounds each.

    fastserve bench --openai --repository R --model smollm2 --concurrency 32 \\
        --num-prompts 256 --input-len 64 --output-len 64 --out bench-results/openai.json

Both clients are one asyncio process: gRPC streams through tritonclient, HTTP streams (server-sent
events) through aiohttp. Output tokens are what each path reports (the final usage chunk; the
engine's count over gRPC).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from benchmarks.bench import load, load_summary, median_of, salted
from benchmarks.common import device_info, synthetic_prompts
from python_backend.serve import ServeProcess

KEY = "bench-key-openai-path"


def load_openai(
    base: str, model: str, prompts: list[str], lengths: list[int], concurrency: int, key: str = KEY
) -> dict:
    """Closed loop over /v1/chat/completions, streamed with usage; the records load() keeps."""
    return asyncio.run(_load_openai(base, model, list(zip(prompts, lengths)), concurrency, key))


async def _load_openai(base: str, model: str, work: list[tuple[str, int]], concurrency: int, key: str) -> dict:
    import aiohttp

    todo = list(reversed(work))
    records: list[dict] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector, timeout=timeout) as session:

        async def one(prompt: str, output_len: int) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": output_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.perf_counter()
            times, n_out = [], 0
            try:
                async with session.post("/v1/chat/completions", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            n_out = chunk["usage"]["completion_tokens"]
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            times.append(time.perf_counter())
            except Exception as e:  # counted, reported
                errors.append(str(e))
                return
            records.append({"sent": sent, "times": times, "end": time.perf_counter(), "tokens": n_out})

        async def worker() -> None:
            while todo:
                await one(*todo.pop())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return load_summary(records, errors, start, concurrency, 1)


def _chat(prompts: list[str]) -> list[str]:
    """The prompts as the chat messages a FastServe model takes over gRPC (what the API sends it)."""
    return [json.dumps([{"role": "user", "content": p}]) for p in prompts]


def openai_vs_grpc(args: argparse.Namespace) -> dict:
    if not args.repository:
        raise SystemExit("fastserve bench --openai: give --repository")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.repository) / args.model / "1" / "engine")
    n = args.input_len
    prompts = synthetic_prompts(tokenizer, len(tokenizer), args.num_prompts, n, args.input_len_max or n, args.seed)
    lengths = [args.output_len] * len(prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    serve = ServeProcess(
        Path(args.repository), out.with_suffix(".server.log"), ["--api-key", KEY, "--max-streams-per-key", "100000"]
    )
    grpc_runs, openai_runs = [], []
    try:
        serve.wait_ready(900)
        for path in ("grpc", "openai"):
            warm = salted(prompts, f"warm-up {path}")[: args.concurrency]
            if path == "grpc":
                load(serve.grpc_url, args.model, _chat(warm), lengths, args.concurrency, 1, chat=True)
            else:
                load_openai(serve.openai_url, args.model, warm, lengths, args.concurrency)
        for i in range(max(1, args.repeats)):
            order = ("grpc", "openai") if i % 2 == 0 else ("openai", "grpc")
            for path in order:
                work = salted(prompts, f"run {i} {path}")  # no run finds another's prompts in the prefix cache
                print(f"round {i + 1}: {path}, {len(work)} requests at {args.concurrency} streams ...", flush=True)
                if path == "grpc":
                    grpc_runs.append(
                        load(serve.grpc_url, args.model, _chat(work), lengths, args.concurrency, 1, chat=True)
                    )
                else:
                    openai_runs.append(load_openai(serve.openai_url, args.model, work, lengths, args.concurrency))
    finally:
        serve.stop()
    for run in grpc_runs + openai_runs:
        if run["errors"] or not run["output_tokens"]:
            raise SystemExit(f"fastserve bench --openai: a run failed: {run['error_samples']}")
    grpc, oai = median_of(grpc_runs), median_of(openai_runs)
    ratios = [o["output_tokens_per_s"] / g["output_tokens_per_s"] for g, o in zip(grpc_runs, openai_runs)]
    return {
        "benchmark": "openai_vs_grpc",
        "command": " ".join(sys.argv),
        "device": device_info("cpu"),
        "workload": {
            "model": args.model,
            "endpoint": "chat, streamed",
            "concurrency": args.concurrency,
            "requests": len(prompts),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "repeats": args.repeats,
        },
        "grpc": grpc,
        "openai": oai,
        "openai_over_grpc_throughput": oai["output_tokens_per_s"] / grpc["output_tokens_per_s"],
        "per_round_ratios": ratios,
        "runs": {"grpc": grpc_runs, "openai": openai_runs},
    }


def print_openai(result: dict) -> None:
    for path in ("grpc", "openai"):
        r = result[path]
        print(
            f"{path:<7} {r['output_tokens_per_s']:>8.1f} tok/s  ttft p50 {r['ttft_s']['p50'] * 1e3:7.1f} ms"
            f"  itl p50 {r['itl_s']['p50'] * 1e3:6.1f} ms  errors {r['errors']}"
        )
    print(f"OpenAI / gRPC throughput: {result['openai_over_grpc_throughput']:.3f}")
