"""Scoring: the log-probability a model gives to text, token by token, and its perplexity.

Torch-free (numpy + the runtime's Decoder). The figures match transformers' loss:

- Convention: `<|endoftext|>` (the model's bos) is put before each text, so every token of the
  text is scored, the first one predicted from bos alone. This equals transformers'
  `model(ids, labels=ids).loss` with `ids = [bos] + text_ids` (the label of position 0 is shifted
  out there). With `add_bos=False` the text's first token is context only and is not scored,
  exactly like transformers' loss on `text_ids`.
- Texts longer than the model's `n_positions` are scored in sliding windows of `n_positions`
  tokens starting every `stride` tokens (default n_positions // 2): each window scores only the
  tokens after the previous window's end, so they have at least n_positions - stride tokens of
  context (the loop of transformers' "Perplexity of fixed-length models" guide). Every token is
  scored exactly once; the first window is the start of the text, bos included.
- Log-probabilities are natural logs; perplexity = exp(-total log-prob / tokens).

Two ways to get the logits of every position ("auto" picks the first whenever the graph can):
- "all": one forward per batch of windows, left-padded with attention masks and position_ids =
  cumsum(mask) - 1, asking for the logits of every position. optimum's graph returns every row;
  the fused graphs (kv_layout "shared") return the rows their `logits_index` input names, which
  the shared-KV decoder sets to every position at prefill (`all_logits`): one prefill per batch
  of windows on both.
- "step": the window is fed one token per step through the KV cache, for a graph that can only
  return its last row (io.logits_rows "last" with a concat cache). Slower, same figures. Rows of
  a batch are right-padded with filler tokens instead (causal attention: filler after a row's
  end cannot change the logits of that row's real positions, which are the only ones read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpt2_onnx.runtime.decoder import Decoder
from gpt2_onnx.runtime.sampling import log_softmax, top_logprobs
from gpt2_onnx.runtime.validation import check_int, check_token_ids

MODES = ("auto", "all", "step")


@dataclass(frozen=True)
class TextScore:
    """How likely the model finds one text."""

    text: str | None  # None when scored from token ids
    token_ids: list[int]  # the scored tokens, in order (bos not included)
    logprobs: np.ndarray  # float64 [n_tokens]: log p(token | everything before it), natural log

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def total_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-prob); nan when no token was scored (empty text)."""
        return float(np.exp(-self.logprobs.mean())) if self.n_tokens else float("nan")


@dataclass(frozen=True)
class _Window:
    """A slice of one sequence short enough for the model, and which of its tokens to score."""

    seq: int  # index of the sequence it belongs to
    ids: list[int]  # the window's tokens (context + scored)
    first: int  # index in `ids` of the first token to score (>= 1)
    offset: int  # where ids[first] goes in that sequence's array of scored tokens


def _kind(value: object) -> str:
    """What a wrong argument is, for a message: the type, and the bad element of a list."""
    if isinstance(value, (list, tuple)):
        bad = next((t for t in value if not isinstance(t, str)), None)
        return f"a list holding {type(bad).__name__}"
    return type(value).__name__


def perplexity(scores: Sequence[TextScore]) -> float:
    """Perplexity over all tokens of all scores (token-weighted, not a mean of perplexities)."""
    n = sum(s.n_tokens for s in scores)
    if n == 0:
        raise ValueError("perplexity: no scored tokens (all texts empty)")
    total = sum(s.total_logprob for s in scores)
    return float(np.exp(-total / n))


def score_texts(generator: Any, texts: Sequence[str], *, batch_size: int = 8,
                add_bos: bool = True, stride: int | None = None, mode: str = "auto"
                ) -> list[TextScore]:
    """Score each text under the generator's model (see the module docstring for conventions).

    generator: a loaded TextGenerator (its `encode` and `decoder` are used).
    batch_size: windows per forward (memory: batch_size x n_positions x vocab float32 logits).
    stride: tokens a window advances by for texts longer than n_positions, in [1, n_positions-1].
    mode: "auto" (by the variant's io.logits_rows), "all" or "step".
    """
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts: give a string or a list of strings, got {_kind(texts)}")
    ids = [generator.encode(t) for t in texts]
    scores = score_ids(generator.decoder, ids, batch_size=batch_size, add_bos=add_bos,
                       stride=stride, mode=mode)
    return [TextScore(t, s.token_ids, s.logprobs) for t, s in zip(texts, scores, strict=True)]


def score_ids(decoder: Decoder, sequences: Sequence[Sequence[int]], *, batch_size: int = 8,
              add_bos: bool = True, stride: int | None = None, mode: str = "auto"
              ) -> list[TextScore]:
    """`score_texts` from token ids (one list per text), on a Decoder directly."""
    dims = decoder.dims
    window = dims.n_positions
    stride = window // 2 if stride is None else stride
    _check_settings(batch_size, stride, window, mode)
    batch_size, stride = int(batch_size), int(stride)
    if not isinstance(sequences, (list, tuple)):
        raise ValueError("sequences: give a list of token-id lists (one per text), got "
                         f"{type(sequences).__name__}")
    seqs = [check_token_ids(f"sequence {i}", s, dims.vocab_size)
            for i, s in enumerate(sequences)]
    full = [([dims.bos_token_id] + s) if add_bos else s for s in seqs]
    windows = [w for i, s in enumerate(full) for w in plan_windows(s, i, window, stride)]
    out = [np.zeros(max(len(s) - 1, 0), dtype=np.float64) for s in full]
    # Longest first, so a batch holds windows of similar length (little padding).
    windows.sort(key=lambda w: -len(w.ids))
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        for w, logits in zip(batch, batch_logits(decoder, [w.ids for w in batch], mode=mode),
                             strict=True):
            # logits[j] predicts ids[j + 1]
            rows = logits[w.first - 1:len(w.ids) - 1]  # [k, vocab]
            targets = np.asarray(w.ids[w.first:], dtype=np.int64)  # [k]
            out[w.seq][w.offset:w.offset + len(targets)] = log_softmax_at(rows, targets)
    return [TextScore(None, s[1:], lp) for s, lp in zip(full, out, strict=True)]


