"""Output processing: one row's logits in, its next token, text delta and finish out.

vLLM v1 calls this the output processor: the sampler call, the incremental detokenizer and the
stop checker, per request. Here they are three small pieces, each testable alone:

- `Detokenizer`: token ids -> complete characters (tokenizers' DecodeStream; never a split
  character; a whole-row decode where DecodeStream gives up);
- `StopText`: the text so far, cut before the first stop string, with the end that could still
  grow into one held back from the deltas;
- `Sequence`: one row's state and its step (sampling with the row's own seeded generator,
  repetition penalty, logprob, explain-mode candidates), built on the two above.

Every driver of the step calls `Sequence.accept`: the engine (engine.py, over KV slots), the
static batches and the hand-driven StepGenerator (batch.py, over a PaddedBatch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from gpt2_onnx.runtime.results import Candidate, StepRecord, TokenEvent
from gpt2_onnx.runtime.sampling import log_softmax, sample_token, top_logprobs

if TYPE_CHECKING:
    from gpt2_onnx.runtime.manifest import ModelDims
    from gpt2_onnx.runtime.sampling import SamplingSettings


class RowParams(Protocol):
    """What the output step reads of a request's settings (engine.GenerationParams is one)."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def sampling(self) -> SamplingSettings: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def top_n(self) -> int: ...


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] (logits: float [vocab]); exp in the logits' precision, the
    sum in float64 (4x cheaper than all-float64, same value to ~1e-7)."""
    top = logits.max()
    total = np.exp(logits - top).sum(dtype=np.float64)
    return float(logits[token] - top) - math.log(float(total))


class Detokenizer:
    """Token ids -> text, one token at a time, never splitting a character.

    `text` is everything decoded so far (special tokens skipped). DecodeStream does the work;
    where it raises (its InvalidPrefix on some byte sequences) this row falls back to decoding
    the whole row each step, handing out only the complete characters that were added.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)

    def step(self, ids: list[int]) -> str:
        """The new complete characters after ids[-1] ("" while a character is incomplete)."""
        piece = self._next_piece(ids)
        if piece:
            self.text += piece
        return piece or ""

    def flush(self, ids: list[int]) -> str:
        """At the finish: bytes DecodeStream still holds (an incomplete character at the end,
        or after an invalid sequence), as the full decode shows them ("" when none)."""
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if full != self.text and full.startswith(self.text):
            rest, self.text = full[len(self.text):], full
            return rest
        return ""

    def _next_piece(self, ids: list[int]) -> str | None:
        if self._stream is not None:
            try:
                return self._stream.step(self.tokenizer, ids[-1])
            except Exception:  # noqa: BLE001 - DecodeStream's InvalidPrefix: decode whole rows
                self._stream = None  # from now on, for this row only
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return None
        return full[len(self.text):]


class StopText:
    """The stop checker: a completion's text as it grows, cut before the first stop string.

        s = StopText(("\\n\\n",))
        s.append("Hi\\n")         # s.stopped False; s.delta(finished=False) == "Hi" ("\\n" held)
        s.append("\\nmore")       # s.stopped True; s.text == "Hi"; s.delta(...) == ""

    A match may start in text appended earlier (a stop string split across tokens). While not
    finished, `delta` holds back the end of the text that could still grow into a stop string;
    once finished it hands out the rest.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.raw = ""  # everything appended (not cut at a stop)
        self.stop_at: int | None = None  # where the first stop string starts in `raw`
        self._emitted = 0  # characters of the text already handed out by `delta`
        self._max_stop = max((len(s) for s in stops), default=0)

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def text(self) -> str:
        """The text so far, cut before a stop string."""
        return self.raw if self.stop_at is None else self.raw[:self.stop_at]

    def append(self, piece: str) -> None:
        """Add text; look for a stop string among the text that changed."""
        if not piece:
            return
        before = len(self.raw)
        self.raw += piece
        if not self._max_stop:
            return
        start = max(0, before - self._max_stop + 1)
        for s in self.stops:
            at = self.raw.find(s, start)
            if at >= 0 and (self.stop_at is None or at < self.stop_at):
                self.stop_at = at

    def delta(self, finished: bool) -> str:
        """Text not handed out before; while not `finished`, minus a possible stop's start."""
        text = self.text
        end = len(text)
        if not finished:
            end -= stop_prefix_hold(text, self.stops)
        if end <= self._emitted:
            return ""
        out = text[self._emitted:end]
        self._emitted = end
        return out


def stop_prefix_hold(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Sequence:
    """One row's generation state and its step: logits in, one token (and its event) out.

    Owns the random generator (seeded like a lone run), the ids, the detokenizer and the stop
    checker. Not thread-safe: one driver (the engine's thread, a static batch, a StepGenerator)
    calls `accept`.
    """

    def __init__(self, tokenizer: Tokenizer, dims: ModelDims, prompt_ids: list[int],
                 params: RowParams) -> None:
        self.tokenizer = tokenizer
        self.dims = dims
        self.params = params
        self.prompt_ids = prompt_ids
        self.feed = list(prompt_ids) or [dims.bos_token_id]  # an empty prompt starts at EOS
        self.rng = np.random.default_rng(params.seed)
        self.ids: list[int] = []
        self.seen = list(self.feed) if params.sampling.repetition_penalty != 1.0 else []
        self.steps: list[StepRecord] = []
        self.finish_reason: str | None = None
        self._detok = Detokenizer(tokenizer)
        self._stops = StopText(params.stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> TokenEvent:
        """Choose the next token from this row's logits [vocab]; update text and finish."""
        params = self.params
        seen = np.asarray(self.seen, dtype=np.int64) if self.seen else None
        token = sample_token(logits, params.sampling, self.rng, seen)
        top: list[Candidate] = []
        if params.top_n:
            # one float64 log-softmax row gives the chosen token's logprob and the top entries,
            # so the argmax's two numbers are bit-identical (lm-eval's is_greedy uses ==)
            row = log_softmax(logits)  # float64 [vocab]
            logprob = float(row[token])
            ids, lps = top_logprobs(row, params.top_n)
            top = [Candidate(int(i), self._piece(int(i)), math.exp(lp), float(lp))
                   for i, lp in zip(ids, lps, strict=True)]
            self.steps.append(StepRecord(step=len(self.ids), candidates=top,
                                         chosen=Candidate(token, self._piece(token),
                                                          math.exp(logprob), logprob)))
        else:
            logprob = log_softmax_at(logits, token)  # only this number: the 4x cheaper path
        index = len(self.ids)
        self.ids.append(token)
        if self.seen:
            self.seen.append(token)
        if token == self.dims.eos_token_id:
            self.finish_reason = "eos"
        self._stops.append(self._detok.step(self.ids))
        if self._stops.stopped:
            self.finish_reason = "stop"
        if self.finish_reason is None and len(self.ids) >= params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self._finalize_text()
        return TokenEvent(token, self._stops.delta(self.done), logprob, top, index)

    def finish(self, reason: str) -> None:
        """End early (cancelled, error): the text so far, nothing held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self._finalize_text()

    @property
    def text(self) -> str:
        """The completion text so far (cut before a stop string)."""
        return self._stops.text

    def pending_text(self) -> str:
        """Text not yet handed out in an event (the rest of the text once finished)."""
        return self._stops.delta(self.done)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _finalize_text(self) -> None:
        rest = self._detok.flush(self.ids)
        if rest:
            self._stops.append(rest)
            if self._stops.stopped:
                self.finish_reason = "stop"
