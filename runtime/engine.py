"""Continuous batching over KV slots, and the per-sequence step every front end shares.

    engine = Engine(generator, slots=8, max_queue=64, prefill_chunk=64).start()
    req = engine.submit(prompt_ids, GenerationParams(max_new_tokens=64, seed=1))
    for ev in req.events(): ...          # TokenEvent ... then one DoneEvent
    engine.close()

One background thread drives the steps. Each step (1) admits waiting requests into free slots,
(2) loads one chunk of the oldest joining prompt into its slot (batch 1: GroupQueryAttention
takes several new tokens over a past only for batch 1), (3) decodes one token for every running
slot in one run (rows of different lengths share it through `seqlens_k`). A finished or cancelled
request frees its slot at once; a waiting one takes it at the next step. So a long prompt joins
while the others keep producing tokens, and each request gets exactly the tokens it gets alone.

`Sequence` is the one step function: it turns one row of logits into the next token (sampling,
seed, repetition penalty, explain mode, logprob), its text delta (incremental detokenization with
tokenizers' DecodeStream: never a split character, a possible stop string held back) and the
finish. The engine, TextGenerator's static batches (optimum's concat-KV graph) and the
hand-driven `StepGenerator` all call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from gpt2_onnx.runtime.errors import Gpt2OnnxError
from gpt2_onnx.runtime.generator import Candidate, GenerationResult, StepRecord, Timings
from gpt2_onnx.runtime.manifest import ModelDims
from gpt2_onnx.runtime.params import GenerationParams  # its home; re-exported here
from gpt2_onnx.runtime.sampling import sample_token, top_candidates

if TYPE_CHECKING:
    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.shared_kv import SharedKVDecoder, SlotCache

FINISH_REASONS = ("length", "eos", "stop", "cancelled", "error")


class QueueFullError(Gpt2OnnxError):
    """The engine's waiting queue is full (a server answers 429: retry later)."""


class EngineClosedError(Gpt2OnnxError):
    """The engine is closing or closed and accepts no new requests."""


class GenerationError(Gpt2OnnxError):
    """A request ended with finish_reason "error" (the message says why)."""


# ---------------------------------------------------------------------------- values


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


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics."""

    slots: int
    busy_slots: int  # slots holding a request (prefilling or decoding)
    prefilling: int  # of those, still loading their prompt
    waiting: int  # submitted, not yet in a slot
    max_queue: int
    submitted: int  # totals since creation
    finished: int
    cancelled: int
    errors: int
    rejected: int  # refused with QueueFullError
    prompt_tokens: int
    generated_tokens: int
    steps: int  # decode runs
    prefill_chunks: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------- the step


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] (logits: float [vocab]); exp in the logits' precision, the
    sum in float64 (4x cheaper than all-float64, same value to ~1e-7)."""
    top = logits.max()
    total = np.exp(logits - top).sum(dtype=np.float64)
    return float(logits[token] - top) - math.log(float(total))


