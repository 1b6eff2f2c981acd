"""Knowledge distillation: a student learns a teacher's next-token distributions on a text file.

    fastserve distill --teacher smollm2 --text corpus.txt --out students/half
    python -c "from builders.distill import DistillOptions, distill; distill(DistillOptions(...))"

The loss is L = α·CE(student, next token) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) (Hinton
et al., 2015): the T² keeps the soft term's gradients on the scale of the hard term's as T grows.
By default the student is the teacher with half its layers, initialised from an evenly spaced
subset of them (first and last included), as DistilBERT initialised from every other layer.

Training batches are a function of the seed and the step number alone, and the checkpoint holds
the student, the optimizer and the losses so far, so a run that stops and is started again with
the same options ends at the same loss as one that never stopped. The result is a Hugging Face
folder, which the builder takes like any other model. The same loop, without checkpoints and with
the pruning masks held, is the builder's recovery step after pruning.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

CHECKPOINT = "checkpoint"


class DistillError(ValueError):
    """The distillation asked for cannot run; the message says why."""


@dataclass
class TrainOptions:
    """How the student is trained; shared by distillation and the builder's recovery step."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    alpha: float = 0.5  # weight of the hard (next-token) loss; 1 − alpha on the teacher's soft targets
    temperature: float = 2.0
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class DistillOptions:
    teacher: str  # anything the builder takes: a folder, a GGUF file, 'smollm2'
    text: Path
    out: Path
    student_layers: int | None = None  # default: half the teacher's
    device: str = "cpu"
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class StepRecord:
    step: int
    loss: float
    hard: float
    soft: float
    tokens_per_s: float


def check_train(opts: TrainOptions, num_tokens: int) -> None:
    if opts.steps < 1 or opts.batch_size < 1 or opts.seq_len < 2:
        raise DistillError("steps, batch size and sequence length must be positive (sequence length at least 2)")
    if not 0.0 <= opts.alpha <= 1.0:
        raise DistillError(f"alpha {opts.alpha} is outside [0, 1]")
    if opts.temperature <= 0:
        raise DistillError(f"temperature {opts.temperature} must be positive")
    need = opts.batch_size * (opts.seq_len + 1)
    if num_tokens < need:
        raise DistillError(
            f"the text has {num_tokens} tokens, fewer than one batch needs "
            f"({opts.batch_size} × {opts.seq_len + 1} = {need}); give more text or a smaller batch"
        )


def layer_subset(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, the first and the last included."""
    if not 1 <= student_layers <= teacher_layers:
        raise DistillError(
            f"a student of {student_layers} layers: it needs at least 1 and no more than the teacher's "
            f"{teacher_layers} (a student larger than its teacher is not a compression)"
        )
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def make_student(teacher, layers: list[int]):
    """The teacher's architecture with only `layers`, initialised from them; embeddings, final norm
    and output head copied."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            if int(index) in layers:
                state[f"model.layers.{layers.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state)
    student.generation_config = teacher.generation_config
    return student


def batch_at(ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows of the text, chosen by (seed, step) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=g)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float, t: float
) -> tuple[torch.Tensor, float, float]:
    """(loss, hard, soft): α·CE + (1 − α)·T²·KL(teacher ‖ student) per token; without a teacher, CE."""
    vocab = student_logits.shape[-1]
    hard = F.cross_entropy(student_logits.reshape(-1, vocab).float(), labels.reshape(-1))
    if teacher_logits is None:
        return hard, hard.item(), 0.0
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / t, dim=-1)
    soft = F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t
    return alpha * hard + (1 - alpha) * soft, hard.item(), soft.item()


