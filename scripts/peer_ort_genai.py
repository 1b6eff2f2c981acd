"""ONNX Runtime GenAI on the same workloads as `fastserve evaluate`'s speed figures: one stream of
64 prompt tokens -> 128 new (best of 3) and 32 x 64 -> 64 (median of 3), end of sequence ignored.
Runs in a virtual environment with onnxruntime-genai installed; MODEL_DIR is its model builder's output.

    python scripts/peer_ort_genai.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og


def generate(model, prompts: list[list[int]], new_tokens: int) -> int:
    """Greedy, exactly `new_tokens` per prompt; returns the tokens made."""
    params = og.GeneratorParams(model)
    total = len(prompts[0]) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    made = 0
    while not generator.is_done():
        generator.generate_next_token()
        made += len(prompts)
    return made


def main(model_dir: str, out: str) -> None:
    model = og.Model(model_dir)
    rng = random.Random(7)
    prompts = [[rng.randrange(1000, 49151) for _ in range(64)] for _ in range(32)]
    generate(model, [prompts[0]], 128)
    single = []
    for _ in range(3):
        start = time.perf_counter()
        made = generate(model, [prompts[0]], 128)
        single.append(made / (time.perf_counter() - start))
    batch = []
    for _ in range(3):
        start = time.perf_counter()
        made = generate(model, prompts, 64)
        batch.append(made / (time.perf_counter() - start))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    result = {
        "peer": f"onnxruntime-genai {og.__version__}",
        "model_dir": model_dir,
        "cpu": cpu,
        "machine": platform.machine(),
        "single_stream_tok_s": max(single),
        "batch_tok_s": statistics.median(batch),
        "single_runs": single,
        "batch_runs": batch,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
