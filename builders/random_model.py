"""A random-initialised Hugging Face model folder from a real model's configuration.

Speed does not depend on weight values, so GPU benchmarks use these where the real weights cannot be
downloaded. The tokenizer comes from a local folder (ids it does not know decode to nothing).

    python builders/random_model.py --preset llama-3.2-1b --tokenizer TOKENIZER_DIR --out FOLDER
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Published configurations (Hugging Face model cards' config.json), weights left out.
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


def make(preset: str, tokenizer_dir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = LlamaConfig(**{**PRESETS[preset], **overrides})
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer files")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = make(args.preset, Path(args.tokenizer), Path(args.out), args.seed)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