class Sequence:
    """One row's generation state and its step: logits in, one token (and its event) out.

    Owns the random generator (seeded like a lone run), the ids, the incremental detokenizer and
    the stop strings. Not thread-safe: one driver (the engine's thread, a static batch, a
    StepGenerator) calls `accept`.
    """

    def __init__(self, tokenizer: Tokenizer, dims: ModelDims, prompt_ids: list[int],
                 params: GenerationParams) -> None:
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
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._text = ""  # complete characters decoded so far (not cut at a stop)
        self._stop_at: int | None = None
        self._emitted = 0  # characters of the text already handed out in events
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> TokenEvent:
        """Choose the next token from this row's logits [vocab]; update text and finish."""
        params = self.params
        seen = np.asarray(self.seen, dtype=np.int64) if self.seen else None
        token = sample_token(logits, params.sampling, self.rng, seen)
        logprob = log_softmax_at(logits, token)
        top: list[Candidate] = []
        if params.top_n:
            ids, probs = top_candidates(logits, params.top_n)
            top = [Candidate(int(i), self._piece(int(i)), float(p))
                   for i, p in zip(ids, probs, strict=True)]
            self.steps.append(StepRecord(step=len(self.ids), candidates=top,
                                         chosen=Candidate(token, self._piece(token),
                                                          math.exp(logprob))))
        index = len(self.ids)
        self.ids.append(token)
        if self.seen:
            self.seen.append(token)
        if token == self.dims.eos_token_id:
            self.finish_reason = "eos"
        piece = self._next_piece(token)
        if piece:
            before = len(self._text)
            self._text += piece
            self._find_stop(before)
        if self._stop_at is not None:
            self.finish_reason = "stop"
        if self.finish_reason is None and len(self.ids) >= params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self._finalize_text()
        return TokenEvent(token, self._delta(), logprob, top, index)

    def finish(self, reason: str) -> None:
        """End early (cancelled, error): the text so far, nothing held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self._finalize_text()

    @property
    def text(self) -> str:
        """The completion text so far (cut before a stop string)."""
        return self._text if self._stop_at is None else self._text[:self._stop_at]

    def pending_text(self) -> str:
        """What `_delta` would hand out now (the rest of the text once finished)."""
        return self._delta()

    def _next_piece(self, token: int) -> str | None:
        """New complete characters after `token` (None while a character is incomplete)."""
        if self._stream is not None:
            try:
                return self._stream.step(self.tokenizer, token)
            except Exception:  # noqa: BLE001 - DecodeStream's InvalidPrefix: decode whole rows
                self._stream = None  # from now on, for this row only
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd") or not full.startswith(self._text):
            return None
        return full[len(self._text):]

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _find_stop(self, before: int) -> None:
        """Look for a stop string among text that changed (a match may start earlier)."""
        if not self._max_stop:
            return
        start = max(0, before - self._max_stop + 1)
        for s in self.params.stop:
            at = self._text.find(s, start)
            if at >= 0 and (self._stop_at is None or at < self._stop_at):
                self._stop_at = at

    def _finalize_text(self) -> None:
        """At the finish: bytes DecodeStream still holds (an incomplete character at the end,
        or after an invalid sequence) come out as the full decode shows them."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full != self._text and full.startswith(self._text):
            before = len(self._text)
            self._text = full
            self._find_stop(before)
            if self._stop_at is not None:
                self.finish_reason = "stop"

    def _delta(self) -> str:
        text = self.text
        end = len(text)
        if self.finish_reason is None:
            end -= _stop_prefix_hold(text, self.params.stop)
        if end <= self._emitted:
            return ""
        out = text[self._emitted:end]
        self._emitted = end
        return out


