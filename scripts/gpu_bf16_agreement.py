"""How far SmolLM2's bfloat16 greedy output moves under changes that are not bugs (GPU).

The reference is the one test_gpu_exact.py uses: transformers, one prompt at a time, SDPA attention.
Against it: our engine (all 32 shared prompts in one batch, and one prompt at a time), transformers
with eager attention, transformers with the prompts left-padded into one batch, and float32. Agreement
is the share of the first 64 tokens equal position by position, as in the test.

    python3 scripts/gpu_bf16_agreement.py --out results/smollm2-bf16-agreement.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builders.sources import smollm2_path  # noqa: E402
from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import SHARED, build_entry, prompt_ids  # noqa: E402

N = 64


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    per = [sum(a == b for a, b in zip(g, r)) / max(len(g), len(r)) for g, r in zip(got, ref)]
    return {"mean_agreement": sum(per) / len(per), "identical": sum(g == r for g, r in zip(got, ref))}


def hf_greedy(model, prompts: list[list[int]], eos: list[int], batched: bool = False) -> list[list[int]]:
    pad = eos[0]
    with torch.inference_mode():
        if not batched:
            return [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=N, do_sample=False,
                                   eos_token_id=eos, pad_token_id=pad)[0, len(p):].tolist() for p in prompts]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=eos,
                             pad_token_id=pad)[:, width:].tolist()
    return [[t for t in row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]] for row in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    shared = [json.loads(x) for x in (SHARED / "data" / "prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = [prompt_ids(tok, p) for p in shared]
    params = SamplingParams(max_tokens=N, temperature=0.0)
    outputs: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        entry = build_entry(Path(tmp) / "repo", "smollm2", "smollm2", "--device", "gpu", "--dtype", "bfloat16")
        engine = Engine(entry / "1" / "engine", EngineConfig(device="cuda", num_kv_blocks=1024))
        eos = list(engine.eos_ids)
        outputs["engine_batch32"] = [r.token_ids for r in engine.generate(prompts, params)]
        outputs["engine_one_at_a_time"] = [engine.generate([p], params)[0].token_ids for p in prompts]
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16,
                                                     attn_implementation=attn).cuda().eval()
        outputs[f"hf_{attn}_batch1"] = hf_greedy(model, prompts, eos)
        if attn == "sdpa":
            outputs["hf_sdpa_batch32_left_padded"] = hf_greedy(model, prompts, eos, batched=True)
        del model
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).cuda().eval()
    outputs["hf_float32_batch1"] = hf_greedy(model, prompts, eos)
    ref = outputs["hf_sdpa_batch1"]
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "prompts": len(prompts), "tokens": N,
              "reference": "hf_sdpa_batch1 (bfloat16)",
              "against_reference": {k: agreement(v, ref) for k, v in outputs.items() if k != "hf_sdpa_batch1"},
              "engine_batch32_against_hf_eager": agreement(outputs["engine_batch32"], outputs["hf_eager_batch1"])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