def plan_windows(seq: Sequence[int], index: int, window: int, stride: int) -> list[_Window]:
    """Windows of at most `window` tokens starting every `stride` tokens, covering seq[1:] once.

    Window k spans seq[k*stride : k*stride + window] and scores the tokens after the previous
    window's end (the guide's loop), so each has at least window - stride tokens of context.
    """
    n = len(seq)
    out: list[_Window] = []
    begin, prev_end = 0, 1  # seq[0] is never scored: nothing predicts it
    while prev_end < n:
        end = min(begin + window, n)
        first = prev_end - begin  # >= 1 because stride < window
        out.append(_Window(index, list(seq[begin:end]), first, prev_end - 1))
        prev_end, begin = end, begin + stride
    return out


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, chunk: int = 64) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] for each row, float64 [k] (logits float32 [k, vocab]).

    Rows go through the shared `log_softmax` in float64 `chunk` at a time (a window of 1024
    positions would otherwise need a 400 MB float64 copy)."""
    return log_softmax_top(logits, targets, 0, chunk)[0]


def log_softmax_top(logits: np.ndarray, targets: np.ndarray, k: int, chunk: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's target logprob and its k most probable entries, all read from the same
    float64 log-softmax row (so a target that is the argmax has a bit-identical top value;
    lm-eval's is_greedy compares them with ==).

    logits float [n, vocab], targets int [n]. Returns (scores float64 [n], top ids int64 [n, k],
    top logprobs float64 [n, k]); k = 0 gives empty [n, 0] tops.
    """
    n = len(targets)
    scores = np.zeros(n, dtype=np.float64)  # [n]
    top_ids = np.zeros((n, k), dtype=np.int64)  # [n, k]
    top_lps = np.zeros((n, k), dtype=np.float64)  # [n, k]
    for a in range(0, n, chunk):
        rows = log_softmax(logits[a:a + chunk])  # [c, vocab], float64
        scores[a:a + chunk] = np.take_along_axis(rows, targets[a:a + chunk, None], axis=1)[:, 0]
        if k:
            for j, row in enumerate(rows):
                top_ids[a + j], top_lps[a + j] = top_logprobs(row, k)
    return scores, top_ids, top_lps


def batch_logits(decoder: Decoder, sequences: Sequence[Sequence[int]], *, mode: str = "auto"
                 ) -> list[np.ndarray]:
    """Logits at every position of each sequence: float32 [len(seq), vocab] per sequence.

    Row j holds the model's logits for the token after seq[j]. Each sequence must be 1 to
    n_positions tokens long. All sequences run as one batch.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) < 1 or max(lengths) > decoder.dims.n_positions:
        raise ValueError(f"each sequence needs 1 to {decoder.dims.n_positions} tokens "
                         f"(n_positions); got lengths {sorted(set(lengths))[:5]}")
    if mode == "auto":
        variant = decoder.variant
        mode = "all" if variant.io.logits_rows == "all" or variant.shared_kv else "step"
    if mode == "all":
        return _logits_all_rows(decoder, sequences)
    return _logits_stepwise(decoder, sequences)


def _logits_all_rows(decoder: Decoder, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """One forward over the left-padded batch, asking for every position's logits."""
    batch, width = len(sequences), max(len(s) for s in sequences)
    pad_id = decoder.dims.eos_token_id
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)  # [batch, width]
    mask = np.zeros((batch, width), dtype=np.int64)  # [batch, width]; 0 = left padding
    for r, s in enumerate(sequences):
        input_ids[r, width - len(s):] = s
        mask[r, width - len(s):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # [batch, width]
    cache = decoder.start(batch, width)
    logits, _ = decoder.forward(cache, input_ids, mask, positions, all_logits=True)
    # logits: [batch, width, vocab]
    return [logits[r, width - len(s):] for r, s in enumerate(sequences)]


def _logits_stepwise(decoder: Decoder, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """One token per step through the KV cache (for graphs that return only the last row).

    Rows are right-padded with filler tokens and every position is attended (mask 1): the
    filler sits after a row's end, so causal attention keeps it out of that row's real logits.
    """
    batch, width = len(sequences), max(len(s) for s in sequences)
    vocab = decoder.dims.vocab_size
    input_ids = np.full((batch, width), decoder.dims.eos_token_id, dtype=np.int64)
    for r, s in enumerate(sequences):
        input_ids[r, :len(s)] = s
    out = [np.empty((len(s), vocab), dtype=np.float32) for s in sequences]
    cache = decoder.start(batch, width)
    for t in range(width):
        mask = np.ones((batch, t + 1), dtype=np.int64)  # [batch, past + 1]
        positions = np.full((batch, 1), t, dtype=np.int64)  # [batch, 1]
        logits, cache = decoder.forward(cache, input_ids[:, t:t + 1], mask, positions)
        # logits: [batch, vocab]
        for r, s in enumerate(sequences):
            if t < len(s):
                out[r][t] = logits[r]
    return out


def _check_settings(batch_size: int, stride: int, window: int, mode: str) -> None:
    check_int("batch_size", batch_size, 1)
    check_int("stride", stride, 1, window - 1, hint=" (n_positions - 1)")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
