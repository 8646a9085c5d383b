"""The torch-free generation loop (issue 3) against transformers on the same weights.

transformers is the reference for tokens, logits and probabilities; a wrapping decoder counts the
forward calls (prefill once, then one token per step) and forces chosen tokens where a test needs a
particular case (EOS at step 3, an emoji split over two byte-level tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gpt2_onnx.runtime.decoder import ConcatCache
from gpt2_onnx.runtime.generator import TextGenerator

EOS = 50256
N_NEW = 64
SHORT = "Paris will"
UNICODE = "東京は日本の首都です 😀 café naïve Ελληνικά —"
LONG_TEXT = (
    "The history of the city begins with a small settlement on an island in the river, where "
    "fishermen and traders built their houses of wood and clay. Over the centuries the town grew "
    "into a center of learning, commerce and government, and its bridges, markets and churches "
    "drew visitors from every corner of the continent. "
)


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread(torch_one_thread):
    """transformers is only the reference here (see conftest.torch_one_thread)."""


def long_prompt(gen: TextGenerator, n_tokens: int) -> str:
    """A natural-language prompt of exactly `n_tokens` tokens."""
    ids = gen.encode(LONG_TEXT * (n_tokens // 50 + 2))[:n_tokens]
    text = gen.decode(ids)
    assert len(gen.encode(text)) == n_tokens
    return text


@pytest.fixture(scope="module")
def odd_gen(odd_dir: Path) -> TextGenerator:
    return TextGenerator.load(odd_dir, device="cpu")


class WrappedDecoder:
    """Delegates to a real decoder; records every call and can force a token at a given call.

    force: {call index: token id} -- the logits of that call are changed so the token wins (call 0
    is the prefill and picks new token 0; call k picks new token k). rows: which rows to force.
    """

    def __init__(self, inner, force: dict[int, int] | None = None,
                 rows: list[int] | None = None) -> None:
        self.inner = inner
        self.dims = inner.dims
        self.variant = inner.variant
        self.force = force or {}
        self.rows = rows
        self.calls: list[dict] = []
        self.logits: list[np.ndarray] = []

    def start(self, batch: int, max_len: int):
        return self.inner.start(batch, max_len)

    def forward(self, cache, input_ids, attention_mask, position_ids, *, all_logits=False):
        logits, nxt = self.inner.forward(cache, input_ids, attention_mask, position_ids,
                                         all_logits=all_logits)
        k = len(self.calls)
        self.calls.append(dict(input_ids=input_ids.copy(), mask=attention_mask.copy(),
                               positions=position_ids.copy(), cache_in=cache, cache_out=nxt))
        if k in self.force:
            logits = logits.copy()
            rows = self.rows if self.rows is not None else range(logits.shape[0])
            for r in rows:
                logits[r, self.force[k]] = logits[r].max() + 50.0
        self.logits.append(logits.copy())
        return logits, nxt


def wrapped(gen: TextGenerator, **kwargs) -> tuple[TextGenerator, WrappedDecoder]:
    dec = WrappedDecoder(gen.decoder, **kwargs)
    return TextGenerator(gen.manifest, gen.tokenizer, dec, gen.device, gen.model_dir), dec


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate: the new ids (EOS included when it stops there)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, num_beams=1,
                             max_new_tokens=n, min_new_tokens=0, pad_token_id=EOS,
                             eos_token_id=EOS)
    return out[0, len(ids):].tolist()


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    e = np.exp(x)
    return e / e.sum()


# ------------------------------------------------------------------------------ greedy parity


# long: the longest prompt each shape allows with 64 new tokens (tiny has 256 positions, the odd
# shape 512), i.e. about 500 tokens where the positions allow it.
LONG_LEN = {"tiny": 190, "odd": 440}


@pytest.mark.parametrize("kind", ["short", "long", "unicode"])
@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_greedy_matches_transformers(which: str, kind: str,
                                     request: pytest.FixtureRequest) -> None:
    gen: TextGenerator = request.getfixturevalue(f"{which}_gen")
    reference = request.getfixturevalue(f"{which}_reference")
    prompt = {"short": SHORT, "unicode": UNICODE}.get(kind) or long_prompt(gen, LONG_LEN[which])
    res = gen.generate(prompt, greedy=True, max_new_tokens=N_NEW)
    expected = hf_greedy(reference, gen.encode(prompt), N_NEW)
    assert res.ids == expected
    assert res.prompt_ids == gen.encode(prompt)
    assert res.text == gen.tokenizer.decode(expected, skip_special_tokens=True)
    assert res.finish_reason == ("eos" if expected[-1] == EOS else "length")
    assert len(set(res.ids)) > 5  # the tiny weights are spread: not one repeated token


def test_empty_prompt_starts_from_endoftext(tiny_gen: TextGenerator, tiny_reference) -> None:
    res = tiny_gen.generate("", greedy=True, max_new_tokens=20)
    assert res.prompt_ids == []
    assert res.ids == hf_greedy(tiny_reference, [EOS], 20)


def test_batch_of_different_lengths_equals_each_alone(tiny_gen: TextGenerator,
                                                       tiny_reference) -> None:
    prompts = [SHORT, long_prompt(tiny_gen, 60), "", UNICODE, "a"]
    batch = tiny_gen.generate(prompts, greedy=True, max_new_tokens=24)
    assert [r.prompt for r in batch] == prompts
    for prompt, res in zip(prompts, batch, strict=True):
        alone = tiny_gen.generate(prompt, greedy=True, max_new_tokens=24)
        assert res.ids == alone.ids, prompt
        assert res.text == alone.text
        assert res.ids == hf_greedy(tiny_reference, tiny_gen.encode(prompt) or [EOS], 24)


# ------------------------------------------------------------------------------ seeds


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_gen: TextGenerator) -> None:
    a = tiny_gen.generate(SHORT, seed=11, max_new_tokens=24)
    b = tiny_gen.generate(SHORT, seed=11, max_new_tokens=24)
    c = tiny_gen.generate(SHORT, seed=12, max_new_tokens=24)
    assert a.ids == b.ids and a.text == b.text
    assert a.ids != c.ids


@pytest.mark.parametrize("settings", [dict(), dict(top_k=None, top_p=0.9, temperature=0.8),
                                      dict(top_k=5, repetition_penalty=1.3)])
def test_seeded_sampling_in_a_batch_equals_alone(tiny_gen: TextGenerator, settings: dict) -> None:
    prompts = [SHORT, long_prompt(tiny_gen, 40), UNICODE]
    batch = tiny_gen.generate(prompts, seed=7, max_new_tokens=20, **settings)
    for prompt, res in zip(prompts, batch, strict=True):
        assert res.ids == tiny_gen.generate(prompt, seed=7, max_new_tokens=20, **settings).ids


# ------------------------------------------------------------------------------ the cache


def recompute_last_logits(gen: TextGenerator, ids: list[int]) -> np.ndarray:
    """Last-position logits of the whole sequence in one pass, no cache."""
    n = len(ids)
    cache = gen.decoder.start(1, n)
    logits, _ = gen.decoder.forward(cache, np.array([ids], dtype=np.int64),
                                    np.ones((1, n), dtype=np.int64),
                                    np.arange(n, dtype=np.int64)[None, :])
    return logits[0]  # [vocab]


def test_cached_steps_equal_recompute(tiny_gen: TextGenerator, tiny_reference) -> None:
    gen, dec = wrapped(tiny_gen)
    prompt_ids = tiny_gen.encode(SHORT)
    res = gen.generate(SHORT, greedy=True, max_new_tokens=10)
    assert len(dec.logits) == 10
    for k in range(1, 10):
        seq = prompt_ids + res.ids[:k]
        cached = dec.logits[k][0]
        np.testing.assert_allclose(cached, recompute_last_logits(tiny_gen, seq), atol=1e-4,
                                   rtol=0)
        np.testing.assert_allclose(cached, hf_last_logits(tiny_reference, seq), atol=1e-4,
                                   rtol=0)


def test_cached_steps_of_a_padded_row_equal_recompute(tiny_gen: TextGenerator) -> None:
    gen, dec = wrapped(tiny_gen)
    prompts = [long_prompt(tiny_gen, 30), SHORT]  # the second row is left-padded by 28
    results = gen.generate(prompts, greedy=True, max_new_tokens=6)
    for r, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        for k in range(1, 6):
            seq = tiny_gen.encode(prompt) + res.ids[:k]
            np.testing.assert_allclose(dec.logits[k][r], recompute_last_logits(tiny_gen, seq),
                                       atol=1e-4, rtol=0)


def test_prefill_once_then_one_token_per_step(tiny_gen: TextGenerator) -> None:
    gen, dec = wrapped(tiny_gen)
    n_prompt = len(tiny_gen.encode(SHORT))
    res = gen.generate(SHORT, greedy=True, max_new_tokens=12)
    assert len(res.ids) == 12
    assert len(dec.calls) == 12  # prefill + 11 steps; the last token is never fed back
    assert dec.calls[0]["input_ids"].shape == (1, n_prompt)
    for k, call in enumerate(dec.calls[1:], start=1):
        assert call["input_ids"].shape == (1, 1)  # never the whole sequence again
        assert call["input_ids"][0, 0] == res.ids[k - 1]
        assert call["mask"].shape == (1, n_prompt + k)
        assert call["positions"].tolist() == [[n_prompt + k - 1]]
        # The cache fed in is the one the previous call returned (present -> past).
        assert call["cache_in"] is dec.calls[k - 1]["cache_out"]


def test_cache_is_ortvalues_rebound(tiny_gen: TextGenerator) -> None:
    dims = tiny_gen.manifest.dims
    dec = tiny_gen.decoder
    ids = tiny_gen.encode(SHORT)
    n = len(ids)
    cache = dec.start(2, n + 1)
    assert isinstance(cache, ConcatCache) and cache.length == 0
    logits, cache = dec.forward(cache, np.array([ids, ids], dtype=np.int64),
                                np.ones((2, n), dtype=np.int64),
                                np.tile(np.arange(n, dtype=np.int64), (2, 1)))
    assert logits.shape == (2, dims.vocab_size)
    # Only the last position reaches the host (the graph's last-row output, or a copy of the
    # last row): no view keeping a [2, n, vocab] prefill array alive.
    assert logits.flags.owndata or not isinstance(logits.base, np.ndarray)
    assert tiny_gen.manifest.variants["fp32"].io.logits_last == "logits_last"
    assert cache.length == n
    past_names = tiny_gen.manifest.variants["fp32"].io.kv_inputs(dims.n_layer)
    assert set(cache.values) == set(past_names)
    for value in cache.values.values():
        assert isinstance(value, ort.OrtValue)
        assert value.shape() == [2, dims.n_head, n, dims.head_dim]
        assert value.device_name().lower() == "cpu"
    before = dict(cache.values)
    _, cache2 = dec.forward(cache, np.array([[1], [2]], dtype=np.int64),
                            np.ones((2, n + 1), dtype=np.int64),
                            np.full((2, 1), n, dtype=np.int64))
    assert cache2.length == n + 1
    for name, value in cache2.values.items():
        assert isinstance(value, ort.OrtValue)
        assert value.shape() == [2, dims.n_head, n + 1, dims.head_dim]
        # present = past + new: the first n positions are the old cache, untouched.
        np.testing.assert_array_equal(value.numpy()[:, :, :n], before[name].numpy())


# ------------------------------------------------------------------------------ finishing


def test_eos_stops_the_row(tiny_gen: TextGenerator) -> None:
    gen, dec = wrapped(tiny_gen, force={3: EOS})
    res = gen.generate(SHORT, greedy=True, max_new_tokens=20)
    assert res.finish_reason == "eos"
    assert len(res.ids) == 4 and res.ids[-1] == EOS
    assert res.text == tiny_gen.decode(res.ids[:3])
    assert "<|endoftext|>" not in res.text
    assert len(dec.calls) == 4


def test_eos_in_a_batch_finishes_only_its_row(tiny_gen: TextGenerator) -> None:
    gen, _ = wrapped(tiny_gen, force={3: EOS}, rows=[0])
    first, second = gen.generate([SHORT, UNICODE], greedy=True, max_new_tokens=16)
    assert first.finish_reason == "eos" and len(first.ids) == 4
    assert second.finish_reason in ("length", "eos")
    assert second.ids == tiny_gen.generate(UNICODE, greedy=True, max_new_tokens=16).ids


def spanning_stop(gen: TextGenerator, ids: list[int]) -> tuple[str, int, int]:
    """A stop string that starts in one token's text and ends in the next one's.

    Returns (stop, character offset where it first occurs, index of the token completing it).
    """
    full = gen.decode(ids)
    for k in range(2, len(ids) - 1):
        b = len(gen.decode(ids[:k]))  # token k's text starts here
        a = len(gen.decode(ids[:k - 1]))  # token k-1's text starts here
        e = len(gen.decode(ids[:k + 1]))
        prefix_ok = all(full.startswith(gen.decode(ids[:j])) for j in (k - 1, k, k + 1))
        if not prefix_ok or b - a < 2 or e - b < 2:
            continue
        stop = full[b - 2:b + 2]
        if "\ufffd" not in stop and stop.strip() and full.find(stop) == b - 2:
            return stop, b - 2, k
    raise AssertionError("no token boundary usable for a spanning stop string")


def test_stop_string_spanning_tokens(tiny_gen: TextGenerator) -> None:
    free = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=30)
    stop, at, k = spanning_stop(tiny_gen, free.ids)
    res = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=30, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == free.text[:at]
    assert stop not in res.text
    assert res.ids == free.ids[:k + 1]  # stops at the token that completes the stop string
    assert "".join(tiny_gen.stream(SHORT, greedy=True, max_new_tokens=30, stop=stop)) \
        == res.text
    # A stop string that never occurs changes nothing.
    res2 = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=30, stop="\x00never\x00")
    assert res2.ids == free.ids and res2.finish_reason == free.finish_reason


def test_earliest_of_several_stop_strings_wins(tiny_gen: TextGenerator) -> None:
    free = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=30)
    stop, at, _ = spanning_stop(tiny_gen, free.ids)
    later = free.text[-3:]
    res = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=30, stop=[later, stop])
    assert res.finish_reason == "stop" and res.text == free.text[:at]


# ------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_joins_to_generate_text(tiny_gen: TextGenerator, seed: int) -> None:
    for prompt in (SHORT, UNICODE):
        pieces = list(tiny_gen.stream(prompt, seed=seed, max_new_tokens=32))
        res = tiny_gen.generate(prompt, seed=seed, max_new_tokens=32)
        assert "".join(pieces) == res.text
        assert len(pieces) > 1


def test_stream_never_splits_a_multibyte_character(tiny_gen: TextGenerator) -> None:
    emoji = tiny_gen.encode("😀")
    assert emoji == [47249, 222] and tiny_gen.decode([emoji[0]]) == "\ufffd"
    force = {2: emoji[0], 3: emoji[1], 5: emoji[0], 6: emoji[1]}
    pieces = list(wrapped(tiny_gen, force=force)[0].stream(SHORT, greedy=True, max_new_tokens=8))
    res = wrapped(tiny_gen, force=force)[0].generate(SHORT, greedy=True, max_new_tokens=8)
    assert res.ids[2:4] == emoji and res.ids[5:7] == emoji
    assert "".join(pieces) == res.text
    assert res.text.count("😀") == 2
    if "\ufffd" not in res.text:
        assert not any("\ufffd" in p for p in pieces)
    assert all(p.count("😀") <= 1 for p in pieces) and sum(p.count("😀") for p in pieces) == 2


# ------------------------------------------------------------------------------ bad settings


BAD_SETTINGS = [
    (dict(top_k=0), "top_k"),
    (dict(top_k=50258), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=300), "n_positions"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(show_top=-1), "show_top"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SETTINGS)
def test_bad_settings_raise_before_any_work(tiny_gen: TextGenerator, kwargs: dict,
                                            name: str) -> None:
    gen, dec = wrapped(tiny_gen)
    with pytest.raises(ValueError, match=name):
        gen.generate(SHORT, **kwargs)
    if "show_top" not in kwargs:
        with pytest.raises(ValueError, match=name):
            gen.stream(SHORT, **kwargs)  # raised by the call itself, before the first piece
    assert dec.calls == []


def test_bad_setting_messages_give_the_range(tiny_gen: TextGenerator) -> None:
    with pytest.raises(ValueError, match=r"\[1, 50257\]"):
        tiny_gen.generate(SHORT, top_k=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tiny_gen.generate(SHORT, top_p=1.5)
    with pytest.raises(ValueError, match=r"\[0, 254\]"):  # 256 positions - 2 prompt tokens
        tiny_gen.generate(SHORT, max_new_tokens=255)


def test_prompt_at_the_position_limit(tiny_gen: TextGenerator, tiny_reference) -> None:
    prompt = long_prompt(tiny_gen, 240)
    res = tiny_gen.generate(prompt, greedy=True, max_new_tokens=16)  # 240 + 16 == 256
    assert res.ids == hf_greedy(tiny_reference, tiny_gen.encode(prompt), 16)
    with pytest.raises(ValueError, match="n_positions"):
        tiny_gen.generate(prompt, greedy=True, max_new_tokens=17)


@pytest.mark.parametrize("bad", [[50257], [-1], [1, 2, 10**9]])
def test_token_ids_out_of_range_refused(tiny_gen: TextGenerator, bad: list[int]) -> None:
    gen, dec = wrapped(tiny_gen)
    with pytest.raises(ValueError, match="token ids"):
        gen.generate_ids([[40313], bad], greedy=True, max_new_tokens=2)
    assert dec.calls == []


def test_zero_new_tokens(tiny_gen: TextGenerator) -> None:
    gen, dec = wrapped(tiny_gen)
    res = gen.generate(SHORT, max_new_tokens=0)
    assert res.ids == [] and res.text == "" and res.finish_reason == "length"
    assert dec.calls == []


# ------------------------------------------------------------------------------ explain, timings


def test_show_top_probabilities_match_transformers(tiny_gen: TextGenerator,
                                                   tiny_reference) -> None:
    res = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=6, show_top=5)
    prompt_ids = tiny_gen.encode(SHORT)
    assert [s.step for s in res.steps] == list(range(6))
    for s in res.steps:
        probs = softmax64(hf_last_logits(tiny_reference, prompt_ids + res.ids[:s.step]))
        expected = np.argsort(-probs, kind="stable")[:5]
        got_ids = [c.id for c in s.candidates]
        got_probs = np.array([c.prob for c in s.candidates])
        assert got_ids == expected.tolist()
        np.testing.assert_allclose(got_probs, probs[expected], atol=1e-4, rtol=0)
        assert np.all(np.diff(got_probs) <= 0)
        assert s.chosen.id == res.ids[s.step] == got_ids[0]  # greedy takes the top candidate
        assert s.chosen.prob == pytest.approx(probs[s.chosen.id], abs=1e-4)
        assert [c.text for c in s.candidates] == [tiny_gen.tokenizer.decode([i]) for i in got_ids]


def test_show_top_records_sampled_choice(tiny_gen: TextGenerator, tiny_reference) -> None:
    res = tiny_gen.generate(SHORT, seed=3, max_new_tokens=5, show_top=3)
    prompt_ids = tiny_gen.encode(SHORT)
    for s in res.steps:
        probs = softmax64(hf_last_logits(tiny_reference, prompt_ids + res.ids[:s.step]))
        assert s.chosen.id == res.ids[s.step]
        assert s.chosen.prob == pytest.approx(probs[s.chosen.id], abs=1e-4)
    assert tiny_gen.generate(SHORT, seed=3, max_new_tokens=5).ids == res.ids


def test_timings(tiny_gen: TextGenerator) -> None:
    res = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=8)
    t = res.timings
    assert t.prefill_ms > 0 and t.decode_ms > 0 and t.decode_tokens_per_s > 0
    # 7 tokens came from decode steps; the rate is consistent with the decode time.
    assert t.decode_tokens_per_s == pytest.approx(7 / (t.decode_ms / 1e3), rel=1e-6)
    one = tiny_gen.generate(SHORT, greedy=True, max_new_tokens=1)
    assert one.timings.prefill_ms > 0 and one.timings.decode_tokens_per_s == 0
