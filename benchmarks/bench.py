"""Benchmarks that write JSON: the engine offline (no Triton) against transformers on one workload,
measured side by side in one process.

    fastserve bench --offline --engine-dir model_repository/smollm2/1/engine --dtype bfloat16 \
        --num-prompts 32 --input-len 64 --output-len 64 --out offline.json
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import (
    device_info,
    engine_config,
    engine_dir,
    percentiles,
    save,
    synthetic_prompts,
)
from python_backend.engine.sequence import SamplingParams


def median_of(runs: list[dict]) -> dict:
    """The run with the median throughput, with every run's figure kept beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    best = dict(ordered[len(ordered) // 2])
    best["runs_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in runs]
    if all("ttft_s" in r for r in runs):  # what sets a slow run apart: late first tokens or slow steps
        pick = lambda r, key, q: r[key].get(q) and round(r[key][q], 5)  # noqa: E731
        best["runs_summary"] = [
            {
                "tok_s": round(r["output_tokens_per_s"]),
                "ttft_p50_s": pick(r, "ttft_s", "p50"),
                "ttft_p99_s": pick(r, "ttft_s", "p99"),
                "itl_p50_s": pick(r, "itl_s", "p50"),
                **({"responses": r["server"].get("responses")} if "server" in r else {}),
            }
            for r in runs
        ]
    return best


def output_lengths(num: int, output_len: int, output_len_max: int, seed: int) -> list[int]:
    """Per-request output lengths: fixed, or uniform in [output_len, output_len_max]."""
    rng = random.Random(seed + 1)
    return [rng.randint(output_len, max(output_len, output_len_max)) for _ in range(num)]


def salted(prompts: list[str], tag: str) -> list[str]:
    """The prompts of one run, made distinct from every other run's by a leading tag, so that no run
    is served from the prefix cache that an earlier run filled (offline and through Triton alike)."""
    return [f"[{tag}] {p}" for p in prompts]


def run_engine(engine, prompts: list[str], lengths: list[int]) -> dict:
    engine.blocks.reset_prefix_cache()  # repeated runs send the same prompts: no reuse across runs
    seqs = []
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        seqs.append(engine.add_request(f"bench-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    engine.run_until_done()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(s.output_ids) for s in seqs)
    return {
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "ttft_s": percentiles([s.timing.ttft for s in seqs]),
        "itl_s": percentiles([x for s in seqs for x in s.timing.itls]),
        "jct_s": percentiles([s.timing.finished - s.timing.arrival for s in seqs]),
        "preemptions": engine.scheduler.num_preemptions,
    }


def _offline_run(engine, prompts: list[str], lengths: list[int], i: int) -> dict:
    return run_engine(engine, salted(prompts, f"run {i}"), lengths)


def run_generate_api(engine, prompts: list[str], lengths: list[int]) -> dict:
    """The same workload through the public offline API, Engine.generate."""
    engine.blocks.reset_prefix_cache()
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(r.token_ids) for r in results)
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed}


def run_hf_generate(model, prompts: list[list[int]], lengths: list[int], batch_size: int, pad_id: int) -> dict:
    """transformers generate on left-padded batches in arrival order, EOS suppressed. A batch runs to
    its longest requested output; only the tokens each request asked for are counted."""
    import torch

    def batches():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            yield ids.to(model.device), mask.to(model.device), lengths[i : i + batch_size]

    with torch.inference_mode():
        start = time.perf_counter()
        out_tokens = 0
        for ids, mask, want in batches():
            n = max(want)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
            )
            assert out.shape[1] - ids.shape[1] == n
            out_tokens += sum(want)
        _sync()
        elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "batch_size": batch_size,
    }


def run_hf_generate_batch(model, prompts: list[list[int]], lengths: list[int]) -> dict:
    """transformers' own continuous batching (generate_batch), EOS disabled (fixed output lengths only)."""
    from transformers import GenerationConfig

    if len(set(lengths)) != 1:
        raise SystemExit("fastserve bench: generate_batch takes one output length; drop it from --baselines")
    cfg = GenerationConfig(max_new_tokens=lengths[0], do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=cfg)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    _sync()
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed}


