"""Token selection on the logits' device: greedy, temperature, top-k, top-p, min-p, repetition /
presence / frequency penalties and min_tokens, with one torch.Generator per seeded request so that a
seeded request draws the same tokens whatever else shares its batch.

An all-greedy batch (the common serving case) is one argmax: no sort, no softmax.
"""

from __future__ import annotations

import torch

from python_backend.engine.sequence import Sequence


def _penalize(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """In place: repetition penalty over prompt and output tokens (as transformers applies it),
    presence and frequency penalties over output tokens (as OpenAI defines them)."""
    device = logits.device
    for row in rows:
        seq, p = seqs[row], seqs[row].params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.all_ids)), device=device, dtype=torch.long)
            vals = logits[row, ids]
            logits[row, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            out = torch.tensor(seq.output_ids, device=device, dtype=torch.long)
            counts = torch.zeros(logits.shape[1], device=device, dtype=logits.dtype).scatter_add_(
                0, out, torch.ones_like(out, dtype=logits.dtype)
            )
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row of temperature-scaled logits with the filtered-out tokens at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first highest-scoring token of each row, on the logits' device."""
    if logits.is_cuda:
        from python_backend.ops.argmax import argmax_rows

        return argmax_rows(logits)
    return logits.max(-1).indices  # max is several times faster than argmax on CPU; same first index


@torch.inference_mode()
def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int], default_generator: torch.Generator | None = None
) -> tuple[list[int], list[float] | None]:
    """logits [B, V] float32, one row per sequence -> the chosen token ids, and their log-probabilities
    when any sequence asked for them (None otherwise)."""
    want_logprobs = any(s.params.logprobs for s in seqs)
    adjust = [
        i
        for i, s in enumerate(seqs)
        if s.params.uses_penalties
        or (s.params.min_tokens and len(s.output_ids) < s.params.min_tokens and not s.params.ignore_eos)
    ]
    if adjust:
        logits = logits.clone()
        _penalize(logits, seqs, [i for i in adjust if seqs[i].params.uses_penalties])
        for i in adjust:
            s = seqs[i]
            if s.params.min_tokens and len(s.output_ids) < s.params.min_tokens and eos_ids:
                logits[i, eos_ids] = float("-inf")
    chosen = greedy(logits)
    if all(s.params.greedy for s in seqs):
        final = logits
    else:
        final = logits.clone() if want_logprobs else logits
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            final[i] = row
            probs = row.softmax(-1)
            gen = s.generator if s.generator is not None else default_generator
            chosen[i] = torch.multinomial(probs, 1, generator=gen)[0]
    ids = chosen.tolist()
    if not want_logprobs:
        return ids, None
    lp = torch.log_softmax(final, dim=-1).gather(1, chosen[:, None])[:, 0]
    return ids, lp.tolist()
