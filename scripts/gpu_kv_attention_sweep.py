"""The decode attention kernel over a plain bfloat16 cache and over int8 and E4M3 code caches, for each
tile configuration, at a decode step's shape (Llama-3.2-1B's heads: 32 query heads, 8 KV heads of 64;
blocks of 16 tokens). Each configuration is timed under a CUDA graph over several layers' caches, so
that no cache stays in L2. With --bench, the sweep's best configuration for code caches becomes the
default and `fastserve bench` runs with it in this process (its arguments follow --bench).

    python3 scripts/gpu_kv_attention_sweep.py --batch 256 --context 320 --out sweep.json
    python3 scripts/gpu_kv_attention_sweep.py --use sweep.json --bench --offline --repository R --model M ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from python_backend.ops import triton_attention as ta  # noqa: E402
from python_backend.ops.attention import quantize_rows, write_rows  # noqa: E402

H, HKV, D, BLOCK = 32, 8, 64, 16
LAYERS = 4


def caches(kind: str, batch: int, context: int) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    per_seq = -(-context // BLOCK)
    blocks = batch * per_seq
    tables = torch.randperm(blocks, device="cuda").view(batch, per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    ks, vs = [], []
    for _ in range(LAYERS):
        pair = []
        for _ in range(2):
            values = torch.randn(blocks, BLOCK, HKV, D, device="cuda", dtype=torch.bfloat16)
            if kind == "bf16":
                pair.append(values)
                continue
            code_dtype = torch.int8 if kind == "int8" else torch.uint8
            cache = torch.zeros(blocks, BLOCK, HKV, D + 2, dtype=code_dtype, device="cuda")
            write_rows(
                cache, torch.arange(blocks * BLOCK, device="cuda"), quantize_rows(values.view(-1, HKV, D), code_dtype)
            )
            pair.append(cache)
        ks.append(pair[0])
        vs.append(pair[1])
    return ks, vs, tables, lens


def time_config(kind_caches, batch: int, config: ta.DecodeConfig) -> float:
    ks, vs, tables, lens = kind_caches
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    splits = ta.num_splits_for(batch, HKV, int(lens.max()))

    def step() -> None:
        for k, v in zip(ks, vs):
            ta.decode_attention(q, k, v, tables, lens, D**-0.5, splits, out=out, config=config)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10 / LAYERS * 1e3)
    return sorted(times)[len(times) // 2]


def name_of(config: ta.DecodeConfig) -> str:
    return f"n{config.block_n}-w{config.num_warps}-s{config.num_stages}" + ("-f16" if config.half_dot else "")


def sweep(batch: int, context: int) -> dict:
    configs = [
        ta.DecodeConfig(block_n=n, num_warps=w, num_stages=s, half_dot=h)
        for n, w, s, h in itertools.product((32, 64, 128), (2, 4, 8), (2, 3), (False, True))
    ]
    result = {"gpu": torch.cuda.get_device_name(0), "batch": batch, "context": context, "us_per_layer": {}}
    best = None
    for kind in ("bf16", "fp8", "int8"):
        kind_caches = caches(kind, batch, context)
        codes = {"bf16": ta.PLAIN, "fp8": ta.FP8_CODES, "int8": ta.INT8_CODES}[kind]
        default = ta.default_decode_config(D, codes)
        if kind == "bf16":
            tried = [c for c in configs if not c.half_dot]
        elif kind == "fp8":
            tried = configs
        else:
            tried = [default, best]
        timings = {}
        for config in tried:
            try:
                timings[name_of(config)] = round(time_config(kind_caches, batch, config), 2)
            except Exception as exc:  # a tile that does not compile or fit is skipped, and said
                timings[name_of(config)] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        result["us_per_layer"][kind] = timings
        ranked = sorted((t, n) for n, t in timings.items() if isinstance(t, float))
        print(kind, "default", name_of(default), timings.get(name_of(default)), "us; best:", ranked[:4], flush=True)
        if kind == "fp8":
            best = next(c for c in tried if name_of(c) == ranked[0][1])
            result["best_for_codes"] = vars(best)
        del kind_caches
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=320)
    ap.add_argument("--out", help="sweep, and write the timings here")
    ap.add_argument("--use", help="a sweep's JSON: its best configuration for code caches, without sweeping")
    ap.add_argument("--bench", nargs=argparse.REMAINDER, default=None, help="fastserve bench's arguments")
    args = ap.parse_args()
    if args.out:
        Path(args.out).write_text(json.dumps(sweep(args.batch, args.context), indent=2) + "\n")
    if args.bench is not None:
        chosen = ta.DecodeConfig(**json.loads(Path(args.use or args.out).read_text())["best_for_codes"])
        print("fastserve bench with code caches decoding by", chosen, flush=True)
        plain = ta.default_decode_config
        ta.default_decode_config = lambda d, codes: chosen if codes != ta.PLAIN else plain(d, codes)
        from fastserve.cli import main as cli

        cli(["bench", *args.bench])


if __name__ == "__main__":
    main()
