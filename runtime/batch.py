"""Static batches: rows that start together, and StepGenerator, one row driven by hand.

Both drive the same two pieces as the engine — a model runner (`runner.PaddedBatch`) and the
per-row output step (`output.Sequence.accept`) — over a left-padded batch instead of KV slots.

Why this driver is not the engine's (engine.py):
- optimum's concat-KV graphs (fp32, fp16) cannot use the engine at all: their cache is a new
  tensor per step for the whole batch, so no request can join or leave a running batch.
- For a batch that starts together on a shared-KV graph it is faster today, measured on random
  gpt2-large int4, 8 prompts x 48 tokens: 70-80 tok/s here against 38-43 on the engine
  (docs/engine.md). Here every prompt is prefilled in one left-padded run over a cache
  of width + max_new_tokens positions; the engine loads prompts one slot at a time (batch 1:
  GroupQueryAttention takes several new tokens over a past only for batch 1) into slots of
  n_positions. So `TextGenerator.generate_ids` sends a list of prompts here and a single
  prompt (which may share a batch with other threads' calls) to the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import numpy as np
from tokenizers import Tokenizer

from gpt2_onnx.runtime.decoder import Decoder
from gpt2_onnx.runtime.engine import EngineModel
from gpt2_onnx.runtime.manifest import ModelDims
from gpt2_onnx.runtime.output import Sequence
from gpt2_onnx.runtime.params import GenerationParams
from gpt2_onnx.runtime.results import GenerationResult, Timings, TokenEvent
from gpt2_onnx.runtime.runner import PaddedBatch


def static_batch(decoder: Decoder, tokenizer: Tokenizer, dims: ModelDims, rows: list[list[int]],
                 texts: list[str], params: GenerationParams) -> Iterator[list]:
    """Rows as one static batch (all start together; the batch lives until its longest row
    ends). Yields each step's events (one per row, None for a finished row), then the
    results (a list of GenerationResult, the last yield)."""
    seqs = [Sequence(tokenizer, dims, ids, params) for ids in rows]
    t0 = time.perf_counter()
    prefill_ms, decode_s = 0.0, 0.0
    if params.max_new_tokens > 0:
        batch = PaddedBatch(decoder, [s.feed for s in seqs], params.max_new_tokens)
        logits = batch.prefill()  # [batch, vocab]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        t_decode = time.perf_counter()
        while True:
            events = [None if s.done else s.accept(logits[r]) for r, s in enumerate(seqs)]
            if all(s.done for s in seqs):
                decode_s = time.perf_counter() - t_decode
                yield events
                break
            yield events
            # Finished rows feed EOS (their logits are not read again).
            logits = batch.step([s.ids[-1] if not s.done else dims.eos_token_id for s in seqs])
        del batch
    else:
        for s in seqs:
            s.finish("length")
    decoded = [max(len(s.ids) - 1, 0) for s in seqs]
    yield [GenerationResult(
        prompt=text, prompt_ids=ids, ids=s.ids, text=s.text,
        finish_reason=s.finish_reason or "length",
        timings=Timings(prefill_ms=prefill_ms, decode_ms=decode_s * 1e3,
                        decode_tokens_per_s=n / decode_s if n and decode_s else 0.0,
                        ttft_ms=prefill_ms),
        steps=s.steps) for s, ids, text, n in zip(seqs, rows, texts, decoded, strict=True)]


class StepGenerator:
    """Drive one sequence by hand, step by step (onnxruntime-genai's Generator):

        g = StepGenerator(text_generator, GenerationParams(max_new_tokens=20, seed=1))
        g.append_tokens(text_generator.encode("Hello"))
        while not g.is_done():
            ev = g.generate_next_token()      # a TokenEvent
        g.get_logits()                        # the last logits [vocab]

    Works with every variant: a static batch of one row on the generator's decoder. Its
    `append_tokens` may be called again between steps (e.g. a tool's output): the tokens join
    the context (fed one at a time, as any graph accepts). Tokens appended count toward the
    positions, not toward max_new_tokens.
    """

    def __init__(self, generator: EngineModel, params: GenerationParams | None = None) -> None:
        self.generator = generator
        self.params = GenerationParams() if params is None else params
        self.params.validate(generator.manifest.dims)
        self.dims = generator.manifest.dims
        self._context: list[int] = []  # every id fed or to feed (prompt, appended, generated)
        self._fed = 0  # ids of _context already in the cache
        self._batch: PaddedBatch | None = None
        self._logits: np.ndarray | None = None  # [vocab] after the last fed id
        self.seq: Sequence | None = None

    @property
    def tokens(self) -> list[int]:
        """Every id of the sequence: prompt, appended and generated."""
        return list(self._context)

    def append_tokens(self, ids: Seq[int]) -> None:
        """Add ids to the context (the prompt first); they are fed at the next step."""
        self.generator.check_ids(ids, "ids")
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
        if self._batch is None:  # the prompt: one run
            self._batch = PaddedBatch(self.generator.decoder, [new],
                                      max_len=self.dims.n_positions)
            self._logits = self._batch.prefill()[0]
            self._fed += len(new)
            return
        for token in new:  # several tokens over a past: one at a time (any graph accepts that)
            self._logits = self._batch.step([token])[0]
            self._fed += 1
