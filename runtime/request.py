"""The request handle: a submitted generation's events, result and cancel switch.

The engine's thread writes (`_emit_token`, `_finish`); any thread or asyncio task reads
(`events`, `aevents`, `wait`, `result`). Every reader sees every event from the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator

from gpt2_onnx.runtime.errors import GenerationError
from gpt2_onnx.runtime.output import RowParams, Sequence
from gpt2_onnx.runtime.results import DoneEvent, Event, GenerationResult, Timings, TokenEvent


class Request:
    """A submitted generation: read its events, wait for its result, or cancel it.

    Thread-safe: the engine pushes events from its thread; any thread (or an asyncio task)
    reads them. Every reader sees every event from the first.
    """

    _ids = itertools.count()

    def __init__(self, prompt: str, prompt_ids: list[int], params: RowParams,
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