def _stop_prefix_hold(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


# ---------------------------------------------------------------------------- requests


class Request:
    """A submitted generation: read its events, wait for its result, or cancel it.

    Thread-safe: the engine pushes events from its thread; any thread (or an asyncio task)
    reads them. Every reader sees every event from the first.
    """

    _ids = itertools.count()

    def __init__(self, prompt: str, prompt_ids: list[int], params: GenerationParams,
                 seq: Sequence) -> None:
        self.id = next(Request._ids)
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seq = seq
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = threading.Event()
        self._done: DoneEvent | None = None

    # -------------------------------------------------------------- reading
    @property
    def done(self) -> bool:
        return self._done is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request; its slot is freed within one step."""
        self._cancel.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """TokenEvents as they come, then one DoneEvent. TimeoutError after `timeout` s idle."""
        i = 0
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while i >= len(self._events):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id}: no event for {timeout} s")
                    # A bounded wait keeps Ctrl-C responsive in the main thread.
                    self._cond.wait(0.5 if left is None else min(left, 0.5))
                batch = self._events[i:]
            i += len(batch)
            for ev in batch:
                yield ev
                if isinstance(ev, DoneEvent):
                    return

    async def aevents(self) -> AsyncIterator[Event]:
        """The same events for asyncio: awaits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            wake = asyncio.Event()
            with self._cond:
                batch = self._events[i:]
                if not batch:
                    self._waiters.append((loop, wake))
            if not batch:
                await wake.wait()
                continue
            i += len(batch)
            for ev in batch:
                yield ev
                if isinstance(ev, DoneEvent):
                    return

    def wait(self, timeout: float | None = None) -> DoneEvent:
        """Block until the request ends; its DoneEvent."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done is not None, timeout):
                raise TimeoutError(f"request {self.id}: not done after {timeout} s")
            assert self._done is not None
            return self._done

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished GenerationResult (as TextGenerator returns); GenerationError when the
        request ended in an error."""
        done = self.wait(timeout)
        if done.finish_reason == "error":
            raise GenerationError(f"request {self.id} failed: {done.error}")
        return GenerationResult(prompt=self.prompt, prompt_ids=self.prompt_ids, ids=done.ids,
                                text=done.text, finish_reason=done.finish_reason,
                                timings=done.timings, steps=list(self.seq.steps))

    # -------------------------------------------------------------- writing (the driver)
    def _push(self, *events: Event) -> None:
        with self._cond:
            self._events.extend(events)
            for ev in events:
                if isinstance(ev, DoneEvent):
                    self._done = ev
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def _emit_token(self, ev: TokenEvent) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if self.seq.done:
            self._push(ev, self._done_event(now))
        else:
            self._push(ev)

    def _finish(self, reason: str, error: str | None = None) -> None:
        """End now (cancelled, error, or zero tokens asked): flush text, push the DoneEvent."""
        if self._done is not None:
            return
        self.seq.finish(reason)
        tail = self.seq.pending_text()  # text held back for a possible stop string
        self._push(self._done_event(time.perf_counter(), error, tail))

    def _done_event(self, now: float, error: str | None = None, tail: str = "") -> DoneEvent:
        self.finished_at = now
        seq = self.seq
        start = self.admitted_at if self.admitted_at is not None else self.submitted_at
        first = self.first_token_at
        prefill_ms = ((first - start) * 1e3) if first is not None else 0.0
        decode_s = (now - first) if first is not None else 0.0
        decoded = max(len(seq.ids) - 1, 0)
        rate = decoded / decode_s if decoded and decode_s > 0 else 0.0
        timings = Timings(prefill_ms=prefill_ms, decode_ms=decode_s * 1e3,
                          decode_tokens_per_s=rate,
                          ttft_ms=((first - self.submitted_at) * 1e3) if first else 0.0,
                          queue_ms=(start - self.submitted_at) * 1e3)
        return DoneEvent(finish_reason=seq.finish_reason or "length",
                         prompt_tokens=len(self.prompt_ids), completion_tokens=len(seq.ids),
                         timings=timings, text=seq.text, ids=list(seq.ids), error=error,
                         tail=tail)


# ---------------------------------------------------------------------------- the engine


@dataclass
class _Slot:
    req: Request
    held: int = 0  # positions written into the slot
    prefilled: int = 0  # prompt tokens loaded (== len(feed) once decoding)
    next_token: int | None = None  # the token to feed at the next decode step


class Engine:
    """Continuous batching of requests over `slots` KV slots of a shared-KV variant.

    slots: requests decoded together (each holds one slot's KV buffers of max_len positions).
    max_queue: requests that may wait for a slot; one more raises QueueFullError.
    prefill_chunk: at most this many prompt tokens are loaded per step while others decode
      (smaller: smoother inter-token latency for running requests, slower loading of the joining
      one). With no request decoding, a joining prompt is loaded in one run.
    prefill_budget: the time a chunk may take, as a fraction of a decode run (both measured as
      the engine goes): the chunk size adapts so the running requests' inter-token time stays
      near (1 + budget) x their step time on any model and machine, but a chunk never shrinks
      below the size where its fixed cost (one read of the weights) is 2/3 of its time. None:
      always prefill_chunk tokens.
    max_len: positions per slot (default the model's n_positions); prompt + new tokens must fit.
    idle_stop: when set, the thread exits (and the buffers are freed) after this many idle
      seconds, and restarts on the next submit (TextGenerator's own engine uses this).
    """

    def __init__(self, generator: TextGenerator, slots: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 64, max_len: int | None = None,
                 idle_stop: float | None = None, prefill_budget: float | None = 0.8) -> None:
        from gpt2_onnx.runtime.shared_kv import SharedKVDecoder

        dims = generator.manifest.dims
        for name, value, low in (("slots", slots, 1), ("max_queue", max_queue, 0),
                                 ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_len is None:
            max_len = dims.n_positions
        if isinstance(max_len, bool) or not isinstance(max_len, int) \
                or not 2 <= max_len <= dims.n_positions:
            raise ValueError(f"max_len must be in [2, {dims.n_positions}] (n_positions), "
                             f"got {max_len!r}")
        if prefill_budget is not None and (isinstance(prefill_budget, bool) or not isinstance(
                prefill_budget, (int, float)) or not 0 < prefill_budget <= 100):
            raise ValueError(f"prefill_budget must be None or in (0, 100], got "
                             f"{prefill_budget!r}")
        if idle_stop is not None and not idle_stop > 0:
            raise ValueError(f"idle_stop must be None or > 0 seconds, got {idle_stop!r}")
        if not isinstance(generator.decoder, SharedKVDecoder):
            from gpt2_onnx.runtime import variants

            precision = generator.decoder.variant.precision
            shared = [n for n in variants.names() if variants.get(n).kv_layout == "shared"]
            raise Gpt2OnnxError(
                f"the {precision!r} variant (a concat-KV graph) cannot share KV slots: its "
                "cache is a new tensor per step for the whole batch, so requests cannot join or "
                "leave a running batch. Load a shared-KV variant for the engine "
                f"({', '.join(shared)}: `TextGenerator.load(dir, precision={shared[0]!r})`), "
                "or use TextGenerator.generate, which runs this one as static batches.")
        self.generator = generator
        self.decoder: SharedKVDecoder = generator.decoder
        self.dims = dims
        self.slots = slots
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self._chunk = min(2, prefill_chunk)  # the adaptive chunk size (prefill_budget)
        self._chunk_times: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens, seconds)
        self._decode_s: float | None = None  # moving average of a decode run's seconds
        self.max_len = max_len
        self.idle_stop = idle_stop
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[_Slot | None] = [None] * slots
        self._thread: threading.Thread | None = None
        self._started = False
        self._closing = False
        self._closed = threading.Event()
        self._cache: SlotCache | None = None
        self._counts = dict(submitted=0, finished=0, cancelled=0, errors=0, rejected=0,
                            prompt_tokens=0, generated_tokens=0, steps=0, prefill_chunks=0)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        """Start the background thread that drives the steps. Returns self."""
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed; create a new one")
            self._started = True
            self._ensure_thread_locked()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, grace: float | None = None) -> None:
        """Stop accepting requests; let those in flight (and waiting) finish within `grace`
        seconds (None: wait for all), cancel the rest, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(grace)
        with self._cond:
            leftovers = list(self._waiting) + [s.req for s in self._active if s is not None]
            for req in leftovers:
                req.cancel()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        # No thread: nothing drives the requests any more; end those still open.
        with self._cond:
            for req in list(self._waiting):
                self._end(req, "cancelled")
            self._waiting.clear()
            for i, s in enumerate(self._active):
                if s is not None:
                    self._end(s.req, "cancelled")
                    self._active[i] = None
            self._cache = None
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closing

    # -------------------------------------------------------------- submitting
    def submit(self, prompt_ids: Seq[int], params: GenerationParams | None = None, *,
               prompt: str | None = None) -> Request:
        """Queue one request. Bad input raises ValueError (naming the setting) here, never
        inside the running batch; QueueFullError when max_queue requests already wait;
        EngineClosedError after close()."""
        params = GenerationParams() if params is None else params
        if not isinstance(params, GenerationParams):
            raise ValueError(f"params: give a GenerationParams, got {type(params).__name__}")
        params.validate(self.dims)
        self.generator._check_ids(prompt_ids, "prompt")
        ids = [int(i) for i in prompt_ids]
        params.check_prompt(ids, self.dims, max_len=self.max_len)
        text = prompt if prompt is not None else self.generator.decode(ids)
        req = Request(text, ids, params, Sequence(self.generator.tokenizer, self.dims, ids,
                                                  params))
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed or closing; it takes no new "
                                        "requests")
            if params.max_new_tokens == 0:
                self._counts["submitted"] += 1
                self._end(req, "length")
                return req
            free = sum(s is None for s in self._active)
            if len(self._waiting) - free >= self.max_queue:  # beyond the free slots
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"the engine's queue is full ({len(self._waiting)} requests wait for "
                    f"{self.slots} slots; max_queue={self.max_queue}): retry later")
            self._counts["submitted"] += 1
            self._waiting.append(req)
            if self._started:
                self._ensure_thread_locked()
            self._cond.notify_all()
        return req

    def stats(self) -> EngineStats:
        with self._cond:
            busy = [s for s in self._active if s is not None]
            return EngineStats(
                slots=self.slots, busy_slots=len(busy),
                prefilling=sum(s.next_token is None for s in busy),
                waiting=len(self._waiting), max_queue=self.max_queue, **self._counts)

    def step(self) -> bool:
        """Drive the engine by hand instead of start(): admit waiting requests, load one
        prefill chunk, decode one token for every running slot. False when there was nothing
        to do. (Tests use it to replay exact arrival schedules.)"""
        with self._cond:
            if self._started:
                raise RuntimeError("step(): the engine runs its own thread (start() was called)")
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._reap_cancelled_locked()
            self._admit_locked()
            if not any(s is not None for s in self._active):
                return False
        self._step()
        return True

    # -------------------------------------------------------------- the thread
    def _ensure_thread_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="gpt2-onnx-engine",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._step()
        except BaseException as exc:  # noqa: BLE001 - every open request learns why
            with self._cond:
                msg = f"engine stopped: {type(exc).__name__}: {exc}"
                for req in list(self._waiting):
                    self._end(req, "error", msg)
                self._waiting.clear()
                for i, s in enumerate(self._active):
                    if s is not None:
                        self._end(s.req, "error", msg)
                        self._active[i] = None
                self._thread = None
            raise

    def _wait_for_work(self) -> bool:
        """Admit waiting requests; block while idle. False when the thread should exit."""
        idle_since = time.monotonic()
        with self._cond:
            while True:
                self._reap_cancelled_locked()
                self._admit_locked()
                if any(s is not None for s in self._active):
                    return True
                if self._closing or (self.idle_stop is not None and
                                     time.monotonic() - idle_since >= self.idle_stop):
                    self._thread = None
                    self._cache = None  # the buffers go with the idle thread
                    return False
                self._cond.wait(0.5 if self.idle_stop is None
                                else min(0.5, self.idle_stop))

    def _reap_cancelled_locked(self) -> None:
        for req in [r for r in self._waiting if r.cancel_requested]:
            self._waiting.remove(req)
            self._end(req, "cancelled")
        for i, s in enumerate(self._active):
            if s is not None and s.req.cancel_requested:
                self._end(s.req, "cancelled")
                self._active[i] = None

    def _admit_locked(self) -> None:
        for i in range(self.slots):
            if not self._waiting:
                return
            if self._active[i] is None:
                req = self._waiting.popleft()
                req.admitted_at = time.perf_counter()
                self._active[i] = _Slot(req)
                self._counts["prompt_tokens"] += len(req.prompt_ids)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
        self._counts[key] += 1
        req._finish(reason, error)

    def _step(self) -> None:
        """One prefill chunk (oldest joining prompt) + one decode run over running slots."""
        if self._cache is None:
            self._cache = self.decoder.start_slots(self.slots, self.max_len)
        cache = self._cache
        joining = [(i, s) for i, s in enumerate(self._active)
                   if s is not None and s.next_token is None]
        if joining:
            i, s = min(joining, key=lambda x: x[1].req.admitted_at or 0.0)
            self._prefill_chunk(cache, i, s)
        rows = [(i, s) for i, s in enumerate(self._active)
                if s is not None and s.next_token is not None]
        if rows:
            self._decode(cache, rows)

    def _prefill_chunk(self, cache: SlotCache, i: int, s: _Slot) -> None:
        feed = s.req.seq.feed
        # Chunks matter only while others decode; alone, the whole prompt goes in one run.
        decoding = any(x is not None and x.next_token is not None for x in self._active)
        if not decoding:
            size = len(feed) - s.prefilled
        elif self.prefill_budget is None:
            size = self.prefill_chunk
        else:
            size = self._chunk
        chunk = feed[s.prefilled:s.prefilled + size]
        t0 = time.perf_counter()
        try:
            logits = self.decoder.prefill_slot(cache, i, chunk, s.held)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            self._fail(i, s, exc)
            return
        took = time.perf_counter() - t0
        if len(chunk) > 1 or decoding:  # every prefill run informs the chunk-cost fit
            self._chunk_times.append((len(chunk), took))
        if decoding and len(chunk) == size:
            self._adapt_chunk(len(chunk), took)
        self._counts["prefill_chunks"] += 1
        s.prefilled += len(chunk)
        s.held += len(chunk)
        if s.prefilled == len(feed):
            self._accept(i, s, logits)

    def _adapt_chunk(self, n: int, seconds: float) -> None:
        """Next chunk size from the chunks' measured times against the budget.

        A chunk costs about a + b*n seconds: a fixed part (each run reads every weight, which a
        decode run pays too) and a per-token part, fitted over the recent chunks. The size aims
        at `prefill_budget` x a decode run's time, but never below a/(2b) tokens (where the fixed
        part is two thirds of the chunk's time): where one weight read already exceeds the
        budget, a smaller chunk would only slow the joining prompt, barely the others. Growth is at
        most a quarter per step (no jump far past the budget on a noisy fit)."""
        if self.prefill_budget is None or self._decode_s is None:
            return
        target = self.prefill_budget * self._decode_s
        sizes = np.array([x for x, _ in self._chunk_times], dtype=np.float64)
        times = np.array([t for _, t in self._chunk_times], dtype=np.float64)
        grow = n + max(1, n // 4)
        if np.unique(sizes).size >= 2:
            b, a = np.polyfit(sizes, times, 1)  # seconds per token, fixed seconds
            if b > 0:
                a = max(a, 0.0)
                want = max((target - a) / b, a / (2 * b))
                self._chunk = max(1, min(self.prefill_chunk, grow, int(want)))
                return
        self._chunk = max(1, min(self.prefill_chunk, grow if seconds <= target
                                 else int(n * target / seconds)))

    def _decode(self, cache: SlotCache, rows: list[tuple[int, _Slot]]) -> None:
        first, last = rows[0][0], rows[-1][0]
        tokens, held = [], []
        for j in range(first, last + 1):
            s = self._active[j]
            if s is not None and s.next_token is not None:
                tokens.append(s.next_token)
                held.append(s.held)
            else:
                # A free or joining slot inside the range: a dummy token at its next position,
                # which the slot's next prefill chunk (or admission) overwrites.
                tokens.append(0)
                held.append(s.held if s is not None else 0)
        t0 = time.perf_counter()
        try:
            logits = self.decoder.decode_slots(cache, first, tokens, held)  # [rows, vocab]
        except Exception as exc:  # noqa: BLE001 - the rows of this run fail, the engine goes on
            for i, s in rows:
                self._fail(i, s, exc)
            return
        took = time.perf_counter() - t0
        self._decode_s = took if self._decode_s is None else 0.8 * self._decode_s + 0.2 * took
        self._counts["steps"] += 1
        for i, s in rows:
            s.held += 1
            self._accept(i, s, logits[i - first])

    def _accept(self, i: int, s: _Slot, logits: np.ndarray) -> None:
        """Pick the slot's next token; free the slot when its request is done."""
        try:
            ev = s.req.seq.accept(logits)
        except Exception as exc:  # noqa: BLE001 - a failing request does not disturb others
            self._fail(i, s, exc)
            return
        self._counts["generated_tokens"] += 1
        s.next_token = ev.token_id
        if s.req.seq.done:
            with self._cond:
                self._active[i] = None
                self._counts["finished"] += 1
                self._cond.notify_all()
        s.req._emit_token(ev)

    def _fail(self, i: int, s: _Slot, exc: Exception) -> None:
        with self._cond:
            self._active[i] = None
            self._end(s.req, "error", f"{type(exc).__name__}: {exc}")
            self._cond.notify_all()


