"""On a GPU, with the Triton kernels and CUDA graphs: SmolLM2's greedy output on the project's prompts
equals transformers' in float32, and agrees on at least 95% of the first 64 tokens in bfloat16."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the GPU hosts: scripts/gpu_bench.sh)", allow_module_level=True)

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import build_entry, prompt_ids  # noqa: E402

N = 64


def _hf_greedy(model, ids: list[int], eos: list[int]) -> list[int]:
    """Stopping on the engine's own EOS set: which tokens a GGUF tokenizer calls EOS varies between
    transformers versions, and a different stop set is not a different model."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device="cuda"),
            max_new_tokens=N,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0] if eos else 0,
        )
    return out[0, len(ids) :].tolist()


def _agreement(got: list[int], ref: list[int]) -> float:
    return sum(a == b for a, b in zip(got, ref)) / max(len(ref), len(got))


def _margin(model, ids: list[int]) -> float:
    """transformers' gap between its two best next-token logits after `ids` (float32)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_greedy_matches_transformers(dtype, tmp_path, smollm2_source, prompt_set):
    source, tok = smollm2_source
    entry = build_entry(tmp_path / "repo", "smollm2", "smollm2", "--device", "gpu", "--dtype", dtype)
    engine = Engine(entry / "1" / "engine", EngineConfig(device="cuda", num_kv_blocks=1024))
    assert engine.model.kernels and engine.runner.graphs is not None
    prompts = [prompt_ids(tok, p) for p in prompt_set]
    results = engine.generate(prompts, SamplingParams(max_tokens=N, temperature=0.0))
    assert engine.runner.graphs.graphs, "no decode step went through a CUDA graph"
    assert engine.blocks.num_used == 0
    eos = list(engine.eos_ids)
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    hf = source.to(device="cuda", dtype=getattr(torch, dtype)).eval()
    try:
        refs = [_hf_greedy(hf, ids, eos) for ids in prompts]
        report = []
        for p, ids, r, ref in zip(prompt_set, prompts, results, refs):
            first = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), None)
            if first is None and len(r.token_ids) != len(ref):
                first = min(len(r.token_ids), len(ref))
            report.append(
                {
                    "id": p["id"],
                    "agreement": _agreement(r.token_ids, ref),
                    "first_difference": first,
                    "hf_top2_margin_there": None if first is None else _margin(hf, ids + ref[:first]),
                }
            )
    finally:
        source.to(device="cpu", dtype=torch.float32)
    mean = sum(x["agreement"] for x in report) / len(report)
    differing = [x for x in report if x["first_difference"] is not None]
    if os.environ.get("FASTSERVE_RESULTS"):
        out = Path(os.environ["FASTSERVE_RESULTS"]) / f"gpu-exact-{dtype}.json"
        out.write_text(
            json.dumps(
                {
                    "gpu": torch.cuda.get_device_name(0),
                    "dtype": dtype,
                    "prompts": len(prompts),
                    "tokens": N,
                    "eos_token_ids": eos,
                    "tokenizer_eos": tok.eos_token_id,
                    "mean_agreement": mean,
                    "identical": len(report) - len(differing),
                    "differing": differing,
                },
                indent=2,
            )
            + "\n"
        )
    if dtype == "float32":
        assert not differing, f"differs from transformers: {differing}"
    else:
        assert mean >= 0.95, f"bfloat16 agreement {mean:.3f} over the first {N} tokens"
