"""The engine's settings and their defaults: the one home of "8 slots, a queue of 64, chunks of
64 tokens, a budget of 0.8".

The Engine's keywords, TextGenerator's own engine, `gpt2-onnx serve`'s options, ServeOptions
and the Ray replica all read their defaults from `EngineConfig` (imports nothing: the CLI reads
it at startup).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Continuous batching settings (see engine.Engine for what each one does)."""

    slots: int = 8  # requests decoded together (each holds one slot's KV buffers)
    max_queue: int = 64  # requests that may wait for a slot; one more is refused
    prefill_chunk: int = 64  # prompt tokens loaded per step at most while others decode
    prefill_budget: float | None = 0.8  # a chunk's time as a share of a decode run; None: fixed
    max_len: int | None = None  # positions per slot; None: the model's n_positions
    idle_stop: float | None = None  # seconds idle before the thread and buffers go; None: never

    def problems(self, n_positions: int | None = None) -> list[str]:
        """Every setting outside its range, one message each (max_len checked against
        `n_positions` when given)."""
        out = []
        for name, value, low in (("slots", self.slots, 1), ("max_queue", self.max_queue, 0),
                                 ("prefill_chunk", self.prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                out.append(f"{name} must be an integer >= {low}, got {value!r}")
        if n_positions is not None and self.max_len is not None and (
                isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                or not 2 <= self.max_len <= n_positions):
            out.append(f"max_len must be in [2, {n_positions}] (n_positions), "
                       f"got {self.max_len!r}")
        budget = self.prefill_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(
                budget, (int, float)) or not 0 < budget <= 100):
            out.append(f"prefill_budget must be None or in (0, 100], got {budget!r}")
        if self.idle_stop is not None and not self.idle_stop > 0:
            out.append(f"idle_stop must be None or > 0 seconds, got {self.idle_stop!r}")
        return out


DEFAULTS = EngineConfig()
