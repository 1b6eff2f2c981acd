"""The engine's greedy output equals transformers' token for token, under staggered arrivals and
KV-memory pressure that forces preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from python_backend.engine.engine import Engine, EngineConfig
from python_backend.engine.sequence import SamplingParams
from tests.conftest import build_entry, prompt_ids, run_staggered, save_tiny_model


def hf_greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
    return out[0, len(ids) :].tolist()


def test_smollm2_matches_transformers_under_preemption(smollm2_engine_dir, smollm2_source, prompt_set):
    source, tok = smollm2_source
    prompts = [prompt_ids(tok, p) for p in prompt_set]
    # 40 blocks of 16 tokens cannot hold 32 sequences of up to ~130 tokens: preemption must happen
    engine = Engine(smollm2_engine_dir, EngineConfig(num_kv_blocks=40, max_num_batched_tokens=256, max_num_seqs=32))
    results = run_staggered(engine, prompts, SamplingParams(max_tokens=64, temperature=0.0), every=2, per_step=3)
    assert engine.scheduler.num_preemptions > 0, "the test meant to exercise preemption"
    assert engine.blocks.num_used == 0
    mismatches = []
    for p, ids, r in zip(prompt_set, prompts, results):
        ref = hf_greedy(source, ids, 64, tok.eos_token_id)
        if r.token_ids != ref:
            mismatches.append((p["id"], r.token_ids, ref))
        assert r.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
    assert not mismatches, mismatches[:2]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "llama"])
def test_tiny_architectures_match_transformers(tmp_path, arch, smollm2_source, prompt_set):
    _, tok = smollm2_source
    folder = save_tiny_model(tmp_path / arch, arch, tok, seed=1)
    entry = build_entry(tmp_path / "repo", str(folder), arch)
    engine = Engine(entry / "1" / "engine", EngineConfig(num_kv_blocks=24, max_num_batched_tokens=128))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [prompt_ids(tok, p) for p in prompt_set[::3]]
    results = run_staggered(
        engine, prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), every=2, per_step=3
    )
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(hf, ids, 32, None)
    assert engine.blocks.num_used == 0
