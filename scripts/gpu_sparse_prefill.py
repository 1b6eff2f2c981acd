"""2:4 sparsity against dense on a GPU, on a random-initialised Llama-3.2-1B shape.

Builds a dense and a 2:4-pruned entry with the builder, then measures in one run:
  matmul   each projection's F.linear, dense against semi-structured sparse (cuSPARSELt and
           CUTLASS) per row count: GPU time, GPU time replayed from a CUDA graph, host time per call
  engine   prefill throughput (prompts x prompt_len -> 1 token) and decode throughput (64 x 128
           tokens) of the dense entry, and of the 2:4 entry with the sparse kernels from 256 rows
           and from every row (no dense copy), and turned off
  agree    the 2:4 entry's prompt logits with and without the sparse kernels

    python scripts/gpu_sparse_prefill.py --tokenizer TOKENIZER_DIR --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders import random_model  # noqa: E402
from python_backend.engine.config import EngineConfig  # noqa: E402
from python_backend.engine.engine import Engine  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402


def cuda_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_us(fn, iters: int = 50) -> float:
    """Host time per call, the GPU kept ahead: what a step pays where launches are not graphed."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t) / iters * 1e6
    torch.cuda.synchronize()
    return host


def graphed_ms(fn, iters: int = 20) -> float | str:
    """GPU time per call replayed from a CUDA graph (no host overhead), or why it could not be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    return cuda_ms(g.replay, iters)


def matmul_sweep(hidden: int, inter: int, qkv: int) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from builders.prune import semi_structured_mask

    shapes = {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    out = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = w * semi_structured_mask(w)
        t = time.perf_counter()
        lt = to_sparse_semi_structured(w)
        torch.cuda.synchronize()
        compress_ms = (time.perf_counter() - t) * 1e3
        cut = None  # PyTorch's CUTLASS kernels run on compute capability 8.x only
        if torch.cuda.get_device_capability()[0] == 8:
            SparseSemiStructuredTensor._FORCE_CUTLASS = True
            try:
                cut = to_sparse_semi_structured(w)
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = False
        for rows in (16, 256, 1024, 4096, 8192):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"proj": name, "n": n, "k": k, "rows": rows, "compress_ms": round(compress_ms, 2)}
            row["dense_ms"] = cuda_ms(lambda x=x, w=w: F.linear(x, w))
            for label, sw in (("cusparselt", lt),) if cut is None else (("cusparselt", lt), ("cutlass", cut)):
                fn = lambda x=x, sw=sw: F.linear(x, sw)  # noqa: E731
                row[f"{label}_ms"] = cuda_ms(fn)
                row[f"{label}_graphed_ms"] = graphed_ms(fn)
                row[f"{label}_host_us"] = round(host_us(fn), 1)
                row[f"{label}_max_abs_diff"] = (fn().float() - F.linear(x, w).float()).abs().max().item()
            out.append({k2: round(v, 4) if isinstance(v, float) else v for k2, v in row.items()})
            print(out[-1], flush=True)
    return out


def engine_run(folder: Path, label: str, prompts: int, prompt_len: int, **overrides) -> dict:
    cfg = EngineConfig(
        device="cuda", max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_memory_fraction=0.5, **overrides
    )
    t0 = time.perf_counter()
    try:
        engine = Engine(folder, cfg)
    except Exception as e:  # reported, not fatal: the other variants still run
        return {"label": label, "error": f"{type(e).__name__}: {e}"}
    start_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(100, 30000, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([list(p) for p in ids[:8]], one)  # warm-up
    prefill = []
    for r in range(3):
        salted = [[100 + r] + p[1:] for p in ids]  # no prefix-cache hits across rounds
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(salted, one)
        torch.cuda.synchronize()
        prefill.append(prompts * prompt_len / (time.perf_counter() - t))
    dec = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    decode = []
    for r in range(2):
        short = [[200 + r] + p[1:32] for p in ids[:64]]
        t = time.perf_counter()
        engine.generate(short, dec)
        decode.append(64 * 128 / (time.perf_counter() - t))
    probe = [[300] + ids[0][1:256]]
    logits = engine.prompt_logits(probe[0]).float().cpu()
    result = {
        "label": label,
        "start_s": round(start_s, 1),
        "weights_gb": round(engine.runner.model.num_bytes / 1e9, 3),
        "prefill_tok_s": [round(v) for v in prefill],
        "prefill_tok_s_median": round(statistics.median(prefill)),
        "decode_tok_s": [round(v) for v in decode],
        "graphs": engine.runner.graphs is not None,
    }
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result | {"_logits": logits}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/sparse-work")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--skip-matmul", action="store_true", help="the engine runs alone")
    args = p.parse_args()
    work = Path(args.work)
    hf = work / "hf"
    if not (hf / "config.json").exists():
        random_model.make("llama-3.2-1b", Path(args.tokenizer), hf)
    repo = work / "repo"
    for name, extra in {"dense": [], "two_four": ["--prune", "2:4"]}.items():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "builders/build.py"),
                "--model",
                str(hf),
                "--name",
                name,
                "--repository",
                str(repo),
                "--device",
                "gpu",
                "--no-evaluate",
                *extra,
            ],
            check=True,
        )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": "llama-3.2-1b (random weights)",
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
    }
    if not args.skip_matmul:
        result["matmul"] = matmul_sweep(2048, 8192, 3072)
    two_four = repo / "two_four/1/engine"
    variants = [
        (repo / "dense/1/engine", "dense", {}),
        (two_four, "2:4 sparse from 256 rows", {"sparse_kernels": True}),
        (two_four, "2:4 as dense", {}),
        (two_four, "2:4 sparse every step", {"sparse_kernels": True, "sparse_min_rows": 0}),
    ]
    runs = []
    for folder, label, overrides in variants:
        runs.append(engine_run(folder, label, args.prompts, args.prompt_len, **overrides))
        print({k: v for k, v in runs[-1].items() if k != "_logits"}, flush=True)
    ref = runs[2].get("_logits")
    for r in runs:
        logits = r.pop("_logits", None)
        if ref is not None and logits is not None and r is not runs[2]:
            r["logits_vs_2:4_dense_max_abs"] = round((logits - ref).abs().max().item(), 4)
            r["argmax_agree_vs_2:4_dense"] = round((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)
        print(r, flush=True)
    result["engine"] = runs
    dense = runs[0].get("prefill_tok_s_median")
    for r in runs[1:]:
        if dense and r.get("prefill_tok_s_median"):
            r["prefill_vs_dense"] = round(r["prefill_tok_s_median"] / dense, 3)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
