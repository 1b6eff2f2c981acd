"""What the benchmarks share: synthetic prompts, percentiles, the machine's description, the engine's
settings for a run, and writing results."""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
from pathlib import Path


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "p50": q(50), "p90": q(90), "p99": q(99)}


def synthetic_prompts(tokenizer, vocab_size: int, num: int, input_len: int, input_len_max: int, seed: int) -> list[str]:
    """Random text: random non-special token ids decoded to text, so the engine offline and the server
    (which tokenizes text) see the same prompts. Lengths are uniform in [input_len, input_len_max]
    tokens before the round trip."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    usable = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    return [
        tokenizer.decode([rng.choice(usable) for _ in range(rng.randint(input_len, max(input_len, input_len_max)))])
        for _ in range(num)
    ]


def device_info(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if device in ("cuda", "gpu") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(result: dict, out: str) -> None:
    """Written after each system, so a run cut short keeps what it measured."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def entry_parameters(config_pbtxt: Path) -> dict[str, str]:
    """The engine parameters of a repository entry, so the offline engine runs as the server would."""
    pattern = re.compile(r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')
    return dict(pattern.findall(config_pbtxt.read_text()))


def engine_config(args: argparse.Namespace):
    """The engine's settings for a run: the entry's config.pbtxt with --repository, else the defaults;
    then whatever the command line sets."""
    from python_backend.engine.config import EngineConfig

    if args.repository:
        cfg = EngineConfig.from_parameters(entry_parameters(Path(args.repository) / args.model / "config.pbtxt"))
    else:
        cfg = EngineConfig(device=args.device)
    if args.device != "cpu" or cfg.device == "gpu":
        cfg.device = "cuda"
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "dtype"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.cuda_graphs = args.cuda_graphs
    return cfg


def engine_dir(args: argparse.Namespace) -> Path:
    if args.engine_dir:
        return Path(args.engine_dir)
    if args.repository:
        return Path(args.repository) / args.model / "1" / "engine"
    raise SystemExit("fastserve bench: give --engine-dir or --repository")
