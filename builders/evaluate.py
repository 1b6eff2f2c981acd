"""`fastserve evaluate`: what a build costs in quality and buys in size and speed.

    fastserve evaluate model_repository/smollm2-int4 --against model_repository/smollm2 --json

- perplexity on the evaluation text (builders/text.py), in windows that each start a fresh context;
- with --against: the reference's perplexity on the same text, and teacher-forced greedy agreement:
  the reference generates greedily from prompts cut from the evaluation text, and at each of those
  positions the candidate, fed the reference's own prefix, picks its greedy token; agreement is the
  share of positions where the two choose the same one;
- size: the weights on disk and in memory;
- speed through the engine API: one stream (64 prompt tokens -> 128 new tokens) and a batch
  (32 x 64 -> 64), EOS ignored.

Everything runs through our engine (Engine.prompt_logits, Engine.generate): the quantized kernels
that serve are the ones measured.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class EvalOptions:
    eval_tokens: int = 8192
    window: int = 512
    agreement_prompts: int = 16
    prompt_len: int = 64
    generate_len: int = 64
    speed: bool = True
    device: str | None = None
    num_threads: int = 0
    kv_blocks: int = 1024
    kv_cache_dtype: str = "auto"
    runner: str = "auto"


@dataclass
class Evaluation:
    """One build's figures (and its reference's, with --against)."""

    engine: str
    quantization: str
    dtype: str
    device: str
    kv_cache_dtype: str
    runner: str
    perplexity: float
    eval_tokens: int
    text: dict
    weights_bytes_on_disk: int
    weights_bytes_in_memory: int
    single_stream_tok_s: float | None = None
    batch_tok_s: float | None = None
    against: str | None = None
    reference_perplexity: float | None = None
    perplexity_ratio: float | None = None
    agreement: float | None = None
    agreement_positions: int | None = None
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def engine_dir(path: str | Path) -> Path:
    """A repository entry (with config.pbtxt), its version folder, or an engine folder itself."""
    p = Path(path)
    for candidate in (p, p / "engine", p / "1" / "engine"):
        if (candidate / "engine.json").is_file():
            return candidate
    raise FileNotFoundError(f"{p}: neither an engine folder nor a repository entry with one (1/engine/engine.json)")


def _open(path: Path, opts: EvalOptions):
    from python_backend.engine.engine import Engine

    # a fixed KV pool: enough for the batch speed test, and room for a reference beside the candidate
    overrides = {"num_kv_blocks": opts.kv_blocks, "enable_prefix_caching": False, "kv_cache_dtype": opts.kv_cache_dtype}
    overrides["runner"] = opts.runner
    if opts.device:
        overrides["device"] = opts.device
    if opts.num_threads:
        overrides["num_threads"] = opts.num_threads
    return Engine.from_folder(path, **overrides)


def perplexity(engine, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = engine.prompt_logits(chunk)
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def agreement_prompts(ids: list[int], opts: EvalOptions) -> list[list[int]]:
    """Prompts cut from the evaluation text at evenly spaced places."""
    step = max(opts.prompt_len, len(ids) // max(1, opts.agreement_prompts))
    return [ids[i : i + opts.prompt_len] for i in range(0, len(ids) - opts.prompt_len + 1, step)][
        : opts.agreement_prompts
    ]


def teacher_forced_agreement(candidate, reference, prompts: list[list[int]], generate_len: int) -> tuple[float, int]:
    from python_backend.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=generate_len, temperature=0.0, ignore_eos=True)
    results = reference.generate(prompts, params)
    same = total = 0
    for prompt, result in zip(prompts, results):
        made = list(result.token_ids)
        logits = candidate.prompt_logits(prompt + made[:-1])
        choice = logits[len(prompt) - 1 :].argmax(-1).tolist()
        same += sum(int(a == b) for a, b in zip(choice, made))
        total += len(made)
    return same / total, total


def _weight_files(folder: Path, runner: str) -> list[Path]:
    """The files a runner loads its weights from: safetensors, or the exported graph it runs."""
    graph = json.loads((folder / "engine.json").read_text()).get("graph") or {}
    if runner == "tensorrt":
        return [folder / graph["tensorrt"]]
    if runner == "onnxruntime":
        return sorted(folder.glob(graph["onnx"] + "*"))  # the graph and its external data
    return sorted(folder.glob("*.safetensors"))


def speed(engine) -> tuple[float, float]:
    """Tokens/s: one stream 64 -> 128 (best of 3), and 32 x 64 -> 64 (median of 3), EOS ignored."""
    from python_backend.engine.sequence import SamplingParams

    rng = random.Random(7)
    vocab = engine.folder.hf_config["vocab_size"]
    prompts = [[rng.randrange(min(1000, vocab // 2), vocab - 1) for _ in range(64)] for _ in range(32)]
    single_params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0]], single_params)
    single = []
    for i in range(3):
        start = time.perf_counter()
        engine.generate([[prompts[0][0] + i + 1] + prompts[0][1:]], single_params)
        single.append(128 / (time.perf_counter() - start))
    batch_params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:4], batch_params)
    batch = []
    for i in range(3):
        varied = [[p[0] + i + 1] + p[1:] for p in prompts]
        start = time.perf_counter()
        engine.generate(varied, batch_params)
        batch.append(32 * 64 / (time.perf_counter() - start))
    return max(single), sorted(batch)[1]


@dataclass
class Reference:
    """A reference build, loaded once and measured once for every candidate compared with it."""

    folder: Path
    engine: object
    perplexity: float


def load_reference(path: str | Path, ids: list[int], opts: EvalOptions) -> Reference:
    folder = engine_dir(path)
    engine = _open(folder, opts)
    return Reference(folder, engine, perplexity(engine, ids, opts.window))


def evaluation_ids(path: str | Path, num_tokens: int) -> tuple[list[int], dict]:
    """The evaluation text's ids under a build's tokenizer, and their record."""
    from transformers import AutoTokenizer

    from builders.text import token_ids

    return token_ids(AutoTokenizer.from_pretrained(str(engine_dir(path))), "evaluation", num_tokens)


def evaluate(
    path: str | Path, against: str | Path | Reference | None = None, opts: EvalOptions | None = None
) -> Evaluation:
    opts = opts or EvalOptions()
    folder = engine_dir(path)
    ids, text = evaluation_ids(folder, opts.eval_tokens)
    engine = _open(folder, opts)
    meta = engine.folder.meta
    q = meta.get("quantization") or {}
    runner = engine.folder.runner(opts.runner)
    on_disk = sum(f.stat().st_size for f in _weight_files(folder, runner))
    result = Evaluation(
        engine=str(folder),
        quantization=q.get("method", "none") + ("-gguf" if q.get("source") == "gguf" else ""),
        dtype=str(engine.dtype).replace("torch.", ""),
        device=str(engine.device),
        kv_cache_dtype=opts.kv_cache_dtype,
        runner=runner,
        perplexity=perplexity(engine, ids, opts.window),
        eval_tokens=len(ids),
        text=text,
        weights_bytes_on_disk=on_disk,
        weights_bytes_in_memory=engine.model.num_bytes if engine.model is not None else on_disk,
    )
    if against is not None:
        ref_opts = EvalOptions(**{**asdict(opts), "kv_cache_dtype": "auto", "runner": "auto"})  # as built
        ref = against if isinstance(against, Reference) else load_reference(against, ids, ref_opts)
        result.against = str(ref.folder)
        result.reference_perplexity = ref.perplexity
        result.perplexity_ratio = result.perplexity / ref.perplexity
        result.agreement, result.agreement_positions = teacher_forced_agreement(
            engine, ref.engine, agreement_prompts(ids, opts), opts.generate_len
        )
    if opts.speed:
        result.single_stream_tok_s, result.batch_tok_s = speed(engine)
    return result


def evaluate_into_meta(folder: Path, device: str, opts: EvalOptions | None = None) -> Evaluation:
    """The builder's --evaluate: the result stored in engine.json under "evaluation"."""
    opts = opts or EvalOptions(device=device)
    result = evaluate(folder, opts=opts)
    meta_path = folder / "engine.json"
    meta = json.loads(meta_path.read_text())
    meta["evaluation"] = asdict(result)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, prefix=".engine.json.") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    Path(f.name).chmod(0o644)
    Path(f.name).replace(meta_path)
    return result


