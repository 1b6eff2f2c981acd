"""Decode steps replayed as CUDA graphs give the same tokens as the eager path and transformers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the GPU hosts: scripts/gpu_bench.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    from builders.build import main as build
    from builders.random_model import make

    tok = os.environ.get("FASTSERVE_TEST_TOKENIZER")
    if not tok:
        pytest.skip("set FASTSERVE_TEST_TOKENIZER to a folder with tokenizer files")
    tmp = tmp_path_factory.mktemp("graphs")
    make("llama-3.2-1b", Path(tok), tmp / "src", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
         num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=49152, tie_word_embeddings=False)
    assert build(["--model", str(tmp / "src"), "--name", "m", "--repository", str(tmp / "repo"), "--device", "gpu",
                  "--dtype", "float32", "--max-model-len", "1024"]) == 0
    return tmp / "repo" / "m" / "1" / "engine"


def test_graphs_match_eager_and_transformers(engine_dir):
    from transformers import AutoModelForCausalLM

    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams

    prompts = [[(7 * i + j) % 40000 + 100 for j in range(5 + 11 * i)] for i in range(13)]  # 13: padded to 16
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    graphed = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128))
    eager = Engine(engine_dir, EngineConfig(device="cuda", num_kv_blocks=128, cuda_graphs=False))
    with_graphs = [r.token_ids for r in graphed.generate(prompts, params)]
    assert graphed.runner.graphs.graphs, "no decode step went through a graph"
    assert with_graphs == [r.token_ids for r in eager.generate(prompts, params)]
    hf = AutoModelForCausalLM.from_pretrained(engine_dir, dtype=torch.float32).cuda().eval()
    for ids, got in zip(prompts[:4], with_graphs):
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert got == ref[0, len(ids):].tolist()
    assert graphed.blocks.num_used == 0
