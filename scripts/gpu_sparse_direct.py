"""Host and GPU time of one 2:4 product: PyTorch's sparse tensor subclass against the cuSPARSELt op
it calls, called directly (no subclass dispatch), with and without a fused transpose.

    python scripts/gpu_sparse_direct.py --out direct.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders.prune import semi_structured_mask  # noqa: E402
from scripts.gpu_sparse_prefill import cuda_ms, host_us  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from torch.sparse import to_sparse_semi_structured

    rows_out = []
    for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = w * semi_structured_mask(w)
        sub = to_sparse_semi_structured(w)
        packed = torch._cslt_compress(w)
        for rows in (256, 1024, 8192):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            alg = torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True)
            ways = {
                "dense": lambda x=x, w=w: F.linear(x, w),
                "subclass": lambda x=x, sub=sub: F.linear(x, sub).contiguous(),
                "direct_t": lambda x=x, packed=packed: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True),
                "direct_t_alg": lambda x=x, packed=packed, alg=alg: torch._cslt_sparse_mm(
                    packed, x.t(), transpose_result=True, alg_id=alg
                ),
                "direct_plain_t": lambda x=x, packed=packed: torch._cslt_sparse_mm(packed, x.t()).t().contiguous(),
            }
            row = {"n": n, "k": k, "rows": rows, "alg": alg}
            for name, fn in ways.items():
                try:
                    y = fn()
                    row[f"{name}_shape"] = list(y.shape)
                    row[f"{name}_contig"] = y.is_contiguous()
                    row[f"{name}_maxdiff"] = round((y.float() - ref).abs().max().item(), 3)
                    row[f"{name}_ms"] = round(cuda_ms(fn), 4)
                    row[f"{name}_host_us"] = round(host_us(fn), 1)
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(row, flush=True)
            rows_out.append(row)
    Path(args.out).write_text(
        json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows_out}, indent=1)
    )


if __name__ == "__main__":
    main()
