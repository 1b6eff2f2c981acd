"""Where a single sequence's decode step goes on the GPU: kernel times (eager, under torch.profiler)
against the step's wall time with and without CUDA graphs, and with the decode GEMV kernel or cuBLAS.

    python3 scripts/gpu_profile_step.py ENGINE_DIR --out profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402


def step_time(engine: Engine, n: int = 96) -> float:
    seq = engine.add_request(
        f"s{id(engine)}-{n}", list(range(1000, 1256)), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    )
    engine.run_until_done()
    return statistics.median(seq.timing.itls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name(0)}
    for graphs, gemv in ((True, False), (True, True), (False, True)):
        eng = Engine(
            args.engine_dir, EngineConfig(device="cuda", cuda_graphs=graphs, num_kv_blocks=2048, decode_gemv=gemv)
        )
        step_time(eng, 16)
        result[f"step_s_graphs_{graphs}_gemv_{gemv}"] = step_time(eng)
        if gemv:
            result["gemv_chosen"] = {f"{name}/{rows}": vars(c) for (name, rows), c in eng.model.gemv.items()}
            result["fused_qkv_chosen"] = {str(rows): vars(c) for rows, c in eng.model.fused_qkv.items()}
            result["gemv_seconds_per_call"] = eng.gemv_timings
        if not graphs:
            steps = 32
            seq = eng.add_request(
                "prof", list(range(1000, 1256)), SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
            )
            eng.step()  # prefill outside the profile
            eng.step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    eng.step()
            torch.cuda.synchronize()
            eng.run_until_done()
            per = defaultdict(float)
            count = defaultdict(int)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name] += e.device_time_total / steps / 1e6
                    count[e.name] += 1
            top = sorted(per.items(), key=lambda kv: -kv[1])
            result["kernel_s_per_step"] = sum(per.values())
            result["kernels_per_step"] = sum(count.values()) / steps
            result["top_kernels"] = [
                {"name": k[:120], "s_per_step": v, "calls_per_step": count[k] / steps} for k, v in top[:25]
            ]
            del seq
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
