"""The CPU measurements behind three design choices, side by side in one process, as JSON:

1. oneDNN prepacked bf16 weights against F.linear, over one decode step's matrix products of SmolLM2
   (30 layers of distinct weights, so they stream from memory as in the engine) at 32 rows;
2. a bf16 matrix product on the main thread against a second thread after the main thread has used
   PyTorch's OpenMP pool (why Engine.launch builds the engine on its loop's thread);
3. decode attention over gathered blocks: query heads laid along the query axis against a copy of
   K and V made contiguous for grouped-query attention.

    python scripts/cpu_microbench.py --out cpu-microbench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
# SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, head 64, FFN 1536, 30 layers, vocabulary 49,152
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def timed(fn, n: int) -> float:
    """Median seconds of n calls after a warm-up."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def packed_weights(rows: int = 32) -> dict:
    weights = [[torch.randn(n, k, dtype=BF16) for n, k in SHAPES] for _ in range(30)]
    lm_head = torch.randn(49152, 576, dtype=BF16)
    xs = {k: torch.randn(rows, k, dtype=BF16) for k in (576, 1536)}
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer] for layer in weights]
    lm_packed = torch.ops.mkldnn._reorder_linear_weight(lm_head, None)

    def plain() -> None:
        for layer in weights:
            for w in layer:
                F.linear(xs[w.shape[1]], w)
        F.linear(xs[576], lm_head)

    def prepacked() -> None:
        for layer in packed:
            for w, (_, k) in zip(layer, SHAPES):
                torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
        torch.ops.mkldnn._linear_pointwise(xs[576], lm_packed, None, "none", [], "")

    x, w = xs[576], weights[0][2]
    same = torch.equal(F.linear(x, w), torch.ops.mkldnn._linear_pointwise(x, packed[0][2], None, "none", [], ""))
    return {
        "rows": rows,
        "f_linear_step_s": timed(plain, 10),
        "prepacked_step_s": timed(prepacked, 10),
        "bit_identical": same,
    }


def openmp_threads() -> dict:
    a, w = torch.randn(32, 576, dtype=BF16), torch.randn(3072, 576, dtype=BF16)

    def product() -> None:
        a @ w.t()

    big = torch.randn(3000, 3000)
    _ = big + big  # the main thread uses the OpenMP pool first, as loading a model does
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("other_thread_s", timed(product, 300)))
    worker.start()
    worker.join()
    result["main_thread_s"] = timed(product, 300)
    return result


def decode_attention_layout(batch: int = 32, length: int = 160) -> dict:
    hkv, h, d, bs = 3, 9, 64, 16
    k_cache = torch.randn(4096, bs, hkv, d, dtype=BF16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.stack([torch.randperm(4096)[: length // bs] for _ in range(batch)]).reshape(-1)
    q = torch.randn(batch, h, 1, d, dtype=BF16)
    mask = torch.zeros(batch, 1, 1, length, dtype=BF16)

    def gather(cache):
        return cache.index_select(0, tables).view(batch, length, hkv, d).transpose(1, 2)

    def heads_along_query() -> None:
        F.scaled_dot_product_attention(
            q.view(batch, hkv, h // hkv, d), gather(k_cache), gather(v_cache), attn_mask=mask
        )

    def contiguous_gqa() -> None:
        F.scaled_dot_product_attention(
            q, gather(k_cache).contiguous(), gather(v_cache).contiguous(), attn_mask=mask[:, :, :1], enable_gqa=True
        )

    return {
        "batch": batch,
        "context": length,
        "heads_along_query_s": timed(heads_along_query, 200),
        "contiguous_gqa_s": timed(contiguous_gqa, 200),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/cpu-microbench.json")
    args = p.parse_args()
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "openmp_threads": openmp_threads(),  # first: it needs a main thread that used OpenMP only once
        "packed_weights": packed_weights(),
        "decode_attention": decode_attention_layout(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
