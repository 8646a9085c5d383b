"""Sampling: pure numpy units against hand-computed values, brute-force references and
transformers' logits processors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpt2_onnx.runtime.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    candidate_probs,
    greedy_pick,
    log_softmax,
    nucleus_mask,
    sample_token,
    softmax,
    top_candidates,
    top_k_ids,
)

VOCAB = 50257

# Logit rows: small vocabularies, values a real model could give (finite, moderate).
logit_rows = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: arrays(
        np.float32,
        n,
        elements=st.floats(-20, 20, width=32, allow_nan=False, allow_infinity=False),
    )
)


def plain_softmax(row: list[float]) -> list[float]:
    """Softmax the way it is written on paper, in Python floats."""
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def nucleus_size(probs: list[float], p: float) -> int:
    """Brute force: sort descending, accumulate, 1 + first index where the sum reaches p."""
    cum = 0.0
    for i, q in enumerate(sorted(probs, reverse=True)):
        cum += q
        if cum >= p:
            return i + 1
    return len(probs)


def gpt2_like_logits(seed: int, vocab: int = VOCAB) -> np.ndarray:
    """A float32 row [vocab] with a few strong tokens over a broad tail, like a real LM step."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, vocab).astype(np.float32)  # [vocab]
    logits[rng.integers(0, vocab, 5)] += 8.0
    return logits


# --- hand-computed values ------------------------------------------------------------------------


def test_repetition_penalty_hand_values():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1]), 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0])  # input untouched
    assert out.dtype == np.float32


def test_repetition_penalty_counts_repeated_ids_once():
    logits = np.array([3.0, -1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([2, 2, 2, 1]), 1.5)
    np.testing.assert_allclose(out, [3.0, -1.5, 0.5 / 1.5], rtol=1e-6)


def test_repetition_penalty_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="seen"):
        apply_repetition_penalty(np.zeros(3, np.float32), np.array([3]), 2.0)
    with pytest.raises(ValueError, match="seen"):
        apply_repetition_penalty(np.zeros(3, np.float32), np.array([-1]), 2.0)


def test_temperature_hand_values():
    logits = np.array([2.0, -1.0, 0.0], dtype=np.float32)
    # [4, -2, 0] shifted so the largest is 0 (same softmax, no overflow)
    np.testing.assert_allclose(apply_temperature(logits, 0.5), [0.0, -6.0, -4.0])
    assert apply_temperature(logits, 0.5).dtype == np.float64
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_extreme_temperature_and_penalty_stay_finite():
    """Issue 19.2: T = 1e-308 used to overflow x / T to inf; the shifted form cannot."""
    logits = np.array([2.0, -1.0, 3.0, 0.5], dtype=np.float32)
    # T -> 0: (x - 3) / 1e-308 is -1e308 for x = 2, -inf for the others: all probability 0.
    np.testing.assert_array_equal(apply_temperature(logits, 1e-308),
                                  [-1e308, -np.inf, 0, -np.inf])
    np.testing.assert_array_equal(softmax(apply_temperature(logits, 1e-308)), [0, 0, 1, 0])
    np.testing.assert_array_equal(apply_temperature(logits, 5e-324), [-np.inf, -np.inf, 0, -np.inf])
    np.testing.assert_array_equal(softmax(apply_temperature(logits, 1e308)), [0.25] * 4)
    # penalty 1e-300 divides the seen positive logits 2 and 0.5 past float32: they saturate at
    # float32's max (a tie, so greedy takes the lower id, 0, as 2e300 > 0.5e300 would too).
    big = np.finfo(np.float32).max
    out = apply_repetition_penalty(logits, np.array([0, 1, 3]), 1e-300)
    np.testing.assert_array_equal(out, np.array([big, -1e-300, 3.0, big], dtype=np.float32))
    assert greedy_pick(out) == 0
    # penalty 1e300 multiplies the negative -1 to float32's -max, not -inf.
    out = apply_repetition_penalty(logits, np.array([1, 2]), 1e300)
    np.testing.assert_array_equal(out, np.array([2.0, -big, 3e-300, 0.5], dtype=np.float32))
    # Masked tokens (-inf) stay masked.
    masked = np.array([-np.inf, 1.0], dtype=np.float32)
    assert apply_repetition_penalty(masked, np.array([0, 1]), 1e-300)[0] == -np.inf


