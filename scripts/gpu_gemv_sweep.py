"""Time the decode GEMV kernel's configurations against cuBLAS on Llama-3.2-1B's projection shapes
(random bf16 weights, 16 copies of each as the layers hold them, so none is still in L2), under CUDA
graphs as in a decode step; also checks each configuration's output against F.linear. Writes JSON.

    python3 scripts/gpu_gemv_sweep.py --out gemv-sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from python_backend.ops import fused, gemv  # noqa: E402

SHAPES = {
    "qkv": (3072, 2048, False, 16),
    "o": (2048, 2048, False, 16),
    "gate_up": (16384, 2048, False, 16),
    "down": (2048, 8192, True, 16),
    "lm_head": (128256, 2048, False, 1),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1,2,4")
    args = ap.parse_args()
    dev = torch.device("cuda")
    configs = [
        gemv.GemvConfig(n, k, w, d)
        for (n, k, w), d in itertools.product(
            [
                (1, 2048, 4),
                (2, 1024, 4),
                (2, 2048, 4),
                (2, 2048, 8),
                (4, 1024, 4),
                (4, 2048, 8),
                (8, 512, 4),
                (8, 1024, 8),
            ],
            (False, True),
        )
    ]
    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": 2 * n_bytes * 10 / (start.elapsed_time(end) / 1e3),
        "seconds_per_call": {},
        "max_abs_error": {},
    }
    del src, dst
    torch.manual_seed(0)
    for name, (n, k, silu, copies) in SHAPES.items():
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for rows in [int(r) for r in args.rows.split(",")]:
            key = f"{name}/{rows}"
            times = {"cublas": gemv.time_per_call(weights, rows, None, silu)}
            x = torch.randn(rows, 2 * k if silu else k, device=dev, dtype=torch.bfloat16)
            ref = F.linear((fused.silu_mul(x) if silu else x).float(), weights[0].float())
            errors = {}
            for cfg in configs:
                label = gemv.name(cfg)
                times[label] = gemv.time_per_call(weights, rows, cfg, silu)
                errors[label] = (gemv.gemv(x, weights[0], silu_mul=silu, config=cfg).float() - ref).abs().max().item()
            result["seconds_per_call"][key] = times
            result["max_abs_error"][key] = errors
            best = min((c for c in times if c != "cublas"), key=times.get)
            print(
                f"{key:>12}: cublas {times['cublas'] * 1e6:7.1f} us, best {best} {times[best] * 1e6:7.1f} us, "
                f"bytes/s {n * k * 2 / times[best] / 1e12:.2f} TB/s",
                flush=True,
            )
        del weights
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
