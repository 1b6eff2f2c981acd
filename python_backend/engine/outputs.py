"""From sampled tokens to what a client receives: finish reasons, text deltas, stop strings.

The core records each new token at once (`append`), so a sequence that made EOS or reached its
length never takes a place in the next batch. Text waits for `flush`, which the core calls while the
GPU computes the next step: detokenizing is host work that would otherwise sit between two steps. A
stop string is therefore found one step late; the token made meanwhile for that sequence is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from python_backend.engine import detokenize
from python_backend.engine.sequence import RequestOutput, Sequence


@dataclass
class EngineStats:
    steps: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens were read
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class NewToken:
    """A token recorded by `append`, waiting for `flush` to turn it into text."""

    seq: Sequence
    token: int
    logprob: float | None
    reason: str | None  # the finish reason this token caused at once (EOS, length), if any


class OutputProcessor:
    """Finish reasons, detokenization and stop strings, and handing outputs to each request's callback.

    `end(seq, reason)` is the core's: it frees the sequence's place and blocks."""

    def __init__(
        self,
        tokenizer,
        eos_ids: list[int],
        max_model_len: int,
        stats: EngineStats,
        end: Callable[[Sequence, str], None],
    ):
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.stats = stats
        self._end = end
        self._decode = detokenize.decoder(tokenizer)
        self._unsent: list[NewToken] = []
        self.callback_errors = 0
        self.on_callback_error: Callable[[Sequence, BaseException], None] | None = None

    @property
    def pending(self) -> bool:
        return bool(self._unsent)

    def start(self, seq: Sequence) -> None:
        seq.detok = detokenize.new_state(seq.prompt_ids)

    def append(self, seq: Sequence, token: int, logprob: float | None, now: float) -> None:
        """Record a new token; end the sequence now if it made EOS or reached its length."""
        params = seq.params
        seq.output_ids.append(token)
        self.stats.generation_tokens += 1
        if logprob is not None and params.logprobs:
            seq.logprobs.append(logprob)
        if seq.timing.first_token is None:
            seq.timing.first_token = now
        seq.timing.token_times.append(now)
        n_out = len(seq.output_ids)
        reason = None
        if token in self.eos_ids and not params.ignore_eos and n_out > params.min_tokens - 1:
            reason = "stop"
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._end(seq, reason)
        self._unsent.append(NewToken(seq, token, logprob, reason))

    def flush(self) -> bool:
        """Detokenize and send the tokens recorded since the last flush; True if there were any."""
        unsent, self._unsent = self._unsent, []
        for item in unsent:
            seq, token, reason = item.seq, item.token, item.reason
            if seq.finished and reason is None:
                continue  # ended since (cancelled, or a stop string in an earlier token)
            params = seq.params
            if reason != "stop" or token not in self.eos_ids:
                detokenize.add_token(self._decode, seq.detok, token)
            if reason != "stop" and len(seq.output_ids) >= params.min_tokens:
                stop_at = detokenize.find_stop(seq.detok, params.stop)
                if stop_at is not None:
                    seq.detok.text = seq.detok.text[:stop_at]
                    if reason is None:
                        self._end(seq, "stop")
                    else:  # the stop string came with the last allowed token: it is a stop
                        self.stats.finished[reason] -= 1
                        self.stats.finished["stop"] = self.stats.finished.get("stop", 0) + 1
                        seq.finish_reason = "stop"
                    reason = "stop"
            if reason is not None:
                self.send_final(seq)
                continue
            seq.num_sent_tokens += 1
            if seq.on_output is None:
                if params.stop:  # moves the sent mark, so the next stop search reads only new text
                    detokenize.take_delta(seq.detok, params.stop, final=False)
                continue
            delta = detokenize.take_delta(seq.detok, params.stop, final=False)
            logprobs = [item.logprob] if params.logprobs and item.logprob is not None else None
            out = RequestOutput(
                seq.request_id,
                delta,
                [token],
                False,
                None,
                len(seq.prompt_ids),
                len(seq.output_ids),
                seq.num_cached_tokens,
                logprobs,
            )
            self.emit(seq, out)
        return bool(unsent)

    def send_final(self, seq: Sequence) -> None:
        reason = seq.finish_reason
        delta = detokenize.take_delta(seq.detok, seq.params.stop, final=True) if seq.detok is not None else ""
        last = [seq.output_ids[-1]] if seq.output_ids and reason != "cancelled" else []
        seq.num_sent_tokens += len(last)
        seq.done = True
        logprobs = seq.logprobs[-1:] if seq.params.logprobs else None
        out = RequestOutput(
            seq.request_id,
            delta,
            last,
            True,
            reason,
            len(seq.prompt_ids),
            len(seq.output_ids),
            seq.num_cached_tokens,
            logprobs,
            seq.error,
        )
        self.emit(seq, out)

    def emit(self, seq: Sequence, out: RequestOutput) -> None:
        if seq.on_output is None:
            return
        try:
            seq.on_output(out)
        except Exception as e:  # a broken callback must not take the engine down
            self.callback_errors += 1
            if self.on_callback_error is not None:
                self.on_callback_error(seq, e)
            if not out.finished:
                seq.error = f"the output callback failed: {type(e).__name__}: {e}"
                self._end(seq, "error")
                self.send_final(seq)
