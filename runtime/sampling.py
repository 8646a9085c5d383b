"""Next-token choice: pure numpy functions over a logits row and an explicit `np.random.Generator`.

Nothing here knows about the model. The generation loop hands `sample_token` the last position's
logits [vocab], the settings and its own generator; `candidate_probs` composes the steps below
(apply_repetition_penalty, top_k_ids, apply_temperature, softmax, nucleus_mask): the same
functions the tests check one by one. No function mutates its input.

Order (as in transformers' `generate`): repetition penalty -> greedy argmax, or top-k ->
temperature -> softmax -> top-p -> one draw (top-k before temperature: dividing by T > 0 keeps
the order, so the same k tokens win).

The draw uses exactly one `rng.random()` per sampled token and picks among the kept candidates
*in token-id order* (cumulative sum + searchsorted). So a seed fixes the tokens, and two logits rows
that differ by ~1e-5 (onnxruntime vs PyTorch) give the same token unless the uniform falls within
~1e-5 of a boundary: ordering by probability instead would reorder near-equal candidates and move
whole intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpt2_onnx.runtime.validation import (
    check_all,
    check_bool,
    check_float,
    check_int,
    check_optional_int,
)

# Top-p without top-k looks for the nucleus among the `_NUCLEUS_START` most probable tokens first
# and widens by `_NUCLEUS_GROWTH` until it is found: a partial partition instead of a full sort of
# the vocabulary (50257 tokens: ~0.4 ms per try vs ~2 ms for np.sort).
_NUCLEUS_START = 1024
_NUCLEUS_GROWTH = 8


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token. Defaults sample; `greedy=True` or `temperature=0` is argmax."""

    greedy: bool = False  # always take the most likely token (no randomness)
    top_k: int | None = 50  # keep the k most likely tokens; None keeps all
    top_p: float = 1.0  # keep the fewest most likely tokens with mass >= top_p; 1 keeps all
    temperature: float = 1.0  # divide logits by this; 0 means greedy
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence; 1 is off

    def validate(self, vocab_size: int) -> None:
        """Raise one ParameterError (a ValueError) listing every setting outside its allowed
        range (`.problems`: each bad setting's name and message).

        Any finite value in range is safe: the row is scaled in an order that cannot overflow
        (see `apply_temperature`, `apply_repetition_penalty`), subnormal and huge values included.
        """
        check_all(
            lambda: check_bool("greedy", self.greedy),
            lambda: check_optional_int("top_k", self.top_k, 1, vocab_size,
                                       hint=" (the vocabulary size) or None"),
            lambda: check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True),
            lambda: check_float("temperature", self.temperature, 0.0, hint=" (0 means greedy)"),
            lambda: check_float("repetition_penalty", self.repetition_penalty, 0.0,
                                lo_open=True, hint=" (1 is off)"),
            prefix="invalid sampling settings: ",
        )

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (greedy flag or temperature 0)."""
        return bool(self.greedy) or self.temperature == 0


def _check_row(logits: np.ndarray) -> None:
    """Refuse all but one non-empty float row without nan or +inf (-inf marks masked tokens)."""
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be one row [vocab], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits contain nan or +inf (in fp16 graphs: overflow; keep logits fp32)")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Penalize tokens already in the sequence (CTRL's rule, as transformers applies it).

    For every id in `seen` (duplicates count once): a negative logit is multiplied by `penalty`,
    any other is divided by it. Returns a new array of the same dtype. Computed in float64 and
    saturated at the dtype's largest finite value, so an extreme penalty (1e-300, 1e300) leaves
    finite logits finite (the same bits as float32 arithmetic whenever that does not overflow).
    """
    out = logits.copy()  # [vocab]
    seen = np.asarray(seen)  # int [n], prompt + generated ids
    if seen.size == 0 or penalty == 1.0:
        return out
    if not np.issubdtype(seen.dtype, np.integer):
        raise ValueError(f"seen must hold integer token ids, got dtype {seen.dtype}")
    ids = np.unique(seen)  # int [m], sorted
    if ids[0] < 0 or ids[-1] >= logits.shape[-1]:
        raise ValueError(
            f"seen holds token ids outside [0, {logits.shape[-1] - 1}]: {ids[0]}..{ids[-1]}"
        )
    picked = out[..., ids].astype(np.float64)  # [m]
    p = float(penalty)
    with np.errstate(over="ignore", under="ignore"):
        scaled = np.where(picked < 0, picked * p, picked / p)  # [m], float64
    big = float(np.finfo(out.dtype).max)
    finite = np.isfinite(picked)  # -inf (masked) stays -inf
    out[..., ids] = np.where(finite, np.clip(scaled, -big, big), picked)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Logits divided by a temperature > 0 (< 1 sharpens, > 1 flattens), shifted so the largest
    is 0: float64 (x - max) / T. Same softmax as x / T, but it cannot overflow for any finite
    T > 0 (1e-308 and subnormals included): every value is <= 0, the far ones become -inf
    (probability 0, their limit). Returns a new float64 array."""
    t = check_float("temperature", temperature, 0.0, lo_open=True,
                    hint=" here (use greedy_pick for 0)")
    x = np.asarray(logits, dtype=np.float64)  # [..., m]
    top = x.max(axis=-1, keepdims=True)  # [..., 1]
    if not np.isfinite(top).all():
        raise ValueError("temperature needs at least one finite logit per row and no nan or +inf")
    with np.errstate(over="ignore", under="ignore"):
        return (x - top) / t


def _top_k_unordered(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, unordered. Exactly k: among ties at the k-th value, any of them
    (transformers' TopKLogitsWarper keeps every tie instead)."""
    if k >= logits.shape[-1]:
        return np.arange(logits.shape[-1])
    return np.argpartition(logits, -k)[-k:]  # [k]


