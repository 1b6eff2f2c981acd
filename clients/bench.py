"""Benchmarks that write JSON: the engine offline (no Triton) against transformers on one workload,
measured side by side in one process.

    fastserve bench --offline --engine-dir model_repository/smollm2/1/engine --dtype bfloat16 \
        --num-prompts 32 --input-len 64 --output-len 64 --out results/offline.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "p50": q(50), "p90": q(90), "p99": q(99)}


def synthetic_prompts(vocab_size: int, num: int, input_len: int, input_len_max: int, seed: int,
                      special_ids: set[int]) -> list[list[int]]:
    """Random token ids (no special tokens) with lengths uniform in [input_len, input_len_max]."""
    rng = random.Random(seed)
    usable = [i for i in range(vocab_size) if i not in special_ids]
    return [[rng.choice(usable) for _ in range(rng.randint(input_len, max(input_len, input_len_max)))]
            for _ in range(num)]


def device_info(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if device in ("cuda", "gpu") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_of(runs: list[dict]) -> dict:
    """The run with the median throughput, with every run's figure kept beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    best = dict(ordered[len(ordered) // 2])
    best["runs_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in runs]
    return best


def run_engine(engine, prompts: list[list[int]], output_len: int) -> dict:
    from python_backend.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.blocks.reset_prefix_cache()  # repeated runs send the same prompts: no reuse across runs
    seqs = []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        seqs.append(engine.add_request(f"bench-{i}", p, params))
    engine.run_until_done()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(s.output_ids) for s in seqs)
    return {
        "seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
        "ttft_s": percentiles([s.timing.ttft for s in seqs]),
        "itl_s": percentiles([x for s in seqs for x in s.timing.itls]),
        "jct_s": percentiles([s.timing.finished - s.timing.arrival for s in seqs]),
        "preemptions": engine.scheduler.num_preemptions,
    }


def run_hf_generate(model, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int) -> dict:
    """transformers generate on left-padded batches, EOS suppressed so every row makes output_len tokens."""
    import torch

    def batches():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            yield ids, mask

    with torch.inference_mode():
        start = time.perf_counter()
        out_tokens = 0
        for ids, mask in batches():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
            out_tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "batch_size": batch_size}


def run_hf_generate_batch(model, prompts: list[list[int]], output_len: int) -> dict:
    """transformers' own continuous batching (generate_batch), EOS disabled."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=cfg)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed}


def offline(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from python_backend.engine.engine import Engine, EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "gpu" else args.device
    engine = Engine(args.engine_dir, EngineConfig(device=device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                                  num_kv_blocks=args.num_kv_blocks))
    tok = engine.tokenizer
    prompts = synthetic_prompts(engine.model.cfg.vocab_size, args.num_prompts, args.input_len,
                                args.input_len_max or args.input_len, args.seed, set(tok.all_special_ids))
    result = {
        "benchmark": "offline", "device": device_info(device), "dtype": str(engine.dtype).replace("torch.", ""),
        "engine_dir": str(args.engine_dir),
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                     "input_len_max": args.input_len_max or args.input_len, "output_len": args.output_len,
                     "seed": args.seed, "ignore_eos": True},
        "command": " ".join(sys.argv),
        "systems": {},
    }
    reps = max(1, args.repeats)
    result["workload"]["repeats"] = reps
    print(f"engine: {args.num_prompts} prompts, {args.output_len} tokens each, {reps} runs ...", flush=True)
    result["systems"]["fastserve"] = median_of([run_engine(engine, prompts, args.output_len) for _ in range(reps)])
    del engine
    baselines = [b for b in args.baselines.split(",") if b]
    if baselines:
        hf = AutoModelForCausalLM.from_pretrained(args.engine_dir, dtype=getattr(torch, args.dtype or "float32"))
        hf = hf.to(device).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if "generate" in baselines:
            print(f"transformers generate (batch {args.hf_batch_size}) ...", flush=True)
            result["systems"]["hf_generate"] = median_of(
                [run_hf_generate(hf, prompts, args.output_len, args.hf_batch_size, pad) for _ in range(reps)])
        if "generate_batch" in baselines:
            print("transformers generate_batch ...", flush=True)
            result["systems"]["hf_generate_batch"] = median_of(
                [run_hf_generate_batch(hf, prompts, args.output_len) for _ in range(reps)])
    ours = result["systems"]["fastserve"]["output_tokens_per_s"]
    result["ratios"] = {f"fastserve_vs_{k}": ours / v["output_tokens_per_s"]
                        for k, v in result["systems"].items() if k != "fastserve"}
    return result


def print_table(result: dict) -> None:
    print(f"\n{'system':<22}{'median tok/s':>14}{'seconds':>10}   all runs")
    for name, r in result["systems"].items():
        runs = ", ".join(f"{x:.1f}" for x in r.get("runs_output_tokens_per_s", []))
        print(f"{name:<22}{r['output_tokens_per_s']:>14.1f}{r['seconds']:>10.2f}   {runs}")
    for k, v in result.get("ratios", {}).items():
        print(f"{k}: {v:.2f}x")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON results")
    p.add_argument("--offline", action="store_true", help="drive the engine directly, no Triton")
    p.add_argument("--engine-dir", required=True, help="engine folder (model_repository/<name>/1/engine)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "gpu"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--input-len-max", type=int, default=0, help="random input lengths up to this (default: fixed)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--num-kv-blocks", type=int, default=0)
    p.add_argument("--baselines", default="generate,generate_batch", help="comma list: generate, generate_batch")
    p.add_argument("--repeats", type=int, default=3, help="runs per system; the median is reported")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--out", default="results/offline.json")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if not args.offline:
        print("fastserve bench: only --offline is available so far", file=sys.stderr)
        return 2
    result = offline(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")
    return 0