def _autocast(device: torch.device):
    """bfloat16 autocast where the device computes it natively (CUDA); full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _save_checkpoint(folder: Path, student, optimizer, step: int, history: list[StepRecord]) -> None:
    """Written beside and renamed into place, so a run killed mid-write leaves the previous one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict()}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "history": [asdict(h) for h in history]}))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train(
    student,
    teacher,
    ids: torch.Tensor,
    opts: TrainOptions,
    checkpoint: Path | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    progress: bool = True,
) -> list[StepRecord]:
    """Train `student` in place for opts.steps steps (from `checkpoint` where one exists); with a
    teacher, by distillation; with `masks` (parameter name → kept entries), pruned weights stay zero."""
    from tqdm.auto import tqdm

    check_train(opts, ids.numel())
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=0.0)
    params = dict(student.named_parameters())
    step, history = 0, []
    if checkpoint is not None and (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", map_location=device)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        saved = json.loads((checkpoint / "progress.json").read_text())
        step, history = saved["step"], [StepRecord(**h) for h in saved["history"]]
    student.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=opts.steps, initial=step, disable=not progress, desc="training", unit="step")
    try:
        while step < opts.steps:
            began = time.perf_counter()
            batch = batch_at(ids, step, opts.batch_size, opts.seq_len, opts.seed).to(device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            with _autocast(device):
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(inputs, use_cache=False).logits
                logits = student(inputs, use_cache=False).logits
                loss, hard, soft = distill_loss(logits, teacher_logits, labels, opts.alpha, opts.temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masks:
                with torch.no_grad():
                    for name, keep in masks.items():
                        params[name].mul_(keep)
            step += 1
            record = StepRecord(step, loss.item(), hard, soft, inputs.numel() / (time.perf_counter() - began))
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{record.tokens_per_s:.0f}")
            if checkpoint is not None and (step % opts.checkpoint_every == 0 or step == opts.steps):
                _save_checkpoint(checkpoint, student, optimizer, step, history)
            if on_step is not None:
                on_step(record)
    finally:
        bar.close()
        student.eval()
    return history


def text_ids(tokenizer, path: Path) -> torch.Tensor:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read the text file {path}: {e}") from e
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def distill(
    opts: DistillOptions, log: Callable[[str], None] = print, on_step: Callable[[StepRecord], None] | None = None
) -> Path:
    """Teacher → student folder in opts.out (checkpoints in opts.out/checkpoint, removed when done).
    Everything that can be refused is refused before the teacher's weights load."""
    from builders.sources import resolve

    if opts.device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise DistillError(f"--device {opts.device}: no CUDA device here; use --device cpu")
    source = resolve(opts.teacher)
    tokenizer = source.load_tokenizer()
    ids = text_ids(tokenizer, opts.text)
    check_train(opts.train, ids.numel())
    teacher_layers = source.num_layers()
    student_layers = opts.student_layers or max(1, teacher_layers // 2)
    layers = layer_subset(teacher_layers, student_layers)
    out = Path(opts.out)
    log(f"loading the teacher {source.description}")
    teacher, _ = source.load(torch.float32)
    device = torch.device("cuda" if opts.device in ("gpu", "cuda") else opts.device)
    teacher.to(device)
    student = make_student(teacher, layers).to(device)
    log(f"student: layers {layers} of the teacher's {teacher_layers}; {ids.numel()} tokens of text")
    out.mkdir(parents=True, exist_ok=True)
    history = train(student, teacher, ids, opts.train, checkpoint=out / CHECKPOINT, on_step=on_step)
    student.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "teacher": source.description,
        "layers": layers,
        "options": {**asdict(opts.train), "student_layers": student_layers},
        "text": {"path": str(opts.text), "tokens": ids.numel()},
        "first_loss": history[0].loss,
        "final_loss": history[-1].loss,
    }
    (out / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    log(f"done: loss {history[0].loss:.3f} -> {history[-1].loss:.3f}; the student is in {out}")
    return out


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student model from a teacher on a text file")
    p.add_argument("--teacher", required=True, help="HF model folder, GGUF file, hub id, or 'smollm2'")
    p.add_argument("--text", required=True, type=Path, help="training text (UTF-8)")
    p.add_argument("--out", required=True, type=Path, help="folder for the student (a Hugging Face folder)")
    p.add_argument("--student-layers", type=int, help="layers of the student (default: half the teacher's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    d = TrainOptions()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the hard next-token loss")
    p.add_argument("--temperature", type=float, default=d.temperature, help="softening of both distributions")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from builders.sources import SourceError

    train_opts = TrainOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        alpha=args.alpha,
        temperature=args.temperature,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    opts = DistillOptions(args.teacher, args.text, args.out, args.student_layers, args.device, train_opts)
    try:
        distill(opts)
    except (DistillError, SourceError) as e:
        print(f"distill failed: {e}", file=sys.stderr)
        return 2
    return 0
