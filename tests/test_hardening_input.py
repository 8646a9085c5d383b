"""Hardening: hostile input either generates or raises the documented ValueError, never crashes.

Hypothesis draws prompts (any Unicode, control characters, NUL, very long text) and settings at
and beyond their documented edges; the expected outcome (generate or ValueError) is computed here
from the documented ranges, not by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2_onnx.runtime.generator import TextGenerator

VOCAB = 50257
N_POSITIONS = 256  # the tiny preset
EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gen(tiny_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_dir, device="cpu", threads=1)


# ------------------------------------------------------------------------- prompts

# Every code point class: letters, marks, emoji, private use, controls, NUL, noncharacters.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
CONTROL = st.lists(st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\r", "\n", "\t", "\u200b",
                                    "\ufeff", "\ufffd", "\U0010ffff", "<|endoftext|>"]),
                   max_size=20).map("".join)


@EXAMPLES
@given(prompt=st.one_of(ANY_TEXT, CONTROL, st.tuples(ANY_TEXT, CONTROL).map("".join)))
def test_any_unicode_prompt_generates(gen: TextGenerator, prompt: str) -> None:
    res = gen.generate(prompt, max_new_tokens=3, greedy=True)
    # GPT-2's byte-level BPE is lossless: the prompt's ids decode back to the prompt.
    assert gen.tokenizer.decode(res.prompt_ids, skip_special_tokens=False) == prompt
    assert len(res.ids) <= 3 and all(0 <= i < VOCAB for i in res.ids)
    assert res.finish_reason in ("length", "eos")
    res.text.encode("utf-8")  # valid text (no lone surrogates)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repeat=st.integers(N_POSITIONS + 1, 4 * N_POSITIONS), unit=st.sampled_from(
    [" the", "é", "\x00", "日本", "🙂"]))
def test_very_long_prompt_is_a_value_error(gen: TextGenerator, repeat: int, unit: str) -> None:
    prompt = unit * repeat  # at least n_positions + 1 tokens for each unit
    assert len(gen.encode(prompt)) > N_POSITIONS
    for max_new in (0, 1):
        with pytest.raises(ValueError, match="n_positions=256"):
            gen.generate(prompt, max_new_tokens=max_new)


@pytest.mark.parametrize("prompt", ["\ud800", "abc\udfff", "\udbff\udc00x", "é\udc80日本"])
def test_lone_surrogate_is_a_value_error(gen: TextGenerator, prompt: str) -> None:
    """Python strings may hold lone surrogates (e.g. from surrogateescape); they are not text."""
    with pytest.raises(ValueError, match="surrogate"):
        gen.generate(prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="surrogate"):
        list(gen.stream(prompt, max_new_tokens=2))


# ------------------------------------------------------------------------- settings at the edges

FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1e-300, 1.0, 1.0000001, -1.0, 1e308,
                                    math.inf, -math.inf, math.nan]),
                   st.floats(-2, 3))


def settings_valid(top_k, top_p, temperature, repetition_penalty, max_new_tokens) -> bool:
    """The documented ranges (SamplingSettings, TextGenerator.generate)."""
    return ((top_k is None or 1 <= top_k <= VOCAB)
            and 0 < top_p <= 1 and math.isfinite(temperature) and temperature >= 0
            and math.isfinite(repetition_penalty) and repetition_penalty > 0
            and 0 <= max_new_tokens <= N_POSITIONS - 1)  # "Hello" is one token


@EXAMPLES
@given(top_k=st.one_of(st.none(), st.sampled_from([-1, 0, 1, 2, VOCAB, VOCAB + 1]),
                       st.integers(-3, 100)),
       top_p=FLOATS, temperature=FLOATS,
       repetition_penalty=st.one_of(st.sampled_from([1.0, 1.3, 0.5, 0.0, -1.0, math.nan]),
                                    st.floats(0.5, 2.0)),
       max_new_tokens=st.sampled_from([-1, 0, 1, 3, N_POSITIONS - 1, N_POSITIONS]),
       greedy=st.booleans(), seed=st.one_of(st.none(), st.integers(0, 2**64)))
def test_settings_at_and_beyond_edges(gen: TextGenerator, top_k, top_p, temperature,
                                      repetition_penalty, max_new_tokens, greedy, seed) -> None:
    kwargs = dict(top_k=top_k, top_p=top_p, temperature=temperature,
                  repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                  greedy=greedy, seed=seed)
    valid = settings_valid(top_k, top_p, temperature, repetition_penalty, max_new_tokens)
    if max_new_tokens > 3 and valid:
        kwargs["max_new_tokens"] = 3  # the edge itself is tested in test_hardening_runtime
        kwargs["stop"] = None
    if not valid:
        with pytest.raises(ValueError):
            gen.generate("Hello", **kwargs)
        return
    res = gen.generate("Hello", **kwargs)  # valid settings never overflow (issue 19.2)
    assert len(res.ids) <= kwargs["max_new_tokens"]
    assert all(0 <= i < VOCAB for i in res.ids)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=2.0), dict(max_new_tokens=True), dict(max_new_tokens="3"),
    dict(top_k=1.5), dict(top_k=True), dict(top_p="0.5"), dict(temperature=None),
    dict(show_top=-1), dict(show_top=VOCAB + 1), dict(show_top=True), dict(show_top=2.0),
    dict(seed=-1),
    dict(stop=""), dict(stop=[""]), dict(stop=b"x"), dict(stop=["ok", 3]),
])
def test_bad_setting_types_are_value_errors(gen: TextGenerator, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        gen.generate("Hello", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs", [
    dict(seed=1.5), dict(seed="42"), dict(stop=5),
])
def test_bad_seed_and_stop_types_are_value_errors(gen: TextGenerator, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        gen.generate("Hello", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("prompt", [None, 5, 1.5])
def test_non_text_prompt_is_value_error(gen: TextGenerator, prompt) -> None:
    with pytest.raises(ValueError, match="prompt"):
        gen.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("prompt", [b"bytes", [], ["ok", None], ["ok", 5]])
def test_non_text_prompts_in_a_list_are_value_errors(gen: TextGenerator, prompt) -> None:
    with pytest.raises(ValueError, match="prompt"):
        gen.generate(prompt, max_new_tokens=2)


# ------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_two_tokens(gen: TextGenerator) -> None:
    full = gen.generate("Paris will", max_new_tokens=16, greedy=True)
    decode = gen.tokenizer.decode
    # A stop string made of the last character of one token and the first of the next.
    for k in range(len(full.ids) - 1):
        left, right = decode([full.ids[k]]), decode([full.ids[k + 1]])
        if left and right and "\ufffd" not in left + right:
            stop = left[-1] + right[0]
            break
    else:
        pytest.skip("no clean token pair to span")
    # Expected, computed by hand: the first prefix of the ids whose text contains the stop.
    n = next(n for n in range(1, len(full.ids) + 1) if stop in decode(full.ids[:n]))
    expected_text = decode(full.ids[:n])
    expected_text = expected_text[:expected_text.find(stop)]
    res = gen.generate("Paris will", max_new_tokens=16, greedy=True, stop=stop)
    assert res.finish_reason == "stop"
    assert res.ids == full.ids[:n]
    assert res.text == expected_text
    assert "".join(gen.stream("Paris will", max_new_tokens=16, greedy=True, stop=stop)) \
        == expected_text


@EXAMPLES
@given(stop=st.text(min_size=1, max_size=6))
def test_any_stop_string_generates(gen: TextGenerator, stop: str) -> None:
    res = gen.generate("Paris will", max_new_tokens=8, greedy=True, stop=[stop, "zz"])
    assert stop not in res.text and "zz" not in res.text
    streamed = "".join(gen.stream("Paris will", max_new_tokens=8, greedy=True,
                                  stop=[stop, "zz"]))
    assert streamed == res.text


# ------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("ids", [[-1], [VOCAB], [2**70], [1.5], ["a"], [0, VOCAB + 5],
                                 [np.int64(-3)], [float("nan")]])
def test_token_ids_out_of_range(gen: TextGenerator, ids: list) -> None:
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 50256\]"):
        gen.generate_ids([ids], max_new_tokens=2)


def test_token_ids_at_the_edges_generate(gen: TextGenerator) -> None:
    res = gen.generate_ids([[0, VOCAB - 1], [np.int64(5)], []], max_new_tokens=2, greedy=True)
    assert [len(r.ids) for r in res] == [2, 2, 2]


@pytest.mark.parametrize("prompt_ids", [None, [5], [], "abc", [[True]]])
def test_malformed_prompt_ids(gen: TextGenerator, prompt_ids) -> None:
    with pytest.raises(ValueError, match="prompt"):
        gen.generate_ids(prompt_ids, max_new_tokens=2)