# ---------------------------------------------------------------------------- by hand


class StepGenerator:
    """Drive one sequence by hand, step by step (onnxruntime-genai's Generator):

        g = StepGenerator(text_generator, GenerationParams(max_new_tokens=20, seed=1))
        g.append_tokens(text_generator.encode("Hello"))
        while not g.is_done():
            ev = g.generate_next_token()      # a TokenEvent
        g.get_logits()                        # the last logits [vocab]

    Works with every variant (batch 1 on the generator's decoder). `append_tokens` may be called
    again between steps (e.g. a tool's output): the tokens join the context. Tokens appended
    count toward the positions, not toward max_new_tokens.
    """

    def __init__(self, generator: TextGenerator, params: GenerationParams | None = None) -> None:
        self.generator = generator
        self.params = GenerationParams() if params is None else params
        self.params.validate(generator.manifest.dims)
        self.dims = generator.manifest.dims
        self._context: list[int] = []  # every id fed or to feed (prompt, appended, generated)
        self._fed = 0  # ids of _context already in the cache
        self._cache: object | None = None
        self._mask: np.ndarray | None = None  # [1, fed]
        self._logits: np.ndarray | None = None  # [vocab] after the last fed id
        self.seq: Sequence | None = None

    @property
    def tokens(self) -> list[int]:
        """Every id of the sequence: prompt, appended and generated."""
        return list(self._context)

    def append_tokens(self, ids: Seq[int]) -> None:
        """Add ids to the context (the prompt first); they are fed at the next step."""
        self.generator._check_ids(ids, "ids")
        ids = [int(i) for i in ids]
        if len(self._context) + len(ids) > self.dims.n_positions:
            raise ValueError(f"append_tokens: {len(self._context) + len(ids)} tokens would "
                             f"exceed n_positions={self.dims.n_positions}")
        if self.seq is None:
            self.seq = Sequence(self.generator.tokenizer, self.dims, ids, self.params)
            self._context = list(self.seq.feed)
        else:
            self._context.extend(ids)

    def is_done(self) -> bool:
        """True once the sequence finished (eos, stop, max_new_tokens) or the positions are full."""
        if self.seq is not None and self.seq.done:
            return True
        return len(self._context) >= self.dims.n_positions

    def get_logits(self) -> np.ndarray:
        """Logits [vocab] for the position after the last id (runs pending ids first)."""
        self._feed()
        assert self._logits is not None
        return self._logits

    def generate_next_token(self) -> TokenEvent:
        """Feed what is pending, then choose the next token from the last logits."""
        if self.seq is None:
            raise ValueError("append_tokens first: the sequence has no prompt")
        if self.is_done():
            raise ValueError("the sequence is done (is_done() is True)")
        ev = self.seq.accept(self.get_logits())
        self._context.append(ev.token_id)
        return ev

    def _feed(self) -> None:
        if self.seq is None:
            raise ValueError("append_tokens first: the sequence has no prompt")
        new = self._context[self._fed:]
        if not new:
            return
        dec = self.generator.decoder
        if self._cache is None:
            self._cache = dec.start(1, self.dims.n_positions)
            self._mask = np.zeros((1, 0), dtype=np.int64)
        assert self._mask is not None
        if self._fed == 0:
            chunks = [new]
        else:  # several tokens over a past: one at a time (any graph accepts that)
            chunks = [[t] for t in new]
        for chunk in chunks:
            n = len(chunk)
            self._mask = np.ones((1, self._mask.shape[1] + n), dtype=np.int64)
            pos = np.arange(self._fed, self._fed + n, dtype=np.int64)[None, :]  # [1, n]
            logits, self._cache = dec.forward(self._cache, np.array([chunk], dtype=np.int64),
                                              self._mask, pos)
            self._fed += n
            self._logits = logits[0]