def format_table(results: list[Evaluation]) -> str:
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| build | KV | perplexity | vs reference | agreement | weights on disk | in memory | 1 stream tok/s | "
        "32 x 64 tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        lines.append(
            f"| {r.quantization}{'' if r.runner == 'pytorch' else f' ({r.runner})'} | "
            f"{r.kv_cache_dtype} | {r.perplexity:.3f} | {num(r.perplexity_ratio, '.4f')} | "
            f"{agree} | "
            f"{r.weights_bytes_on_disk / 1e6:.1f} MB | {r.weights_bytes_in_memory / 1e6:.1f} MB | "
            f"{num(r.single_stream_tok_s, '.1f')} | {num(r.batch_tok_s, '.1f')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opts = EvalOptions(
        eval_tokens=args.eval_tokens,
        window=args.window,
        agreement_prompts=args.agreement_prompts,
        speed=args.speed,
        device=args.device,
        num_threads=args.threads,
        kv_cache_dtype=args.kv_cache_dtype,
        runner=args.runner,
    )
    try:
        against = None
        if args.against:
            ref_opts = EvalOptions(**{**asdict(opts), "kv_cache_dtype": "auto", "runner": "auto"})
            against = load_reference(args.against, evaluation_ids(args.against, opts.eval_tokens)[0], ref_opts)
        results = [evaluate(target, against, opts) for target in args.targets]
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"evaluate failed: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="perplexity, agreement with a reference build, size and speed of builds")
    p.add_argument("targets", nargs="+", metavar="ENTRY_OR_FOLDER", help="repository entries or engine folders")
    p.add_argument("--against", default=None, help="the reference build (teacher-forced agreement, perplexity ratio)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--eval-tokens", type=int, default=EvalOptions.eval_tokens)
    p.add_argument("--window", type=int, default=EvalOptions.window, help="tokens per perplexity window")
    p.add_argument("--agreement-prompts", type=int, default=EvalOptions.agreement_prompts)
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="measure tokens/s")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the build runs)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8"), help="the candidates' KV cache storage"
    )
    from python_backend.engine.config import settings

    runner = next(s for s in settings() if s.name == "runner")
    p.add_argument("--runner", default=runner.default, choices=runner.choices, help=runner.help)
    p.set_defaults(func=run)
