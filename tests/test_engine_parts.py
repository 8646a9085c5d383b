"""The engine's pieces alone (no graph, no thread): the scheduler's admission and chunk fitting,
and the output processor's detokenizer and stop strings, against hand-computed expectations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gpt2_onnx.runtime.engine import GenerationParams
from gpt2_onnx.runtime.manifest import ModelDims
from gpt2_onnx.runtime.output import Sequence, StopText, stop_prefix_hold
from gpt2_onnx.runtime.sampling import SamplingSettings
from gpt2_onnx.runtime.scheduler import ChunkSizer, Scheduler

# ------------------------------------------------------------------ the scheduler


def fake_request(n_prompt: int, admitted_at: float | None = None) -> SimpleNamespace:
    """What the scheduler reads of a Request: the feed, cancel flag and admission time."""
    return SimpleNamespace(seq=SimpleNamespace(feed=list(range(1, n_prompt + 1))),
                           prompt_ids=list(range(1, n_prompt + 1)), cancel_requested=False,
                           admitted_at=admitted_at)


def test_admission_fills_the_lowest_free_slots_in_arrival_order() -> None:
    sched = Scheduler(slots=2, max_queue=1, prefill_chunk=64, prefill_budget=None)
    reqs = [fake_request(3) for _ in range(3)]
    for r in reqs:
        assert sched.has_room()  # 0, 1, 2 waiting vs 2 free slots: at most 1 beyond them
        sched.waiting.append(r)
    assert not sched.has_room()  # 3 waiting - 2 free = 1 = max_queue: a 4th is refused
    admitted = sched.admit()
    assert [s.req for s in admitted] == reqs[:2]
    assert [s.req for s in sched.active] == reqs[:2] and list(sched.waiting) == [reqs[2]]
    assert all(s.req.admitted_at is not None for s in admitted)
    assert not sched.has_room()  # 1 waiting - 0 free = 1
    sched.free(0)
    assert sched.has_room()
    assert [s.req for s in sched.admit()] == [reqs[2]]  # takes slot 0, the freed one
    assert sched.active[0].req is reqs[2] and not sched.waiting


def test_cancelled_requests_leave_the_queue_and_their_slots() -> None:
    sched = Scheduler(slots=1, max_queue=4, prefill_chunk=8, prefill_budget=None)
    running, waiting, other = fake_request(2), fake_request(2), fake_request(2)
    sched.waiting.extend([running, waiting, other])
    sched.admit()
    running.cancel_requested = waiting.cancel_requested = True
    assert sched.take_cancelled() == [waiting, running]  # the queue's first, then the slots'
    assert sched.active == [None] and list(sched.waiting) == [other]
    assert sched.take_all() == [other] and not sched.waiting


def test_the_oldest_joining_prompt_gets_the_chunk() -> None:
    sched = Scheduler(slots=3, max_queue=4, prefill_chunk=4, prefill_budget=None)
    sched.waiting.extend([fake_request(10), fake_request(6), fake_request(2)])
    a, b, c = sched.admit()
    a.req.admitted_at, b.req.admitted_at, c.req.admitted_at = 3.0, 1.0, 2.0
    chunk = sched.next_chunk()  # nobody decodes: b's whole prompt in one run
    assert (chunk.index, chunk.ids, chunk.decoding) == (1, [1, 2, 3, 4, 5, 6], False)
    b.prefilled = b.held = 6
    b.next_token = 42  # b decodes now: c (admitted before a) gets prefill_chunk = 4 tokens
    chunk = sched.next_chunk()
    assert (chunk.index, chunk.ids, chunk.asked, chunk.decoding) == (2, [1, 2], 4, True)
    c.prefilled = c.held = 2
    c.next_token = 7
    chunk = sched.next_chunk()
    assert (chunk.index, chunk.ids) == (0, [1, 2, 3, 4])
    a.prefilled = a.held = 4
    assert sched.next_chunk().ids == [5, 6, 7, 8]


def test_the_decode_batch_is_one_range_of_slots_with_dummies_in_the_gaps() -> None:
    sched = Scheduler(slots=5, max_queue=4, prefill_chunk=4, prefill_budget=None)
    sched.waiting.extend([fake_request(3) for _ in range(4)])
    s0, s1, s2, s3 = sched.admit()
    s0.held, s0.next_token = 3, 11  # decoding
    sched.free(1)  # a free slot inside the range
    s2.held = 2  # joining: still loading its prompt
    s3.held, s3.next_token = 7, 33  # decoding
    batch = sched.decode_batch()
    assert (batch.first, batch.tokens, batch.held) == (0, [11, 0, 0, 33], [3, 0, 2, 7])
    assert [i for i, _ in batch.rows] == [0, 3]
    assert Scheduler(2, 1, 4, None).decode_batch() is None


def test_chunk_sizes_follow_the_measured_costs() -> None:
    sizer = ChunkSizer(prefill_chunk=64, prefill_budget=0.5)
    assert sizer.chunk == 2  # starts small: min(2, prefill_chunk)
    assert sizer.size(remaining=100, decoding=False) == 100  # alone: the whole prompt
    assert sizer.size(remaining=100, decoding=True) == 2
    sizer.record_decode(0.1)  # target: 0.5 x 0.1 s = 0.05 s per chunk
    sizer.record_prefill(2, 0.02, decoding=True, asked=2)
    assert sizer.chunk == 3  # one size seen, under the target: grow by max(1, n // 4)
    sizer.record_prefill(3, 0.025, decoding=True, asked=3)
    # fit a + b n: b = 0.005 s/token, a = 0.01 s; want (0.05 - 0.01) / 0.005 = 8, growth caps 4
    assert sizer.chunk == 4
    sizer.record_prefill(4, 0.03, decoding=True, asked=4)
    assert sizer.chunk == 5
    sizer.record_prefill(1, 9.0, decoding=True, asked=5)  # the prompt's short tail: no adapt
    assert sizer.chunk == 5
    sizer.record_decode(0.2)
    assert sizer.decode_s == pytest.approx(0.8 * 0.1 + 0.2 * 0.2)


def test_chunks_never_shrink_below_the_fixed_cost_floor() -> None:
    sizer = ChunkSizer(prefill_chunk=64, prefill_budget=0.5)
    sizer.record_decode(0.1)  # target 0.05 s
    sizer.record_prefill(10, 0.2, decoding=True, asked=10)
    sizer.record_prefill(20, 0.3, decoding=True, asked=20)
    # a = 0.1 s (already over the target), b = 0.01 s/token: floor a / (2b) = 5 tokens
    assert sizer.chunk == 5


def test_one_chunk_size_over_budget_shrinks_in_proportion() -> None:
    sizer = ChunkSizer(prefill_chunk=64, prefill_budget=0.5)
    sizer.record_decode(0.1)
    sizer.record_prefill(8, 0.2, decoding=True, asked=8)  # 4x the 0.05 s target
    assert sizer.chunk == 2  # int(8 * 0.05 / 0.2)
    fixed = ChunkSizer(prefill_chunk=16, prefill_budget=None)
    fixed.record_decode(0.1)
    fixed.record_prefill(16, 5.0, decoding=True, asked=16)
    assert fixed.size(remaining=100, decoding=True) == 16  # no budget: always prefill_chunk


def test_prefills_alone_inform_the_fit_but_do_not_adapt() -> None:
    sizer = ChunkSizer(prefill_chunk=64, prefill_budget=0.5)
    sizer.record_prefill(1, 0.01, decoding=False, asked=1)  # one token alone: not recorded
    sizer.record_prefill(30, 0.3, decoding=False, asked=30)
    assert list(sizer.chunk_times) == [(30, 0.3)] and sizer.chunk == 2


# ------------------------------------------------------------------ output processing


def test_stop_text_holds_back_a_possible_stop_then_cuts_it() -> None:
    s = StopText(("\n\n",))
    s.append("Hi\n")
    assert not s.stopped and s.delta(finished=False) == "Hi"  # "\n" may start "\n\n"
    s.append("\nmore")
    assert s.stopped and s.text == "Hi" and s.raw == "Hi\n\nmore"
    assert s.delta(finished=True) == ""


def test_stop_text_finds_a_stop_split_across_pieces() -> None:
    s = StopText(("END",))
    deltas = []
    for piece in ("abcE", "N", "Dxyz"):
        s.append(piece)
        deltas.append(s.delta(finished=s.stopped))
    assert deltas == ["abc", "", ""] and s.text == "abc" and s.stop_at == 3


def test_stop_text_releases_a_false_start() -> None:
    s = StopText(("END",))
    s.append("E")
    assert s.delta(finished=False) == ""
    s.append("x")
    assert s.delta(finished=False) == "Ex" and not s.stopped
    s.append("EN")
    assert s.delta(finished=False) == ""  # "EN" held
    assert s.delta(finished=True) == "EN"  # finished another way (length): nothing held


def test_the_earliest_stop_wins_and_no_stops_hold_nothing() -> None:
    s = StopText(("b", "a"))
    s.append("xxab")
    assert s.text == "xx"
    free = StopText(())
    free.append("a\n")
    assert free.delta(finished=False) == "a\n" and not free.stopped
    assert stop_prefix_hold("hello wor", ("world", "or")) == 3  # "wor" begins "world"
    assert stop_prefix_hold("hello w", ("or",)) == 0


@pytest.fixture(scope="module")
def tokenizer():
    from gpt2_onnx.export.tokenizer import build_gpt2_tokenizer

    return build_gpt2_tokenizer()


DIMS = ModelDims(n_layer=1, n_head=1, head_dim=1, n_embd=1, n_positions=64, vocab_size=50257,
                 bos_token_id=50256, eos_token_id=50256)


def one_hot(token: int) -> np.ndarray:
    logits = np.zeros(DIMS.vocab_size, dtype=np.float32)  # [vocab]
    logits[token] = 10.0
    return logits


def run_tokens(tokenizer, tokens: list[int], **kwargs) -> tuple[Sequence, list]:
    params = GenerationParams(max_new_tokens=kwargs.pop("max_new_tokens", 16),
                              sampling=SamplingSettings(greedy=True), **kwargs)
    seq = Sequence(tokenizer, DIMS, [1, 2], params)
    events = []
    for t in tokens:
        if seq.done:
            break
        events.append(seq.accept(one_hot(t)))
    return seq, events


def test_sequence_cuts_at_a_stop_string_spread_over_tokens(tokenizer) -> None:
    tokens = [tokenizer.token_to_id(t) for t in ("Hello", "Ġworld", "Ċ", "Ċ", "bye")]
    seq, events = run_tokens(tokenizer, tokens, stop=("\n\n",))
    assert [e.text for e in events] == ["Hello", " world", "", ""]  # the 2nd "\n" stops it
    assert [e.token_id for e in events] == tokens[:4] and [e.index for e in events] == [0, 1, 2, 3]
    assert seq.finish_reason == "stop" and seq.text == "Hello world"
    assert events[0].logprob == pytest.approx(float(-np.log1p((DIMS.vocab_size - 1)
                                                              * np.exp(-10.0))), abs=1e-6)


def test_sequence_releases_held_text_at_length(tokenizer) -> None:
    tokens = [tokenizer.token_to_id(t) for t in ("Hello", "Ċ")]
    seq, events = run_tokens(tokenizer, tokens, stop=("\n\n",), max_new_tokens=2)
    assert [e.text for e in events] == ["Hello", "\n"]  # finished: the held "\n" comes out
    assert seq.finish_reason == "length"


def test_sequence_never_splits_a_character(tokenizer) -> None:
    tokens = tokenizer.encode("😀!", add_special_tokens=False).ids
    assert len(tokens) >= 3  # the emoji's 4 bytes take several byte-level tokens
    seq, events = run_tokens(tokenizer, tokens, max_new_tokens=len(tokens))
    texts = [e.text for e in events]
    assert texts[-2:] == ["😀", "!"] and set(texts[:-2]) == {""}
    assert seq.text == "😀!" and seq.finish_reason == "length"


def test_sequence_flushes_an_incomplete_character_at_the_end(tokenizer) -> None:
    tokens = tokenizer.encode("😀", add_special_tokens=False).ids
    seq, events = run_tokens(tokenizer, tokens[:1], max_new_tokens=1)
    assert seq.finish_reason == "length"
    assert events[0].text == seq.text == tokenizer.decode(tokens[:1])  # what decode shows


def test_eos_ends_the_sequence_and_cancel_keeps_the_text(tokenizer) -> None:
    hello = tokenizer.token_to_id("Hello")
    seq, events = run_tokens(tokenizer, [hello, DIMS.eos_token_id, hello])
    assert len(events) == 2 and seq.finish_reason == "eos" and seq.text == "Hello"
    seq, _ = run_tokens(tokenizer, [hello, tokenizer.token_to_id("Ċ")], stop=("\n\n",))
    seq.finish("cancelled")
    assert seq.finish_reason == "cancelled" and seq.pending_text() == "\n"
