"""The engine's scheduler: admission into KV slots, the prefill chunk size, each step's plan.

Pure bookkeeping, no model and no threads (the engine calls it under its lock), so each rule is
testable on its own:

- admission: waiting requests take free slots in arrival order, lowest slot first; the queue
  refuses a request when `max_queue` already wait beyond the free slots;
- the joining prompt: the oldest admitted request still loading its prompt gets one chunk per
  step; alone (nobody decoding) its whole prompt goes in one run;
- chunk fitting (`ChunkSizer`): with a budget, the chunk size follows the measured cost of
  chunks against a decode run's time;
- the decode batch: every slot with a next token, bound as one contiguous range of slots.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gpt2_onnx.runtime.request import Request


@dataclass
class Slot:
    """One KV slot's occupant and how far it got."""

    req: Request
    held: int = 0  # positions written into the slot
    prefilled: int = 0  # prompt tokens loaded (== len(feed) once decoding)
    next_token: int | None = None  # the token to feed at the next decode step

    @property
    def feed(self) -> list[int]:
        return self.req.seq.feed


@dataclass(frozen=True)
class Chunk:
    """One prefill run: the next tokens of the joining prompt in slot `index`."""

    index: int
    slot: Slot
    ids: list[int]  # the tokens to load (may be fewer than `asked` at the prompt's end)
    asked: int  # the size the ChunkSizer gave
    decoding: bool  # others decode meanwhile (only then do chunk sizes matter)


@dataclass(frozen=True)
class DecodeBatch:
    """One decode run: slots [first, first + len(tokens)) with one token each.

    A free or joining slot inside the range gets a dummy token 0 at its next position, which
    that slot's next prefill chunk (or admission) overwrites; `rows` are the real ones.
    """

    first: int
    tokens: list[int]
    held: list[int]  # positions each slot of the range holds before this token
    rows: list[tuple[int, Slot]]  # (slot index, slot) of the requests decoding


