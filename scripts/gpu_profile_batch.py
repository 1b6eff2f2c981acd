"""Where a batched decode step goes on the GPU: B sequences decoding together, with CUDA graphs and
without: the step's wall time, kernel times by kind under torch.profiler and, with --host-top, the
host's busiest functions during graphed steps (cProfile), for each entry given.

    python3 scripts/gpu_profile_batch.py ENGINE_DIR [...] --batch 256 [--kv-cache-dtype fp8] --out profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402

KINDS = (  # substring of a kernel's name -> its kind, first match wins
    ("attention", "attention"),
    ("_decode_kernel", "attention"),
    ("fp8_rows", "fp8 activation rounding"),
    ("gemm", "matrix products"),
    ("gemv", "matrix products"),
    ("_mm_kernel", "matrix products"),
    ("int4", "matrix products"),
    ("sm90", "matrix products"),
    ("cutlass", "matrix products"),
    ("nvjet", "matrix products"),
    ("norm", "norms"),
    ("rope", "rotary and KV writes"),
    ("silu", "activation"),
    ("argmax", "sampling"),
    ("chunk_max", "sampling"),
    ("pick_chunk", "sampling"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for key, kind in KINDS if key in low), "other")


def decoding(engine: Engine, batch: int, prompt_len: int, tag: str) -> None:
    """Start `batch` sequences and step until every one has left its prefill."""
    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"{tag}{i}", [1000 + (i * 7 + j) % 5000 for j in range(prompt_len)], params)
            for i in range(batch)]  # fmt: skip
    while any(not s.output_ids for s in seqs):
        engine.step()
    torch.cuda.synchronize()


def profile(
    folder: str, batch: int, prompt_len: int, steps: int, host_top: int = 0, kv_cache_dtype: str = "auto"
) -> dict:
    out: dict = {}
    for graphs in (True, False):
        eng = Engine(
            folder,
            EngineConfig(
                device="cuda",
                cuda_graphs=graphs,
                max_num_seqs=batch,
                max_model_len=4096,
                max_num_batched_tokens=8192,
                max_graph_batch=batch,
                num_kv_blocks=batch * (prompt_len + 3 * steps + 72) // 16 + 64,
                kv_cache_dtype=kv_cache_dtype,
            ),
        )
        decoding(eng, batch, prompt_len, f"g{graphs}-")
        for _ in range(4):
            eng.step()
        torch.cuda.synchronize()
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        out["step_s_graphs" if graphs else "step_s_eager"] = statistics.median(walls)
        if graphs:
            if host_top:  # where the host's share of a graphed step goes
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(steps):
                    eng.step()
                torch.cuda.synchronize()
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(host_top)
                out["host_profile"] = text.getvalue()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        per, by_kind = defaultdict(float), defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name] += e.device_time_total / steps / 1e6
                by_kind[kind_of(e.name)] += e.device_time_total / steps / 1e6
        mode = "graphs" if graphs else "eager"
        out[f"kernel_s_per_step_{mode}"] = sum(per.values())
        out[f"by_kind_s_per_step_{mode}"] = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
        out[f"top_kernels_{mode}"] = [
            {"name": k[:120], "s_per_step": v} for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:15]
        ]
        eng.shutdown()
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dirs", nargs="+")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--host-top", type=int, default=0, help="also profile the host's graphed steps: top N functions")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8"))
    ap.add_argument(
        "--decode-tile",
        help="with a code cache, the decode attention tile in place of the default: KEYS,WARPS,STAGES[,f16]",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.decode_tile:
        from python_backend.ops import triton_attention as ta

        keys, warps, stages, *half = args.decode_tile.split(",")
        tile = ta.DecodeConfig(int(keys), int(warps), int(stages), half_dot=half == ["f16"])
        plain = ta.default_decode_config
        ta.default_decode_config = lambda d, codes: tile if codes != ta.PLAIN else plain(d, codes)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "kv_cache_dtype": args.kv_cache_dtype,
        "decode_tile": args.decode_tile,
        "entries": {},
    }
    for folder in args.engine_dirs:
        result["entries"][folder] = profile(
            folder, args.batch, args.prompt_len, args.steps, args.host_top, args.kv_cache_dtype
        )
        print(folder, json.dumps(result["entries"][folder], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
