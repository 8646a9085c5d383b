"""The model runners: bind the KV buffers, run the session, hand logits to output processing.

- `SlotRunner` (the engine's): a SlotCache of fixed slots, one request per slot; a joining
  prompt is loaded into its slot chunk by chunk (batch 1), and one decode run covers a range of
  slots bound by address. The buffers are allocated at the first run and freed by `release`.
- `PaddedBatch` (static batches and StepGenerator): rows that start together, left-padded into
  one prefill run over any Decoder, then one token per row per step.

Both return float32 logits and keep the cache to themselves; sampling and text are
output.py's, who runs when is the scheduler's (scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.runtime.decoder import Decoder

if TYPE_CHECKING:
    from gpt2_onnx.runtime.shared_kv import SharedKVDecoder, SlotCache


class SlotRunner:
    """Runs a shared-KV decoder over `slots` KV slots of `max_len` positions each."""

    def __init__(self, decoder: SharedKVDecoder, slots: int, max_len: int) -> None:
        self.decoder = decoder
        self.slots = slots
        self.max_len = max_len
        self._cache: SlotCache | None = None

    @property
    def allocated(self) -> bool:
        return self._cache is not None

    def cache(self) -> SlotCache:
        """The slots' buffers (allocated on first use)."""
        if self._cache is None:
            self._cache = self.decoder.start_slots(self.slots, self.max_len)
        return self._cache

    def release(self) -> None:
        """Free the buffers (the next run allocates them again, zeroed)."""
        self._cache = None

    def prefill(self, slot: int, ids: Sequence[int], start: int) -> tuple[np.ndarray, float]:
        """Append `ids` to `slot`, which holds `start` positions: (logits [vocab] of the last
        one, seconds the run took)."""
        cache = self.cache()
        t0 = time.perf_counter()
        logits = self.decoder.prefill_slot(cache, slot, ids, start)
        return logits, time.perf_counter() - t0

    def decode(self, first: int, tokens: Sequence[int], held: Sequence[int]
               ) -> tuple[np.ndarray, float]:
        """One token for each slot of [first, first + len(tokens)): (logits [rows, vocab],
        seconds the run took)."""
        cache = self.cache()
        t0 = time.perf_counter()
        logits = self.decoder.decode_slots(cache, first, tokens, held)  # [rows, vocab]
        return logits, time.perf_counter() - t0


class PaddedBatch:
    """Rows of token ids of different lengths as one static batch over any Decoder.

    Owns the padding and positions the graph needs, so callers hand rows of ids: the prompts
    are left-padded (mask 0, position ids from the mask's cumulative sum, as optimum 775
    requires) for the prefill, then every step appends one token per row and continues each
    row's positions. The cache lives here, for the batch's lifetime.
    """

    def __init__(self, decoder: Decoder, rows: list[list[int]], max_new_tokens: int = 0, *,
                 max_len: int | None = None) -> None:
        """max_len: positions the cache holds (default the prompts' width + max_new_tokens)."""
        if not rows or any(len(r) < 1 for r in rows):
            raise ValueError("PaddedBatch: every row needs at least one token")
        self.decoder = decoder
        self.rows = rows
        self.width = max(len(r) for r in rows)
        self.cache = decoder.start(len(rows), self.width + max_new_tokens if max_len is None
                                   else max_len)
        self.mask = np.zeros((len(rows), 0), dtype=np.int64)  # [batch, fed]; 0 = padding
        self.last_pos = np.zeros(len(rows), dtype=np.int64)  # [batch]

    def prefill(self) -> np.ndarray:
        """Run the left-padded prompts; logits [batch, vocab] of each row's last token."""
        batch, width = len(self.rows), self.width
        eos = self.decoder.dims.eos_token_id
        input_ids = np.full((batch, width), eos, dtype=np.int64)  # [batch, width]
        mask = np.zeros((batch, width), dtype=np.int64)  # [batch, width]
        for r, ids in enumerate(self.rows):
            input_ids[r, width - len(ids):] = ids
            mask[r, width - len(ids):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # [batch, width]
        logits, self.cache = self.decoder.forward(self.cache, input_ids, mask, positions)
        self.mask, self.last_pos = mask, positions[:, -1]
        return logits

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token per row; logits [batch, vocab] after it."""
        batch = len(self.rows)
        self.mask = np.concatenate([self.mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        self.last_pos = self.last_pos + 1
        next_ids = np.asarray(tokens, dtype=np.int64)[:, None]  # [batch, 1]
        logits, self.cache = self.decoder.forward(self.cache, next_ids, self.mask,
                                                  self.last_pos[:, None])
        return logits
