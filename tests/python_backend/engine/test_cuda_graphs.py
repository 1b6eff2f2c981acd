"""Decode steps replayed as CUDA graphs give the same tokens as the eager path and transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the GPU hosts: scripts/gpu_bench.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def engine_dir(small_gpu_engine_dir) -> Path:
    return small_gpu_engine_dir


def test_graphs_match_eager_and_transformers(engine_dir):
    from transformers import AutoModelForCausalLM

    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams

    prompts = [[(7 * i + j) % 40000 + 100 for j in range(5 + 11 * i)] for i in range(13)]  # 13: padded to 16
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    graphed = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128))
    eager = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128, cuda_graphs=False))
    captured = dict(graphed.runner.graphs.graphs)
    assert captured, "no decode graph was captured at start-up"
    with_graphs = [r.token_ids for r in graphed.generate(prompts, params)]
    assert graphed.runner.graphs.graphs == captured, "serving met a decode shape not captured at start-up"
    assert with_graphs == [r.token_ids for r in eager.generate(prompts, params)]
    hf = AutoModelForCausalLM.from_pretrained(engine_dir, dtype=torch.float32).cuda().eval()
    for ids, got in zip(prompts[:4], with_graphs):
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert got == ref[0, len(ids) :].tolist()
    assert graphed.blocks.num_used == 0


def test_graph_steps_run_ahead_give_the_same_tokens(engine_dir):
    """The default on the GPU: the next graph replay is launched with this step's tokens on the device."""
    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams

    prompts = [[(5 * i + j) % 40000 + 100 for j in range(3 + 9 * i)] for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 7 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    ahead = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128))
    plain = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128, run_ahead="off"))
    assert ahead.run_ahead and not plain.run_ahead
    got = [r.token_ids for r in ahead.generate(prompts, params)]
    assert got == [r.token_ids for r in plain.generate(prompts, params)]
    assert [len(t) for t in got] == [8 + 7 * i for i in range(6)]
    assert ahead.stats.steps_ahead > 20 and plain.stats.steps_ahead == 0
    single = ahead.generate([prompts[2]], [SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)])[0]
    assert (
        single.token_ids
        == plain.generate([prompts[2]], [SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)])[0].token_ids
    )
    assert ahead.blocks.num_used == 0


def test_programmatic_dependent_launch_gives_the_same_tokens(engine_dir, monkeypatch):
    """Kernels that start before the one ahead has finished (pdl.py, opt-in) must not read its output
    early: graphed greedy tokens with PDL on and off are the same, bit for bit."""
    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams
    from python_backend.ops import pdl

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9 or later")
    prompts = [[(3 * i + j) % 40000 + 100 for j in range(4 + 13 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    monkeypatch.setenv("FASTSERVE_PDL", "1")
    assert pdl.enabled(torch.device("cuda"))
    on = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128))
    with_pdl = [r.token_ids for r in on.generate(prompts, params)] + [on.generate([prompts[1]], params)[0].token_ids]
    monkeypatch.setenv("FASTSERVE_PDL", "0")
    assert not pdl.enabled(torch.device("cuda"))
    off = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128))
    without = [r.token_ids for r in off.generate(prompts, params)] + [off.generate([prompts[1]], params)[0].token_ids]
    assert with_pdl == without


def test_from_folder_runs_a_gpu_entry_on_the_gpu_unless_told(engine_dir):
    from python_backend.engine.engine import Engine
    from python_backend.engine.sequence import SamplingParams

    on_gpu = Engine.from_folder(engine_dir, num_kv_blocks=64, capture_graphs_at_start=False)
    assert on_gpu.device.type == "cuda"
    on_cpu = Engine.from_folder(engine_dir, device="cpu", num_kv_blocks=64)
    assert on_cpu.device.type == "cpu"
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = [[101, 102, 103, 104, 105]]
    assert on_gpu.generate(prompt, params)[0].token_ids == on_cpu.generate(prompt, params)[0].token_ids
