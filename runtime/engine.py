"""Continuous batching over KV slots: the Engine drives the scheduler, runner and output steps.

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

The pieces, split as vLLM v1 splits its engine core, each testable alone:
  scheduler.py  admission, the prefill chunk size, each step's plan (no model, no threads)
  runner.py     binds the slots' KV buffers and runs the session (SlotRunner)
  output.py     logits -> token, text delta, finish (Sequence: sampler, detokenizer, stop)
  request.py    the handle a caller reads events from (Request)
  results.py    the values handed back (TokenEvent, DoneEvent, Timings, GenerationResult)
This module keeps the driver (`Engine`) and its stats; the request settings (GenerationParams)
live in params.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.config import DEFAULTS, EngineConfig
from gpt2_onnx.runtime.errors import (
    EngineClosedError,
    GenerationError,
    Gpt2OnnxError,
    QueueFullError,
)
from gpt2_onnx.runtime.output import Sequence, log_softmax_at
from gpt2_onnx.runtime.params import GenerationParams  # its home; re-exported here
from gpt2_onnx.runtime.request import Request
from gpt2_onnx.runtime.results import FINISH_REASONS, DoneEvent, Event, TokenEvent
from gpt2_onnx.runtime.runner import SlotRunner
from gpt2_onnx.runtime.scheduler import Chunk, DecodeBatch, Scheduler, Slot

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from gpt2_onnx.runtime.decoder import Decoder
    from gpt2_onnx.runtime.manifest import Manifest

# Names defined elsewhere that callers import from here (the engine's public vocabulary).
__all__ = [
    "FINISH_REASONS", "DoneEvent", "Engine", "EngineClosedError", "EngineModel", "EngineStats",
    "Event", "GenerationError", "GenerationParams", "QueueFullError", "Request", "Sequence",
    "TokenEvent", "log_softmax_at",
]


# ---------------------------------------------------------------------------- values


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


# ---------------------------------------------------------------------------- the engine


class EngineModel(Protocol):
    """What the engine needs of a loaded model (TextGenerator is one): the tokenizer, the
    manifest (its dims), a shared-KV decoder and the token-id check of the public API."""

    tokenizer: Tokenizer
    manifest: Manifest
    decoder: Decoder

    def check_ids(self, ids: Seq[int], what: str) -> None: ...


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
    The defaults are config.DEFAULTS (EngineConfig); `Engine.from_config` takes one.
    """

    def __init__(self, generator: EngineModel, slots: int = DEFAULTS.slots,
                 max_queue: int = DEFAULTS.max_queue, prefill_chunk: int = DEFAULTS.prefill_chunk,
                 max_len: int | None = None, idle_stop: float | None = None,
                 prefill_budget: float | None = DEFAULTS.prefill_budget) -> None:
        dims = generator.manifest.dims
        config = EngineConfig(slots=slots, max_queue=max_queue, prefill_chunk=prefill_chunk,
                              prefill_budget=prefill_budget,
                              max_len=dims.n_positions if max_len is None else max_len,
                              idle_stop=idle_stop)
        problems = config.problems(dims.n_positions)
        if problems:
            raise ValueError("; ".join(problems))
        precision = generator.decoder.variant.precision
        if not generator.decoder.variant.shared_kv:
            shared = variants.shared_kv_names()
            raise Gpt2OnnxError(
                f"the {precision!r} variant (a concat-KV graph) cannot share KV slots: its "
                "cache is a new tensor per step for the whole batch, so requests cannot join or "
                "leave a running batch. Load a shared-KV variant for the engine "
                f"({', '.join(shared)}: `TextGenerator.load(dir, precision={shared[0]!r})`), "
                "or use TextGenerator.generate, which runs this one as static batches.")
        assert config.max_len is not None
        self.generator = generator
        self.config = config
        self.dims = dims
        self.slots = slots
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.max_len: int = config.max_len
        self.idle_stop = idle_stop
        self.scheduler = Scheduler(slots, max_queue, prefill_chunk, prefill_budget)
        self.runner = SlotRunner(generator.decoder, slots, config.max_len)  # type: ignore[arg-type]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closing = False
        self._closed = threading.Event()
        self._counts = dict(submitted=0, finished=0, cancelled=0, errors=0, rejected=0,
                            prompt_tokens=0, generated_tokens=0, steps=0, prefill_chunks=0)

    @classmethod
    def from_config(cls, generator: EngineModel, config: EngineConfig) -> Engine:
        """An engine with `config`'s settings."""
        return cls(generator, slots=config.slots, max_queue=config.max_queue,
                   prefill_chunk=config.prefill_chunk, max_len=config.max_len,
                   idle_stop=config.idle_stop, prefill_budget=config.prefill_budget)

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
            leftovers = list(self.scheduler.waiting) + [s.req for s in self.scheduler.busy()]
            for req in leftovers:
                req.cancel()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        # No thread: nothing drives the requests any more; end those still open.
        with self._cond:
            for req in self.scheduler.take_all():
                self._end(req, "cancelled")
            self.runner.release()
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
        self.generator.check_ids(prompt_ids, "prompt")
        ids = [int(i) for i in prompt_ids]
        params.check_prompt(ids, self.dims, max_len=self.max_len)
        tokenizer = self.generator.tokenizer
        text = prompt if prompt is not None else tokenizer.decode(ids, skip_special_tokens=True)
        req = Request(text, ids, params, Sequence(tokenizer, self.dims, ids, params))
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed or closing; it takes no new "
                                        "requests")
            if params.max_new_tokens == 0:
                self._counts["submitted"] += 1
                self._end(req, "length")
                return req
            if not self.scheduler.has_room():  # beyond the free slots
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"the engine's queue is full ({len(self.scheduler.waiting)} requests wait "
                    f"for {self.slots} slots; max_queue={self.max_queue}): retry later")
            self._counts["submitted"] += 1
            self.scheduler.waiting.append(req)
            if self._started:
                self._ensure_thread_locked()
            self._cond.notify_all()
        return req

    def stats(self) -> EngineStats:
        with self._cond:
            busy = self.scheduler.busy()
            return EngineStats(
                slots=self.slots, busy_slots=len(busy),
                prefilling=sum(s.next_token is None for s in busy),
                waiting=len(self.scheduler.waiting), max_queue=self.max_queue, **self._counts)

    def step(self) -> bool:
        """Drive the engine by hand instead of start(): admit waiting requests, load one
        prefill chunk, decode one token for every running slot. False when there was nothing
        to do. (Tests use it to replay exact arrival schedules.)"""
        with self._cond:
            if self._started:
                raise RuntimeError("step(): the engine runs its own thread (start() was called)")
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._schedule_locked()
            if not self.scheduler.busy():
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
                for req in self.scheduler.take_all():
                    self._end(req, "error", msg)
                self._thread = None
            raise

    def _wait_for_work(self) -> bool:
        """Admit waiting requests; block while idle. False when the thread should exit."""
        idle_since = time.monotonic()
        with self._cond:
            while True:
                self._schedule_locked()
                if self.scheduler.busy():
                    return True
                if self._closing or (self.idle_stop is not None and
                                     time.monotonic() - idle_since >= self.idle_stop):
                    self._thread = None
                    self.runner.release()  # the buffers go with the idle thread
                    return False
                self._cond.wait(0.5 if self.idle_stop is None
                                else min(0.5, self.idle_stop))

    def _schedule_locked(self) -> None:
        """End the cancelled requests, admit waiting ones into free slots."""
        for req in self.scheduler.take_cancelled():
            self._end(req, "cancelled")
        for slot in self.scheduler.admit():
            self._counts["prompt_tokens"] += len(slot.req.prompt_ids)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
        self._counts[key] += 1
        req._finish(reason, error)

    # -------------------------------------------------------------- the step
    def _step(self) -> None:
        """One prefill chunk (oldest joining prompt) + one decode run over running slots."""
        self.runner.cache()  # allocated here: a failure stops the engine, not one request
        chunk = self.scheduler.next_chunk()
        if chunk is not None:
            self._prefill(chunk)
        batch = self.scheduler.decode_batch()  # a prompt loaded just now decodes too
        if batch is not None:
            self._decode(batch)

    def _prefill(self, chunk: Chunk) -> None:
        s = chunk.slot
        try:
            logits, took = self.runner.prefill(chunk.index, chunk.ids, s.held)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            self._fail(chunk.index, s, exc)
            return
        self.scheduler.chunks.record_prefill(len(chunk.ids), took, chunk.decoding, chunk.asked)
        self._counts["prefill_chunks"] += 1
        s.prefilled += len(chunk.ids)
        s.held += len(chunk.ids)
        if s.prefilled == len(s.feed):
            self._accept(chunk.index, s, logits)

    def _decode(self, batch: DecodeBatch) -> None:
        try:
            logits, took = self.runner.decode(batch.first, batch.tokens, batch.held)
        except Exception as exc:  # noqa: BLE001 - the rows of this run fail, the engine goes on
            for i, s in batch.rows:
                self._fail(i, s, exc)
            return
        self.scheduler.chunks.record_decode(took)
        self._counts["steps"] += 1
        for i, s in batch.rows:
            s.held += 1
            self._accept(i, s, logits[i - batch.first])

    def _accept(self, i: int, s: Slot, logits: np.ndarray) -> None:
        """Output processing of the slot's row; free the slot when its request is done."""
        try:
            ev = s.req.seq.accept(logits)
        except Exception as exc:  # noqa: BLE001 - a failing request does not disturb others
            self._fail(i, s, exc)
            return
        self._counts["generated_tokens"] += 1
        s.next_token = ev.token_id
        if s.req.seq.done:
            with self._cond:
                self.scheduler.free(i)
                self._counts["finished"] += 1
                self._cond.notify_all()
        s.req._emit_token(ev)

    def _fail(self, i: int, s: Slot, exc: Exception) -> None:
        with self._cond:
            self.scheduler.free(i)
            self._end(s.req, "error", f"{type(exc).__name__}: {exc}")
            self._cond.notify_all()
