"""What generation hands back: results, per-token events and timings (plain values, no logic).

The lowest layer of generation: the output step (output.py), the request handle (request.py),
the engine, the static batches and TextGenerator all build or read these, and import nothing
above them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("length", "eos", "stop", "cancelled", "error")


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # prompt -> first logits (time to first token, sampling excluded)
    decode_ms: float  # all later steps
    decode_tokens_per_s: float  # tokens of this row / decode time (0 when nothing decoded)
    ttft_ms: float = 0.0  # submission -> first token (the engine: queue wait included)
    queue_ms: float = 0.0  # submission -> a slot (the engine only)


@dataclass(frozen=True)
class Candidate:
    id: int
    text: str
    prob: float  # exp(logprob)
    logprob: float  # natural log, from the same float64 log-softmax row as the chosen token's


@dataclass(frozen=True)
class StepRecord:
    """Explain mode: what the model offered at one step and what was chosen."""

    step: int
    candidates: list[Candidate]  # top-N by probability (raw softmax of the logits)
    chosen: Candidate  # prob is its raw softmax probability


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    prompt_ids: list[int]
    ids: list[int]  # new tokens only (the EOS token included when finish_reason is "eos")
    text: str  # new text only, special tokens skipped, cut before a stop string
    finish_reason: str  # "length", "eos" or "stop" ("cancelled" from an engine request)
    timings: Timings
    steps: list[StepRecord] = field(default_factory=list)  # filled when show_top > 0


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request."""

    token_id: int
    text: str  # the text delta ("" while a character is incomplete or a stop may be starting)
    logprob: float  # natural log of the token's softmax probability (raw logits)
    top: list[Candidate]  # the top_n most probable candidates (raw softmax), [] when top_n == 0
    index: int  # 0 for the first new token


@dataclass(frozen=True)
class DoneEvent:
    """The last event of a request."""

    finish_reason: str  # "length", "eos", "stop", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    text: str  # the whole completion text (cut before a stop string)
    ids: list[int] = field(default_factory=list)  # the completion's token ids
    error: str | None = None  # why, when finish_reason == "error"
    tail: str = ""  # text no TokenEvent carried (held back when cancelled or failed early)


Event = TokenEvent | DoneEvent