class ChunkSizer:
    """The size of the next prefill chunk while others decode.

    prefill_chunk: the largest chunk. prefill_budget: the time a chunk may take as a fraction of
    a decode run (both measured as the engine goes); None: always prefill_chunk tokens.
    """

    def __init__(self, prefill_chunk: int, prefill_budget: float | None) -> None:
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.chunk = min(2, prefill_chunk)  # the adaptive chunk size (prefill_budget)
        self.chunk_times: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens, seconds)
        self.decode_s: float | None = None  # moving average of a decode run's seconds

    def size(self, remaining: int, decoding: bool) -> int:
        """Tokens to load next of a prompt with `remaining` tokens left to load."""
        if not decoding:  # chunks matter only while others decode
            return remaining
        if self.prefill_budget is None:
            return self.prefill_chunk
        return self.chunk

    def record_prefill(self, n: int, seconds: float, decoding: bool, asked: int) -> None:
        """A prefill run of `n` tokens took `seconds` (`asked`: the size `size` gave)."""
        if n > 1 or decoding:  # every prefill run informs the chunk-cost fit
            self.chunk_times.append((n, seconds))
        if decoding and n == asked:
            self.adapt(n, seconds)

    def record_decode(self, seconds: float) -> None:
        """A decode run took `seconds` (a moving average: 0.8 old, 0.2 new)."""
        self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds

    def adapt(self, n: int, seconds: float) -> None:
        """Next chunk size from the chunks' measured times against the budget.

        A chunk costs about a + b*n seconds: a fixed part (each run reads every weight, which a
        decode run pays too) and a per-token part, fitted over the recent chunks. The size aims
        at `prefill_budget` x a decode run's time, but never below a/(2b) tokens (where the fixed
        part is two thirds of the chunk's time): where one weight read already exceeds the
        budget, a smaller chunk would only slow the joining prompt, barely the others. Growth is at
        most a quarter per step (no jump far past the budget on a noisy fit)."""
        if self.prefill_budget is None or self.decode_s is None:
            return
        target = self.prefill_budget * self.decode_s
        sizes = np.array([x for x, _ in self.chunk_times], dtype=np.float64)
        times = np.array([t for _, t in self.chunk_times], dtype=np.float64)
        grow = n + max(1, n // 4)
        if np.unique(sizes).size >= 2:
            b, a = np.polyfit(sizes, times, 1)  # seconds per token, fixed seconds
            if b > 0:
                a = max(a, 0.0)
                want = max((target - a) / b, a / (2 * b))
                self.chunk = max(1, min(self.prefill_chunk, grow, int(want)))
                return
        self.chunk = max(1, min(self.prefill_chunk, grow if seconds <= target
                                else int(n * target / seconds)))


class Scheduler:
    """Waiting requests, the slots and who runs at each step (see the module docstring)."""

    def __init__(self, slots: int, max_queue: int, prefill_chunk: int,
                 prefill_budget: float | None) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.active: list[Slot | None] = [None] * slots
        self.chunks = ChunkSizer(prefill_chunk, prefill_budget)

    # -------------------------------------------------------------- admission
    def has_room(self) -> bool:
        """False when `max_queue` requests already wait beyond the free slots."""
        free = sum(s is None for s in self.active)
        return len(self.waiting) - free < self.max_queue

    def busy(self) -> list[Slot]:
        return [s for s in self.active if s is not None]

    def admit(self) -> list[Slot]:
        """Waiting requests into free slots (arrival order, lowest slot first)."""
        admitted = []
        for i in range(self.slots):
            if not self.waiting:
                break
            if self.active[i] is None:
                req = self.waiting.popleft()
                req.admitted_at = time.perf_counter()
                self.active[i] = Slot(req)
                admitted.append(self.active[i])
        return admitted

    def take_cancelled(self) -> list[Request]:
        """Remove the requests whose cancel was asked for (waiting or in a slot)."""
        gone = [r for r in self.waiting if r.cancel_requested]
        for req in gone:
            self.waiting.remove(req)
        for i, s in enumerate(self.active):
            if s is not None and s.req.cancel_requested:
                gone.append(s.req)
                self.active[i] = None
        return gone

    def take_all(self) -> list[Request]:
        """Remove every request (waiting first, then the slots') when the engine stops."""
        gone = list(self.waiting)
        self.waiting.clear()
        for i, s in enumerate(self.active):
            if s is not None:
                gone.append(s.req)
                self.active[i] = None
        return gone

    def free(self, i: int) -> None:
        self.active[i] = None

    # -------------------------------------------------------------- a step's plan
    def decoding(self) -> bool:
        return any(s is not None and s.next_token is not None for s in self.active)

    def next_chunk(self) -> Chunk | None:
        """The next chunk of the oldest admitted prompt still loading (None when none is)."""
        joining = [(i, s) for i, s in enumerate(self.active)
                   if s is not None and s.next_token is None]
        if not joining:
            return None
        i, s = min(joining, key=lambda x: x[1].req.admitted_at or 0.0)
        decoding = self.decoding()
        size = self.chunks.size(len(s.feed) - s.prefilled, decoding)
        return Chunk(i, s, s.feed[s.prefilled:s.prefilled + size], size, decoding)

    def decode_batch(self) -> DecodeBatch | None:
        """The slots with a next token as one decode run (None when there are none)."""
        rows = [(i, s) for i, s in enumerate(self.active)
                if s is not None and s.next_token is not None]
        if not rows:
            return None
        first, last = rows[0][0], rows[-1][0]
        tokens, held = [], []
        for j in range(first, last + 1):
            s = self.active[j]
            if s is not None and s.next_token is not None:
                tokens.append(s.next_token)
                held.append(s.held)
            else:
                tokens.append(0)
                held.append(s.held if s is not None else 0)
        return DecodeBatch(first, tokens, held, rows)