def run_triton(args: argparse.Namespace, prompts: list[str], lengths: list[int], offline_run=None) -> dict:
    """The same prompts through the real server: `concurrency` gRPC streams, each taking the next prompt.

    With `offline_run(i)`, the offline engine's runs take turns with the server's (each first every
    other round) and their median comes back as "offline": drift in the machine's speed then hits
    both alike."""
    from clients.client import Client
    from python_backend.serve import TritonServer, free_port

    server = TritonServer(Path(args.repository), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start(timeout=900)
    try:
        Client(server.grpc_url, "grpc", args.model).generate("warm up", max_tokens=4, temperature=0.0)
        load(
            server.grpc_url, args.model, salted(prompts, "warm-up"), lengths, args.concurrency, args.client_procs
        )  # untimed
        runs, offline_runs = [], []
        for i in range(max(1, args.repeats)):
            if offline_run is not None and i % 2 == 0:
                offline_runs.append(offline_run(i))
            before = _scrape(server.metrics_url)
            runs.append(
                load(
                    server.grpc_url,
                    args.model,
                    salted(prompts, f"run {i}"),
                    lengths,
                    args.concurrency,
                    args.client_procs,
                )
            )
            runs[-1]["server"] = _server_view(before, _scrape(server.metrics_url))
            if offline_run is not None and i % 2 == 1:
                offline_runs.append(offline_run(i))
    finally:
        server.stop()
    result = median_of(runs)
    if offline_runs:
        result["offline"] = median_of(offline_runs)
    return result


def _scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {series: value}, summed over label sets (one model is loaded)."""
    import urllib.request

    totals: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _server_view(before: dict[str, float], after: dict[str, float]) -> dict:
    """Where the time went, as the server saw it during one run: Triton's queue before execute(), the
    engine's time to first token (from execute()), and how many execute() calls took the requests."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(total: str, count: str) -> float | None:
        return d[total] / d[count] if d.get(count) else None

    return {
        "execute_calls": d.get("nv_inference_exec_count"),
        "requests": d.get("nv_inference_request_success"),
        "triton_queue_s": (mean("nv_inference_queue_duration_us", "nv_inference_request_success") or 0) / 1e6,
        "engine_ttft_s": mean(
            "fastserve_time_to_first_token_seconds_sum", "fastserve_time_to_first_token_seconds_count"
        ),
        "engine_e2e_s": mean("fastserve_request_latency_seconds_sum", "fastserve_request_latency_seconds_count"),
        "engine_itl_s": mean(
            "fastserve_inter_token_latency_seconds_sum", "fastserve_inter_token_latency_seconds_count"
        ),
        "responses": d.get("fastserve_responses_total"),
    }


def _stream_all(
    url: str, model: str, work: list[tuple[str, int]], concurrency: int, on_open, go, chat: bool = False
) -> tuple[list[dict], list[str]]:
    """Closed loop in one process: `concurrency` streams, each taking one request after another, on
    one asyncio gRPC channel (on_open() is called once it is connected; the requests start at
    go.set()). One event loop costs the machine far less per response than a thread per stream,
    which matters when the client shares the server's cores."""
    import asyncio

    return asyncio.run(_stream_all_async(url, model, work, concurrency, on_open, go, chat))


async def _stream_all_async(url, model, work, concurrency, on_open, go, chat=False) -> tuple[list[dict], list[str]]:
    import asyncio

    import tritonclient.grpc.aio as aio

    from clients.client import grpc_inputs

    settings = {"temperature": 0.0, "ignore_eos": True, "exclude_input_in_output": True, "stream": True}
    client = aio.InferenceServerClient(url)
    todo = list(reversed(work))
    records: list[dict] = []
    errors: list[str] = []

    async def one(prompt: str, output_len: int) -> None:
        inputs, params = grpc_inputs(prompt, {"max_tokens": output_len, **settings}, chat)

        async def request():
            yield {"model_name": model, "inputs": inputs, "parameters": params, "enable_empty_final_response": True}

        sent = time.perf_counter()
        times, n_out = [], 0
        try:
            async for result, error in client.stream_infer(inputs_iterator=request()):
                if error is not None:
                    raise error
                now = time.perf_counter()
                text = result.as_numpy("text_output")
                if text is not None and text.reshape(-1)[0]:
                    times.append(now)
                count = result.as_numpy("num_output_tokens")
                if count is not None:
                    n_out = int(count.reshape(-1)[0])
                final = result.get_response().parameters.get("triton_final_response")
                if final and final.bool_param:
                    break
        except Exception as e:  # counted, reported
            errors.append(str(e))
            return
        records.append({"sent": sent, "times": times, "end": time.perf_counter(), "tokens": n_out})

    async def worker() -> None:
        while todo:
            await one(*todo.pop())

    try:
        await client.is_server_ready()
    except Exception as e:
        errors.append(f"connect: {e}")
    on_open()
    await asyncio.to_thread(go.wait)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return records, errors


def _client_process(url, model, work, concurrency, ready, go, results, chat=False) -> None:
    results.put(_stream_all(url, model, work, concurrency, lambda: ready.put(True), go, chat))


def load(
    url: str, model: str, prompts: list[str], lengths: list[int], concurrency: int, procs: int = 0, chat: bool = False
) -> dict:
    """Closed-loop load: `concurrency` streams in `procs` client processes (0: one per 64 streams), so
    that one Python process decoding every response does not cap what the server is seen to do.
    Times are perf_counter readings, which on Linux share one monotonic clock across processes."""
    import multiprocessing as mp

    work = list(zip(prompts, lengths))
    procs = max(1, min(procs or -(-concurrency // 64), concurrency))
    start = time.perf_counter()
    if procs == 1:
        go = threading.Event()

        def begin() -> None:
            nonlocal start
            start = time.perf_counter()
            go.set()

        records, errors = _stream_all(url, model, work, concurrency, begin, go, chat)
    else:
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        children = [
            ctx.Process(
                target=_client_process,
                args=(url, model, work[i::procs], shares[i], ready, go, results, chat),
                daemon=True,
            )
            for i in range(procs)
        ]
        for c in children:
            c.start()
        for _ in children:
            ready.get(timeout=120)
        start = time.perf_counter()
        go.set()
        records, errors = [], []
        for _ in children:
            r, e = results.get()
            records += r
            errors += e
        for c in children:
            c.join(timeout=30)
    return load_summary(records, errors, start, concurrency, procs)


def load_summary(records: list[dict], errors: list[str], start: float, concurrency: int, procs: int) -> dict:
    """Throughput and latency of one closed-loop run from its records (sent, token times, end, tokens)."""
    elapsed = max((r["end"] for r in records), default=time.perf_counter()) - start
    out_tokens = sum(r["tokens"] for r in records)
    itls = []
    for r in records:
        t = r["times"]
        if len(t) > 1 and r["tokens"] > 1:
            itls.append((t[-1] - t[0]) / (r["tokens"] - 1))
    return {
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "requests": len(records),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "concurrency": concurrency,
        "client_processes": procs,
        "ttft_s": percentiles([r["times"][0] - r["sent"] for r in records if r["times"]]),
        "itl_s": percentiles(itls),
        "jct_s": percentiles([r["end"] - r["sent"] for r in records]),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def single_sequence(engine, prompt: str, n: int) -> dict:
    """One sequence alone: its median decode step against the time the weights take to stream from
    memory once (weight bytes / a device-to-device copy bandwidth measured now)."""
    import torch

    engine.blocks.reset_prefix_cache()
    seq = engine.add_request("single", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    engine.run_until_done()
    step = statistics.median(seq.timing.itls)
    result = {"decode_step_s": step, "weight_bytes": engine.model.read_bytes, "memory_bytes": engine.model.num_bytes}
    if engine.device.type == "cuda":
        buf = torch.empty(1 << 30, dtype=torch.uint8, device=engine.device)
        dst = torch.empty_like(buf)
        dst.copy_(buf)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            dst.copy_(buf)
        torch.cuda.synchronize()
        bandwidth = 2 * buf.numel() * 20 / (time.perf_counter() - t)  # bytes read + written per second
        del buf, dst
        result["copy_bandwidth_bytes_per_s"] = bandwidth
        result["weights_once_s"] = engine.model.read_bytes / bandwidth
        result["ratio_to_weights_once"] = step / result["weights_once_s"]
    return result


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def offline(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from python_backend.engine.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = engine_dir(args)
    cfg = engine_config(args)
    engine = Engine(folder, cfg)
    tok = engine.tokenizer
    prompts = synthetic_prompts(
        tok,
        engine.folder.hf_config["vocab_size"],
        args.num_prompts,
        args.input_len,
        args.input_len_max or args.input_len,
        args.seed,
    )
    result = {
        "benchmark": "offline" + ("+triton" if args.triton else ""),
        "device": device_info(cfg.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "engine_dir": str(folder),
        "engine_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "input_len_max": args.input_len_max or args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "ignore_eos": True,
            "mean_prompt_tokens": statistics.fmean(len(engine.encode(p)) for p in salted(prompts, "run 0")),
            "prompts": "run i's prompts lead with the tag '[run i] ' (no prefix-cache reuse across runs)",
        },
        "command": " ".join(sys.argv),
        "systems": {},
    }
    if engine.gemv_timings:
        result["decode_gemv"] = {
            "chosen": {f"{name}/{rows}": vars(c) for (name, rows), c in engine.model.gemv.items()},
            "seconds_per_call": engine.gemv_timings,
        }
    reps = max(1, args.repeats)
    base_reps = max(1, args.baseline_repeats or reps)
    lengths = output_lengths(args.num_prompts, args.output_len, args.output_len_max, args.seed)
    result["workload"].update(
        repeats=reps,
        baseline_repeats=base_reps,
        output_len_max=args.output_len_max or args.output_len,
        mean_output_tokens=statistics.fmean(lengths),
    )
    print(
        f"engine: {args.num_prompts} prompts, {statistics.fmean(lengths):.0f} tokens each on average, {reps} runs ...",
        flush=True,
    )
    run_engine(engine, salted(prompts, "warm-up"), lengths)  # untimed: first shapes compile and allocate
    if args.generate_api:  # the two paths take turns, each first every other round, so drift hits both alike
        internal, public = [], []
        for i in range(reps):
            for which in ("internal", "api") if i % 2 == 0 else ("api", "internal"):
                if which == "internal":
                    internal.append(run_engine(engine, salted(prompts, f"run {i}"), lengths))
                else:
                    public.append(run_generate_api(engine, salted(prompts, f"api {i}"), lengths))
        result["systems"]["fastserve"] = median_of(internal)
        result["systems"]["fastserve_generate_api"] = median_of(public)
    elif args.triton and engine.device.type == "cpu":  # memory allows both at once: take turns with the server
        print(f"the engine offline and through Triton in turns, {args.concurrency} gRPC streams ...", flush=True)
        triton = run_triton(args, prompts, lengths, functools.partial(_offline_run, engine, prompts, lengths))
        result["systems"]["fastserve"] = triton.pop("offline")
        result["systems"]["fastserve_triton"] = triton
    else:
        result["systems"]["fastserve"] = median_of(
            [run_engine(engine, salted(prompts, f"run {i}"), lengths) for i in range(reps)]
        )
    if args.single:
        result["single_sequence"] = single_sequence(engine, prompts[0], args.output_len)
    save(result, args.out)
    engine.shutdown()
    del engine
    _free_device_memory()
    if args.triton and "fastserve_triton" not in result["systems"]:
        print(f"the same through Triton, {args.concurrency} concurrent gRPC streams ...", flush=True)
        result["systems"]["fastserve_triton"] = run_triton(args, prompts, lengths)
        save(result, args.out)
    baselines = [b for b in args.baselines.split(",") if b]
    if baselines:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, result["dtype"]))
        hf = hf.to(cfg.device).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        if "generate" in baselines:
            print(f"transformers generate (batch {args.hf_batch_size}) ...", flush=True)
            result["systems"]["hf_generate"] = median_of(
                [run_hf_generate(hf, ids, lengths, args.hf_batch_size, pad) for _ in range(base_reps)]
            )
            save(result, args.out)
        if "generate_batch" in baselines:
            print("transformers generate_batch ...", flush=True)
            result["systems"]["hf_generate_batch"] = median_of(
                [run_hf_generate_batch(hf, ids, lengths) for _ in range(base_reps)]
            )
    base = result["systems"]["fastserve"]["output_tokens_per_s"]
    result["ratios"] = {
        f"{k}_vs_fastserve_offline" if k.startswith("fastserve_") else f"fastserve_vs_{k}": (
            v["output_tokens_per_s"] / base if k.startswith("fastserve_") else base / v["output_tokens_per_s"]
        )
        for k, v in result["systems"].items()
        if k != "fastserve"
    }
    return result


def print_table(result: dict) -> None:
    print(f"\n{'system':<22}{'median tok/s':>14}{'seconds':>10}   all runs")
    for name, r in result["systems"].items():
        runs = ", ".join(f"{x:.1f}" for x in r.get("runs_output_tokens_per_s", []))
        print(f"{name:<22}{r['output_tokens_per_s']:>14.1f}{r['seconds']:>10.2f}   {runs}")
    for k, v in result.get("ratios", {}).items():
        print(f"{k}: {v:.2f}x")
    if "single_sequence" in result:
        print(
            "single sequence:",
            {k: round(v, 6) if isinstance(v, float) else v for k, v in result["single_sequence"].items()},
        )


OFFLINE_OUT = "bench-results/offline.json"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON results")
    p.add_argument("--offline", action="store_true", help="drive the engine directly, no Triton")
    p.add_argument(
        "--online",
        action="store_true",
        help="arrivals over time, per scheduling policy (benchmarks/online.py); JSON and a PNG",
    )
    p.add_argument(
        "--routing",
        action="store_true",
        help="a pool (--model) serving one prompt stream by four policies; JSON and a PNG (benchmarks/routing.py)",
    )
    p.add_argument(
        "--openai",
        action="store_true",
        help="the OpenAI API against Triton's gRPC path on one server (benchmarks/openai_path.py); JSON",
    )
    p.add_argument("--strongest", default=None, help="routing: the member whose weights rate answers (default: first)")
    p.add_argument("--fastest", default=None, help="routing: the cheap member (default: the last)")
    p.add_argument("--prompts", default=None, help="routing: a prompt stream JSONL (default: the project's 512)")
    p.add_argument(
        "--quality-weight", type=float, default=None, help="routing: the router's requests' quality weight (0..1)"
    )
    p.add_argument("--policies", default="fcfs,mlfq", help="online: policies to compare on one trace")
    p.add_argument("--load", type=float, default=0.85, help="online: arrival rate as a share of measured capacity")
    p.add_argument("--rate", type=float, default=0.0, help="online: arrival rate in requests/s (overrides --load)")
    p.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    p.add_argument("--mix", default="0.8:16-64,0.2:512-1024", help="online: output lengths, weight:low-high,...")
    p.add_argument("--num-requests", type=int, default=200, help="online: requests in the trace")
    p.add_argument("--url", default=None, help="online: a running server's gRPC address instead of the engine")
    p.add_argument("--triton", action="store_true", help="also serve --repository with tritonserver and load it")
    p.add_argument("--repository", default=None, help="model repository (engine settings from its config.pbtxt)")
    p.add_argument("--model", default="smollm2", help="model name in the repository")
    p.add_argument("--engine-dir", default=None, help="engine folder, when not using --repository")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "gpu"])
    p.add_argument("--dtype", default=None, help="override the engine's dtype (offline only)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--input-len-max", type=int, default=0, help="random input lengths up to this (default: fixed)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-len-max", type=int, default=0, help="random output lengths up to this (default: fixed)")
    p.add_argument(
        "--baseline-repeats", type=int, default=0, help="runs per transformers baseline (default: --repeats)"
    )
    p.add_argument("--concurrency", type=int, default=32, help="concurrent streams against Triton")
    p.add_argument(
        "--client-procs", type=int, default=0, help="client processes for those streams (0: one per 64 streams)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None, help="override the engine's setting")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="override the engine's setting")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override the engine's setting")
    p.add_argument("--repeats", type=int, default=3, help="runs per system; the median is reported")
    p.add_argument("--baselines", default="generate,generate_batch", help="comma list: generate, generate_batch")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode steps as CUDA graphs on GPU (default on)",
    )
    p.add_argument(
        "--generate-api",
        action="store_true",
        help="also run the workload through Engine.generate, in turns with the internal add_request path",
    )
    p.add_argument("--single", action="store_true", help="also time one sequence alone against the weight stream")
    p.add_argument("--out", default=OFFLINE_OUT)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.routing:
        from benchmarks.routing import print_routing, routing

        if args.out == OFFLINE_OUT:
            args.out = "bench-results/routing.json"
        result = routing(args)
        save(result, args.out)
        print_routing(result)
        print(f"wrote {args.out} and {result['plot']}")
        return 0
    if args.openai:
        from benchmarks.openai_path import openai_vs_grpc, print_openai

        if args.out == OFFLINE_OUT:
            args.out = "bench-results/openai.json"
        result = openai_vs_grpc(args)
        save(result, args.out)
        print_openai(result)
        print(f"wrote {args.out}")
        return 0
    if args.online:
        from benchmarks.online import online, print_online

        result = online(args)
        save(result, args.out)
        print_online(result)
        print(f"wrote {args.out} and {result['plot']}")
        return 0
    if not args.offline:
        print(
            "fastserve bench: give --offline (and --triton to load the server as well), --online, --routing "
            "or --openai",
            file=sys.stderr,
        )
        return 2
    if args.triton and not args.repository:
        print("fastserve bench: --triton needs --repository", file=sys.stderr)
        return 2
    result = offline(args)
    save(result, args.out)
    print_table(result)
    print(f"wrote {args.out}")
    return 0
