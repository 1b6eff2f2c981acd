"""On a GPU: sequences preempted by the MLFQ, swapped to pinned host memory on the side stream and
swapped back, give token for token the output they give uninterrupted."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the GPU hosts: scripts/gpu_bench.sh)", allow_module_level=True)

from python_backend.engine.engine import Engine, EngineConfig, Result  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    from builders.build import main as build
    from builders.random_model import make

    tok = os.environ.get("FASTSERVE_TEST_TOKENIZER")
    if not tok:
        pytest.skip("set FASTSERVE_TEST_TOKENIZER to a folder with tokenizer files")
    tmp = tmp_path_factory.mktemp("mlfq-gpu")
    make("llama-3.2-1b", Path(tok), tmp / "src", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
         num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=49152, tie_word_embeddings=False)
    assert build(["--model", str(tmp / "src"), "--name", "m", "--repository", str(tmp / "repo"), "--device", "gpu",
                  "--dtype", "float32", "--max-model-len", "1024"]) == 0
    return tmp / "repo" / "m" / "1" / "engine"


@pytest.mark.parametrize("swap_space_gb,expect", [(1.0, "swap"), (1e-9, "recompute")])
def test_swapped_sequences_resume_token_for_token_on_gpu(engine_dir, swap_space_gb, expect):
    prompts = [[(13 * i + j) % 40000 + 100 for j in range(20 + 9 * i)] for i in range(12)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=256)).generate(
        prompts, params)]
    engine = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=24, policy="mlfq", max_num_seqs=4,
                                             swap_space_gb=swap_space_gb, mlfq_base_quantum_s=0.002))
    results = [Result() for _ in prompts]
    pending, step = list(enumerate(prompts)), 0
    while pending or engine.has_work():
        if step % 3 == 0 and pending:
            i, ids = pending.pop(0)
            engine.add_request(f"r{i}", ids, params, results[i].collect)
        engine.step()
        step += 1
    state = engine.scheduler.state()
    if expect == "swap":
        assert state["swap_outs"] > 0 and state["swap_ins"] > 0, state
    else:
        assert state["recomputes"] > 0, state
    assert [r.token_ids for r in results] == want
    assert engine.blocks.num_used == 0 and state["host_blocks_used"] == 0