def top_k_ids(logits: np.ndarray, k: int | None) -> np.ndarray:
    """Ids of the k largest logits in ascending id order (all ids when k is None): int64 [k]."""
    if k is None:
        return np.arange(logits.shape[-1], dtype=np.int64)
    k = check_int("top_k", k, 1)
    return np.sort(_top_k_unordered(logits, k)).astype(np.int64)


def nucleus_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """Bool mask [n] of the smallest set of most probable entries whose mass reaches p (>= 1 kept).

    `probs` may be in any order and need not sum to 1 exactly; ties at the edge go to the lower
    index. p = 1 keeps every entry of nonzero probability. Sorts only the tokens that can be in
    the nucleus when that is few (see _NUCLEUS_START).
    """
    p = check_float("top_p", p, 0.0, 1.0, lo_open=True)
    n = probs.shape[0]
    keep = np.zeros(n, dtype=bool)
    if p >= 1.0:
        keep[probs > 0] = True
        return keep
    # Candidates: the m most probable, widened until they hold mass p (or are everything).
    pool = np.arange(n)
    m = _NUCLEUS_START
    while m < n:
        part = np.argpartition(probs, -m)[-m:]  # [m], unordered
        if probs[part].sum() >= p:
            pool = np.sort(part)  # [m], ascending ids
            break
        m *= _NUCLEUS_GROWTH
    pool_probs = probs[pool]  # [m]
    desc = np.sort(pool_probs)[::-1]  # [m], descending
    cum = np.cumsum(desc)  # [m], mass of the j + 1 most probable
    n_keep = min(int(np.searchsorted(cum, p, side="left")) + 1, pool.shape[0])
    # Keep all above the edge value, then the lowest ids among those equal to it.
    edge = desc[n_keep - 1]
    keep[pool[pool_probs > edge]] = True
    ties = pool[pool_probs == edge]  # ascending ids
    keep[ties[: n_keep - int(keep.sum())]] = True
    return keep


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64; -inf logits get probability 0."""
    x = np.asarray(logits, dtype=np.float64)  # [..., vocab]
    top = x.max(axis=-1, keepdims=True)  # [..., 1]
    if not np.isfinite(top).all():
        raise ValueError("softmax needs at least one finite logit per row and no nan or +inf")
    e = np.exp(x - top)  # exp(-inf) = 0
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """Row-wise log softmax over the last axis ([..., vocab] -> same shape), the one
    implementation scoring, verify and the benchmarks share.

    dtype: float64 (default) for exact figures; float32 halves the memory of a huge prefill
    (~50 M logits) at an absolute error of ~1e-6. The sum of exponentials is always accumulated
    in float64. Returns a new array of `dtype`.
    """
    x = np.array(logits, dtype=dtype)  # [..., vocab], a copy
    x -= x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64))  # [..., 1]
    x -= lse.astype(dtype)
    return x


def greedy_pick(logits: np.ndarray) -> int:
    """The most likely token id (the lowest id among ties, like torch.argmax)."""
    return int(np.argmax(logits))


def candidate_probs(
    logits: np.ndarray,  # float [vocab], one position
    settings: SamplingSettings,
    seen: np.ndarray | None = None,  # int [n], ids already in the sequence
) -> tuple[np.ndarray, np.ndarray]:
    """The distribution `sample_token` draws from: kept ids in ascending order and their probs.

    Returns (ids int64 [m], probs float64 [m], summing to 1). For a greedy setting: the argmax with
    probability 1.
    """
    _check_row(logits)
    settings.validate(logits.shape[0])
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.is_greedy:
        return np.array([greedy_pick(logits)], dtype=np.int64), np.ones(1)
    ids = top_k_ids(logits, settings.top_k)  # [m], ascending
    probs = softmax(apply_temperature(logits[ids], settings.temperature))  # [m]
    keep = nucleus_mask(probs, settings.top_p) & (probs > 0)  # bool [m]
    ids, probs = ids[keep], probs[keep]
    return ids, probs / probs.sum()


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index into `probs` [m] chosen with exactly one rng.random(): searchsorted on the cdf."""
    cdf = np.cumsum(probs)  # [m]
    u = rng.random() * cdf[-1]
    i = int(np.searchsorted(cdf, u, side="right"))  # first cdf > u: never a zero-probability entry
    return min(i, int(np.flatnonzero(probs)[-1]))  # u * cdf[-1] may round up to cdf[-1]


