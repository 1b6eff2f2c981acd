"""On a GPU: sequences preempted by the MLFQ, swapped to pinned host memory on the side stream and
swapped back, give token for token the output they give uninterrupted."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the GPU hosts: scripts/gpu_bench.sh)", allow_module_level=True)

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import run_staggered  # noqa: E402


@pytest.mark.parametrize("swap_space_gb,expect", [(1.0, "swap"), (1e-9, "recompute")])
def test_swapped_sequences_resume_token_for_token_on_gpu(small_gpu_engine_dir, swap_space_gb, expect):
    engine_dir = small_gpu_engine_dir
    prompts = [[(13 * i + j) % 40000 + 100 for j in range(20 + 9 * i)] for i in range(12)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = [
        r.token_ids
        for r in Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=256)).generate(prompts, params)
    ]
    engine = Engine(
        engine_dir,
        EngineConfig(
            device="cuda",
            num_kv_blocks=24,
            scheduler="mlfq",
            max_num_seqs=4,
            swap_space_gb=swap_space_gb,
            mlfq_base_quantum_s=0.002,
        ),
    )
    results = run_staggered(engine, prompts, params, every=3)
    state = engine.scheduler.state()
    if expect == "swap":
        assert state["swap_outs"] > 0 and state["swap_ins"] > 0, state
    else:
        assert state["recomputes"] > 0, state
    assert [r.token_ids for r in results] == want
    assert engine.blocks.num_used == 0 and state["host_blocks_used"] == 0
