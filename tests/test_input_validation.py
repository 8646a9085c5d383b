"""Input validation: hostile input and every setting at its edges either generates or raises
the documented ValueError, never crashes.

Hypothesis draws prompts (any Unicode, control characters, NUL, very long text) and settings at
and beyond their documented edges; the expected outcome (generate or ValueError) is computed here
from the documented ranges, not by the code under test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    invoke,
    one_line_error,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.scoring import score_ids

VOCAB = 50257
N_POSITIONS = 256  # the tiny preset
EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# ------------------------------------------------------------------------- prompts

# Every code point class: letters, marks, emoji, private use, controls, NUL, noncharacters.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
CONTROL = st.lists(st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\r", "\n", "\t", "\u200b",
                                    "\ufeff", "\ufffd", "\U0010ffff", "<|endoftext|>"]),
                   max_size=20).map("".join)


@EXAMPLES
@given(prompt=st.one_of(ANY_TEXT, CONTROL, st.tuples(ANY_TEXT, CONTROL).map("".join)))
def test_any_unicode_prompt_generates(tiny_gen: TextGenerator, prompt: str) -> None:
    res = tiny_gen.generate(prompt, max_new_tokens=3, greedy=True)
    # GPT-2's byte-level BPE is lossless: the prompt's ids decode back to the prompt.
    assert tiny_gen.tokenizer.decode(res.prompt_ids, skip_special_tokens=False) == prompt
    assert len(res.ids) <= 3 and all(0 <= i < VOCAB for i in res.ids)
    assert res.finish_reason in ("length", "eos")
    res.text.encode("utf-8")  # valid text (no lone surrogates)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repeat=st.integers(N_POSITIONS + 1, 4 * N_POSITIONS), unit=st.sampled_from(
    [" the", "é", "\x00", "日本", "🙂"]))
def test_very_long_prompt_is_a_value_error(tiny_gen: TextGenerator, repeat: int, unit: str) -> None:
    prompt = unit * repeat  # at least n_positions + 1 tokens for each unit
    assert len(tiny_gen.encode(prompt)) > N_POSITIONS
    for max_new in (0, 1):
        with pytest.raises(ValueError, match="n_positions=256"):
            tiny_gen.generate(prompt, max_new_tokens=max_new)


@pytest.mark.parametrize("prompt", ["\ud800", "abc\udfff", "\udbff\udc00x", "é\udc80日本"])
def test_lone_surrogate_is_a_value_error(tiny_gen: TextGenerator, prompt: str) -> None:
    """Python strings may hold lone surrogates (e.g. from surrogateescape); they are not text."""
    with pytest.raises(ValueError, match="surrogate"):
        tiny_gen.generate(prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="surrogate"):
        list(tiny_gen.stream(prompt, max_new_tokens=2))


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
def test_settings_at_and_beyond_edges(tiny_gen: TextGenerator, top_k, top_p, temperature,
                                      repetition_penalty, max_new_tokens, greedy, seed) -> None:
    kwargs = dict(top_k=top_k, top_p=top_p, temperature=temperature,
                  repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                  greedy=greedy, seed=seed)
    valid = settings_valid(top_k, top_p, temperature, repetition_penalty, max_new_tokens)
    if max_new_tokens > 3 and valid:
        kwargs["max_new_tokens"] = 3  # the edge itself is tested in test_runtime_concurrency
        kwargs["stop"] = None
    if not valid:
        with pytest.raises(ValueError):
            tiny_gen.generate("Hello", **kwargs)
        return
    res = tiny_gen.generate("Hello", **kwargs)  # valid settings never overflow (issue 19.2)
    assert len(res.ids) <= kwargs["max_new_tokens"]
    assert all(0 <= i < VOCAB for i in res.ids)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=2.0), dict(max_new_tokens=True), dict(max_new_tokens="3"),
    dict(top_k=1.5), dict(top_k=True), dict(top_p="0.5"), dict(temperature=None),
    dict(show_top=-1), dict(show_top=VOCAB + 1), dict(show_top=True), dict(show_top=2.0),
    dict(seed=-1),
    dict(stop=""), dict(stop=[""]), dict(stop=b"x"), dict(stop=["ok", 3]),
])
def test_bad_setting_types_are_value_errors(tiny_gen: TextGenerator, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        tiny_gen.generate("Hello", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs", [
    dict(seed=1.5), dict(seed="42"), dict(stop=5),
])
def test_bad_seed_and_stop_types_are_value_errors(tiny_gen: TextGenerator, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        tiny_gen.generate("Hello", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("prompt", [None, 5, 1.5])
def test_non_text_prompt_is_value_error(tiny_gen: TextGenerator, prompt) -> None:
    with pytest.raises(ValueError, match="prompt"):
        tiny_gen.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("prompt", [b"bytes", [], ["ok", None], ["ok", 5]])
def test_non_text_prompts_in_a_list_are_value_errors(tiny_gen: TextGenerator, prompt) -> None:
    with pytest.raises(ValueError, match="prompt"):
        tiny_gen.generate(prompt, max_new_tokens=2)


# ------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_two_tokens(tiny_gen: TextGenerator) -> None:
    full = tiny_gen.generate("Paris will", max_new_tokens=16, greedy=True)
    decode = tiny_gen.tokenizer.decode
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
    res = tiny_gen.generate("Paris will", max_new_tokens=16, greedy=True, stop=stop)
    assert res.finish_reason == "stop"
    assert res.ids == full.ids[:n]
    assert res.text == expected_text
    assert "".join(tiny_gen.stream("Paris will", max_new_tokens=16, greedy=True, stop=stop)) \
        == expected_text


@EXAMPLES
@given(stop=st.text(min_size=1, max_size=6))
def test_any_stop_string_generates(tiny_gen: TextGenerator, stop: str) -> None:
    res = tiny_gen.generate("Paris will", max_new_tokens=8, greedy=True, stop=[stop, "zz"])
    assert stop not in res.text and "zz" not in res.text
    streamed = "".join(tiny_gen.stream("Paris will", max_new_tokens=8, greedy=True,
                                  stop=[stop, "zz"]))
    assert streamed == res.text


# ------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("ids", [[-1], [VOCAB], [2**70], [1.5], ["a"], [0, VOCAB + 5],
                                 [np.int64(-3)], [float("nan")]])
def test_token_ids_out_of_range(tiny_gen: TextGenerator, ids: list) -> None:
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 50256\]"):
        tiny_gen.generate_ids([ids], max_new_tokens=2)


def test_token_ids_at_the_edges_generate(tiny_gen: TextGenerator) -> None:
    res = tiny_gen.generate_ids([[0, VOCAB - 1], [np.int64(5)], []], max_new_tokens=2, greedy=True)
    assert [len(r.ids) for r in res] == [2, 2, 2]


@pytest.mark.parametrize("prompt_ids", [None, [5], [], "abc", [[True]]])
def test_malformed_prompt_ids(tiny_gen: TextGenerator, prompt_ids) -> None:
    with pytest.raises(ValueError, match="prompt"):
        tiny_gen.generate_ids(prompt_ids, max_new_tokens=2)


# ------------------------------------------------ from the hostile pass of issue 19


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def numpy_variants(values: st.SearchStrategy, types: tuple) -> st.SearchStrategy:
    """Each value as itself or converted to one of the numpy scalar types (when it converts)."""
    def convert(pair):
        value, kind = pair
        if kind is None:
            return value
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                out = kind(value)
        except (OverflowError, ValueError, TypeError):
            return value
        return out if np.isfinite(out) or not np.isfinite(value) else value

    return st.tuples(values, st.sampled_from((None, *types))).map(convert)


ANY_FLOAT = numpy_variants(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
              st.sampled_from([0.0, -0.0, 5e-324, 1e-308, 2.2e-308, 1e-45, 1e308,
                               1.7976931348623157e308, 1.0, 1e-300, 1e300]),
              st.integers(-3, 3)),
    (np.float32, np.float64, np.float16))


ANY_INT = numpy_variants(
    st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2, VOCAB, VOCAB + 1])),
    (np.int64, np.int32, np.uint16, np.int8))


BOOLS = st.sampled_from([True, False, np.bool_(True), np.bool_(False)])


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_finite_real(v) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


@pytest.mark.parametrize("flag, value", [("--temperature", "1e-308"),
                                         ("--temperature", "5e-324"),
                                         ("--repetition-penalty", "1e-300"),
                                         ("--repetition-penalty", "1e300")])
def test_extreme_valid_settings_generate(runner: CliRunner, tiny_dir: Path, tiny_gen: TextGenerator,
                                         flag: str, value: str) -> None:
    greedy = tiny_gen.generate("Hi", max_new_tokens=6, greedy=True)
    for extra in ([], ["--json"]):
        result = invoke(runner, "generate", tiny_dir, "Hi", flag, value, "--max-new-tokens",
                        "6", "--seed", "0", "--threads", "1", *extra)
        assert result.exit_code == 0, result.stderr
        assert "Traceback" not in result.stderr
    if flag == "--temperature":
        # T -> 0 is greedy (the tiny model's top-2 gaps are far above 1e-300).
        res = tiny_gen.generate("Hi", max_new_tokens=6, temperature=float(value), top_k=None,
                                seed=3)
        assert res.ids == greedy.ids
        assert json.loads(result.stdout)["ids"] == greedy.ids


def test_tiny_penalty_with_greedy_takes_a_seen_token(tiny_gen: TextGenerator) -> None:
    """penalty 1e-300 divides every seen positive logit by 1e-300: those saturate and tie at the
    top, so greedy takes the lowest seen id whose logit was positive."""
    prompt_ids = tiny_gen.encode("Paris will be Paris")
    logits = tiny_gen.decoder.forward(tiny_gen.decoder.start(1, len(prompt_ids)),
                                 np.array([prompt_ids]), np.ones((1, len(prompt_ids)), np.int64),
                                 np.arange(len(prompt_ids))[None])[0][0]  # [vocab]
    positive_seen = sorted(i for i in set(prompt_ids) if logits[i] > 0)
    res = tiny_gen.generate_ids([prompt_ids], max_new_tokens=1, greedy=True,
                           repetition_penalty=1e-300)[0]
    expected = positive_seen[0] if positive_seen else int(np.argmax(logits))
    assert res.ids == [expected]


@FUZZ
@given(top_k=st.one_of(st.none(), ANY_INT, BOOLS), top_p=st.one_of(ANY_FLOAT, BOOLS),
       temperature=st.one_of(ANY_FLOAT, BOOLS), repetition_penalty=st.one_of(ANY_FLOAT, BOOLS),
       max_new_tokens=st.one_of(ANY_INT, BOOLS, st.sampled_from([np.int64(3), 3.0])),
       seed=st.one_of(st.none(), ANY_INT, BOOLS),
       show_top=st.one_of(st.sampled_from([0, 2, np.int64(2), True, np.bool_(True), -1]),
                          ANY_INT),
       greedy=st.one_of(BOOLS, st.sampled_from([0, 1, "yes", None])))
def test_settings_full_numeric_ranges(tiny_gen: TextGenerator, top_k, top_p, temperature,
                                      repetition_penalty, max_new_tokens, seed, show_top,
                                      greedy) -> None:
    """Any value of any numeric type: generation, or a ValueError naming a setting. The
    documented ranges decide which (never an overflow inside sampling)."""
    valid = {
        "greedy": isinstance(greedy, (bool, np.bool_)),
        "top_k": top_k is None or (is_int(top_k) and 1 <= top_k <= VOCAB),
        "top_p": is_finite_real(top_p) and 0 < top_p <= 1,
        "temperature": is_finite_real(temperature) and temperature >= 0,
        "repetition_penalty": is_finite_real(repetition_penalty) and repetition_penalty > 0,
        "max_new_tokens": is_int(max_new_tokens) and 0 <= max_new_tokens <= N_POSITIONS - 1,
        "seed": seed is None or (is_int(seed) and seed >= 0),
        "show_top": is_int(show_top) and 0 <= show_top <= VOCAB,
    }
    kwargs = dict(top_k=top_k, top_p=top_p, temperature=temperature, greedy=greedy,
                  repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                  seed=seed, show_top=show_top)
    if all(valid.values()):
        kwargs["max_new_tokens"] = min(int(max_new_tokens), 3)
        kwargs["show_top"] = min(int(show_top), 3)
        res = tiny_gen.generate("Hello", **kwargs)
        assert len(res.ids) <= kwargs["max_new_tokens"]
        assert all(0 <= i < VOCAB for i in res.ids)
        assert len(res.steps) == (len(res.ids) if kwargs["show_top"] else 0)
        return
    with pytest.raises(ValueError) as exc:
        tiny_gen.validate("Hello", **kwargs)
    assert any(name in str(exc.value) for name, ok in valid.items() if not ok), str(exc.value)
    with pytest.raises(ValueError):
        tiny_gen.generate("Hello", **kwargs)


@pytest.mark.parametrize("threads", ["99999999999", "0", "-3", "100000"])
def test_threads_bounded_with_the_machine_named(runner: CliRunner, tiny_dir: Path,
                                                threads: str) -> None:
    result = invoke(runner, "generate", tiny_dir, "Hi", "--threads", threads)
    line = one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 1
    assert "threads" in line and f"{os.cpu_count()} logical CPUs" in line, line


def test_threads_accepts_numpy_integers(tiny_dir: Path) -> None:
    loaded = TextGenerator.load(tiny_dir, device="cpu", threads=np.int64(1))
    assert len(loaded.generate("Hi", max_new_tokens=2, greedy=True).ids) == 2
    with pytest.raises(ValueError, match="threads"):
        TextGenerator.load(tiny_dir, device="cpu", threads=True)


@pytest.mark.parametrize("show_top", [True, np.bool_(True), 1.0, -1, VOCAB + 1])
def test_show_top_refused_at_validation(tiny_gen: TextGenerator, show_top) -> None:
    with pytest.raises(ValueError, match="show_top"):
        tiny_gen.validate("Hi", max_new_tokens=2, show_top=show_top)
    with pytest.raises(ValueError, match="show_top"):
        tiny_gen.generate("Hi", max_new_tokens=2, show_top=show_top)


def test_api_types_handled_uniformly(tiny_gen: TextGenerator) -> None:
    for bad in (None, 5, [b"x"], ["ok", None]):
        with pytest.raises(ValueError, match="texts"):
            tiny_gen.score(bad)
    res = tiny_gen.generate("Hi", max_new_tokens=np.int64(3), greedy=True)
    assert len(res.ids) == 3
    assert res.ids == tiny_gen.generate("Hi", max_new_tokens=3, greedy=True).ids
    same = tiny_gen.generate("Hi", max_new_tokens=np.int32(3), top_k=np.int64(5), seed=np.uint8(7),
                        temperature=np.float32(0.8), top_p=np.float16(0.9))
    plain = tiny_gen.generate("Hi", max_new_tokens=3, top_k=5, seed=7, temperature=float(
        np.float32(0.8)), top_p=float(np.float16(0.9)))
    assert same.ids == plain.ids
    # Bools are refused everywhere, not accepted in one place and refused in another.
    for call in (lambda: tiny_gen.generate_ids([[True, 5]], max_new_tokens=1),
                 lambda: tiny_gen.decode([True]),
                 lambda: score_ids(tiny_gen.decoder, [[True, 5]]),
                 lambda: tiny_gen.generate("Hi", max_new_tokens=True),
                 lambda: tiny_gen.generate("Hi", max_new_tokens=2, seed=np.bool_(True)),
                 lambda: tiny_gen.score(["x"], batch_size=True),
                 lambda: tiny_gen.score(["x"], stride=np.bool_(True))):
        with pytest.raises(ValueError):
            call()