def sample_token(
    logits: np.ndarray,  # float [vocab], one position
    settings: SamplingSettings,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,  # int [n], prompt + generated ids (for repetition_penalty)
) -> int:
    """Pick the next token id: argmax if greedy, else one draw from `candidate_probs`.

    Greedy uses no randomness; sampling uses exactly one `rng.random()` per call.
    """
    ids, probs = candidate_probs(logits, settings, seen)
    if settings.is_greedy:
        return int(ids[0])
    return int(ids[_draw(probs, rng)])


def top_logprobs(logprobs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n highest entries of one log-softmax row (descending; ties by id) and their values,
    read from that same row: a caller that also reads its chosen token's logprob from `logprobs`
    gets bit-identical numbers for the argmax (lm-eval's is_greedy compares them with ==).

    logprobs: float [vocab] (e.g. `log_softmax(logits)`). Returns (ids int64 [n], values [n]).
    """
    n = check_int("n", n, 1)
    ids = _top_k_unordered(logprobs, n)  # [n], unordered
    ids = ids[np.lexsort((ids, -logprobs[ids]))]  # descending, ties by id
    return ids.astype(np.int64), logprobs[ids]


def top_candidates(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n most probable ids (descending; ties by id) and their probs under softmax(logits).

    Raw logits, no filtering: for explaining a step. n above the vocabulary size returns all.
    Returns (ids int64 [n], probs float64 [n]).
    """
    _check_row(logits)
    ids, logprobs = top_logprobs(log_softmax(logits), n)  # one ranking, as the server's
    return ids, np.exp(logprobs)