def test_softmax_hand_values_and_minus_inf():
    probs = softmax(np.array([0.0, math.log(3.0), -np.inf], dtype=np.float32))
    np.testing.assert_allclose(probs, [0.25, 0.75, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        softmax(np.full(3, -np.inf, dtype=np.float32))


def test_top_candidates_hand_values():
    logits = np.array([1.0, 3.0, 0.0, 2.0], dtype=np.float32)
    exps = [math.e**1, math.e**3, 1.0, math.e**2]
    total = sum(exps)
    ids, probs = top_candidates(logits, 3)
    np.testing.assert_array_equal(ids, [1, 3, 0])
    expected = [exps[1] / total, exps[3] / total, exps[0] / total]
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    ids_all, _ = top_candidates(logits, 10)
    np.testing.assert_array_equal(ids_all, [1, 3, 0, 2])


def test_top_k_and_top_p_hand_values():
    logits = np.array([0.0, 3.0, 1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(top_k_ids(logits, 2), [1, 3])
    np.testing.assert_array_equal(top_k_ids(logits, None), [0, 1, 2, 3])
    probs = softmax(logits)  # [0.032, 0.644, 0.087, 0.237]: 0.644 < 0.8 <= 0.644 + 0.237
    np.testing.assert_array_equal(nucleus_mask(probs, 0.8), [False, True, False, True])
    np.testing.assert_array_equal(nucleus_mask(probs, 0.5), [False, True, False, False])
    np.testing.assert_array_equal(nucleus_mask(probs, 1.0), [True] * 4)
    # What generation draws from: the same sets, renormalized.
    ids, p = candidate_probs(logits, SamplingSettings(top_k=None, top_p=0.8))
    np.testing.assert_array_equal(ids, [1, 3])
    np.testing.assert_allclose(p, probs[[1, 3]] / probs[[1, 3]].sum())
    ids, _ = candidate_probs(logits, SamplingSettings(top_k=2))
    np.testing.assert_array_equal(ids, [1, 3])


def test_log_softmax_hand_values_both_dtypes():
    row = np.array([[0.0, np.log(3.0)], [1.0, 1.0]], dtype=np.float32)
    expected = [[np.log(0.25), np.log(0.75)], [np.log(0.5), np.log(0.5)]]
    np.testing.assert_allclose(log_softmax(row), expected, rtol=1e-7)
    assert log_softmax(row).dtype == np.float64
    out32 = log_softmax(row, dtype=np.float32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, expected, rtol=1e-6)
    np.testing.assert_array_equal(row, [[0.0, np.float32(np.log(3.0))], [1.0, 1.0]])


def test_greedy_ignores_rng_and_takes_argmax():
    logits = np.array([0.1, 5.0, 4.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    for s in (SamplingSettings(greedy=True, top_k=None), SamplingSettings(top_k=2, temperature=0)):
        assert s.is_greedy
        assert sample_token(logits, s, rng) == 1
    assert rng.bit_generator.state == state  # greedy draws nothing
    assert greedy_pick(logits) == 1


def test_greedy_sees_repetition_penalty():
    logits = np.array([0.1, 5.0, 4.0, -1.0], dtype=np.float32)
    s = SamplingSettings(greedy=True, top_k=None, repetition_penalty=2.0)
    assert sample_token(logits, s, np.random.default_rng(0), seen=np.array([1])) == 2


# --- validate() ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": VOCAB + 1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ],
)
def test_validate_names_the_bad_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingSettings(**kwargs).validate(VOCAB)


def test_validate_lists_every_problem_and_accepts_good_settings():
    with pytest.raises(ValueError) as err:
        SamplingSettings(top_k=0, top_p=2.0, temperature=-1.0).validate(VOCAB)
    for name in ("top_k", "top_p", "temperature"):
        assert name in str(err.value)
    SamplingSettings().validate(VOCAB)
    SamplingSettings(top_k=None, top_p=0.9, temperature=0.0, repetition_penalty=1.3).validate(10)
    SamplingSettings(top_k=VOCAB, top_p=1.0).validate(VOCAB)


def test_sample_token_refuses_nan_logits():
    logits = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match="nan"):
        sample_token(logits, SamplingSettings(top_k=None), np.random.default_rng(0))


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(logits=logit_rows, data=st.data())
def test_top_k_never_draws_outside_the_k_largest(logits, data):
    k = data.draw(st.integers(1, logits.shape[0]))
    kth_largest = sorted(logits.tolist(), reverse=True)[k - 1]
    s = SamplingSettings(top_k=k, temperature=data.draw(st.floats(0.3, 3.0)))
    for seed in range(20):
        token = sample_token(logits, s, np.random.default_rng(seed))
        assert logits[token] >= kth_largest


@settings(max_examples=200, deadline=None)
@given(logits=logit_rows, p=st.floats(0.01, 0.999))
def test_top_p_keeps_exactly_the_smallest_set_with_mass_p(logits, p):
    probs = plain_softmax(logits.tolist())
    # Stay clear of float rounding exactly at a cumulative-sum boundary.
    cum = np.cumsum(sorted(probs, reverse=True))
    assume(np.min(np.abs(cum - p)) > 1e-9)
    size = nucleus_size(probs, p)
    kept = nucleus_mask(softmax(logits), p)  # bool [n]
    assert kept.sum() == size
    dropped = [q for q, k in zip(probs, kept, strict=True) if not k]
    assert min(q for q, k in zip(probs, kept, strict=True) if k) >= max(dropped, default=0.0)
    # sample_token draws from the same set.
    ids, _ = candidate_probs(logits, SamplingSettings(top_k=None, top_p=p))
    np.testing.assert_array_equal(ids, np.flatnonzero(kept))


@settings(max_examples=100, deadline=None)
@given(logits=logit_rows)
def test_softmax_sums_to_one(logits):
    probs = softmax(logits)
    assert probs.min() >= 0
    assert abs(probs.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(probs, plain_softmax(logits.tolist()), rtol=1e-9, atol=1e-15)


@settings(max_examples=100, deadline=None)
@given(logits=logit_rows)
def test_tiny_temperature_is_greedy(logits):
    top_two = sorted(logits.tolist(), reverse=True)[:2]
    assume(top_two[0] - top_two[1] > 0.01)  # a unique argmax, by a margin 1e-4 turns into 100
    s = SamplingSettings(top_k=None, temperature=1e-4)
    for seed in range(10):
        assert sample_token(logits, s, np.random.default_rng(seed)) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seeds_differ():
    logits = np.zeros(1000, dtype=np.float32)  # flat
    s = SamplingSettings(top_k=None)

    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sample_token(logits, s, rng) for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len({tuple(draws(seed)) for seed in range(10)}) == 10


def test_one_uniform_per_sampled_token():
    logits = gpt2_like_logits(0, vocab=100)
    for s in (SamplingSettings(), SamplingSettings(top_k=None, top_p=0.5)):
        rng, ref = np.random.default_rng(3), np.random.default_rng(3)
        sample_token(logits, s, rng)
        ref.random()
        assert rng.bit_generator.state == ref.bit_generator.state


def test_flat_logits_sample_uniformly():
    logits = np.zeros(4, dtype=np.float32)
    rng = np.random.default_rng(0)
    counts = np.bincount(
        [sample_token(logits, SamplingSettings(top_k=None), rng) for _ in range(4000)], minlength=4
    )
    assert counts.min() > 900  # expected 1000 each; 900 is > 6 standard deviations away


def test_draw_is_stable_under_tiny_logit_noise():
    """The same sampler fed onnxruntime-like and PyTorch-like logits (1e-5 apart) agrees."""
    base = gpt2_like_logits(1)
    noisy = base + np.random.default_rng(2).normal(0, 1e-5, VOCAB).astype(np.float32)
    for s in (SamplingSettings(), SamplingSettings(top_k=None, top_p=0.9)):
        same = sum(
            sample_token(base, s, np.random.default_rng(seed))
            == sample_token(noisy, s, np.random.default_rng(seed))
            for seed in range(200)
        )
        assert same >= 197


# --- transformers as the reference ---------------------------------------------------------------


@pytest.mark.parametrize(
    "s",
    [
        SamplingSettings(),
        SamplingSettings(top_k=None, top_p=0.9),
        SamplingSettings(top_k=40, top_p=0.8, temperature=0.7, repetition_penalty=1.3),
        SamplingSettings(top_k=5, temperature=1.5, repetition_penalty=0.8),
        SamplingSettings(top_k=None, top_p=1.0, temperature=0.9),
    ],
)
def test_candidate_probs_match_transformers_processors(s):
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation")
    seen = np.array([3, 17, 17, 256, 1000, 50256])
    chain = generation.LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        chain.append(generation.RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    chain.append(generation.TemperatureLogitsWarper(s.temperature))
    if s.top_k is not None:
        chain.append(generation.TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        chain.append(generation.TopPLogitsWarper(s.top_p))
    for seed in range(3):
        logits = gpt2_like_logits(seed)  # [vocab]
        scores = chain(torch.from_numpy(seen)[None], torch.from_numpy(logits)[None])
        ref = torch.softmax(scores.double(), dim=-1)[0].numpy()  # [vocab]
        ids, probs = candidate_probs(logits, s, seen)
        np.testing.assert_array_equal(ids, np.flatnonzero(ref))
        np.testing.assert_allclose(probs, ref[ids], rtol=1e-5, atol=1e-12)


def test_top_candidates_match_torch_topk():
    torch = pytest.importorskip("torch")
    logits = gpt2_like_logits(5)
    ref = torch.softmax(torch.from_numpy(logits).double(), dim=-1).topk(10)
    ids, probs = top_candidates(logits, 10)
    np.testing.assert_array_equal(ids, ref.indices.numpy())
    np.testing.assert_allclose(probs, ref.values.numpy(), rtol=1e-6)
