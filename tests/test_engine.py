"""The continuous-batching engine (issue 12) on tiny and odd-shape shared-KV exports.

References are independent of the slot code: transformers' greedy generate on the same weights,
and a lone run through `StepGenerator` (batch 1 on the decoder's own `forward`, no slots, no
chunking). The engine is driven by hand (`Engine.step`) where a test replays an exact arrival
schedule, and by its own thread where a test plays a user (threads, asyncio, close).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2_onnx.runtime import (
    DoneEvent,
    Engine,
    EngineClosedError,
    GenerationError,
    GenerationParams,
    Gpt2OnnxError,
    QueueFullError,
    SamplingSettings,
    StepGenerator,
    TextGenerator,
    TokenEvent,
)

EOS = 50256
GREEDY = SamplingSettings(greedy=True)
SAMPLED = (SamplingSettings(), SamplingSettings(top_k=None, top_p=0.9, temperature=0.8),
           SamplingSettings(top_k=5, repetition_penalty=1.3))


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread(torch_one_thread):
    """transformers is only the reference here (see conftest.torch_one_thread)."""


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny_fused_dir plus int4 (its own name: it no longer shadows that fixture)."""
    from conftest import export_dir

    return export_dir(tmp_path_factory.mktemp("tiny-fused") / "random-tiny-seed0",
                      random_init="tiny", precisions=("fp32-fused", "int4", "fp32"))


@pytest.fixture(scope="module")
def odd_fused_dir(tmp_path_factory: pytest.TempPathFactory, odd_checkpoint: Path) -> Path:
    from conftest import export_dir

    return export_dir(tmp_path_factory.mktemp("odd-fused") / "odd-gpt2",
                      source=str(odd_checkpoint), precisions=("fp32", "fp32-fused"))


@pytest.fixture(scope="module")
def tiny(tiny_engine_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_engine_dir, device="cpu", precision="fp32-fused", threads=1)


@pytest.fixture(scope="module")
def odd(odd_fused_dir: Path) -> TextGenerator:
    return TextGenerator.load(odd_fused_dir, device="cpu", precision="fp32-fused", threads=1)


def alone(gen: TextGenerator, prompt_ids: list[int], params: GenerationParams) -> list[int]:
    """The tokens of a lone run: batch 1 through the decoder's forward, no engine."""
    g = StepGenerator(gen, params)
    g.append_tokens(prompt_ids)
    while not g.is_done():
        g.generate_next_token()
    assert g.seq is not None
    return g.seq.ids


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids or [EOS]]), do_sample=False, num_beams=1,
                             max_new_tokens=n, min_new_tokens=0, pad_token_id=EOS,
                             eos_token_id=EOS,
                             attention_mask=torch.ones(1, len(ids or [EOS]), dtype=torch.long))
    return out[0, len(ids or [EOS]):].tolist()


def run_by_hand(engine: Engine, schedule: dict[int, list], cancel_at: dict[int, list] | None
                = None, limit: int = 100_000) -> None:
    """Step the engine; submit schedule[k] (callables returning requests) before step k."""
    cancel_at = cancel_at or {}
    k = 0
    while k < limit:
        for submit in schedule.get(k, []):
            submit()
        for req in cancel_at.get(k, []):
            req.cancel()
        busy = engine.step()
        if not busy and k > max(schedule, default=0) and k > max(cancel_at, default=0):
            return
        k += 1
    raise AssertionError("the engine did not finish")


# ------------------------------------------------------------------ parity with lone runs


@st.composite
def workloads(draw, n_positions: int):
    """Requests (prompt length 0..near n_positions, new tokens, greedy or a seed), the step each
    arrives at, which get cancelled when, and the engine's slots and prefill chunk."""
    n = draw(st.integers(1, 5))
    reqs = []
    for _ in range(n):
        new = draw(st.integers(1, 8))
        length = draw(st.one_of(st.integers(0, 12), st.integers(0, n_positions - new)))
        sampling = draw(st.sampled_from((GREEDY,) + SAMPLED))
        seed = draw(st.integers(0, 2**16)) if not sampling.greedy else None
        arrival = draw(st.integers(0, 12))
        cancel = draw(st.none() | st.integers(0, 20)) if draw(st.booleans()) and n > 1 else None
        reqs.append((length, GenerationParams(max_new_tokens=new, sampling=sampling, seed=seed),
                     arrival, cancel))
    slots = draw(st.integers(1, 4))
    chunk = draw(st.sampled_from([1, 3, 16, 64]))
    budget = draw(st.sampled_from([None, None, 0.8]))  # None: exactly `chunk` tokens per step
    data_seed = draw(st.integers(0, 2**16))
    return reqs, slots, chunk, budget, data_seed


def check_schedule(gen: TextGenerator, workload, reference) -> None:
    reqs, slots, chunk, budget, data_seed = workload
    rng = np.random.default_rng(data_seed)
    engine = Engine(gen, slots=slots, prefill_chunk=chunk, prefill_budget=budget)
    schedule: dict[int, list] = {}
    cancels: dict[int, list] = {}
    handles: list = []
    for length, params, arrival, cancel in reqs:
        ids = [int(t) for t in rng.integers(0, 50257, length)]

        def submit(ids=ids, params=params, cancel=cancel) -> None:
            req = engine.submit(ids, params)
            handles.append((ids, params, req, cancel is not None))
            if cancel is not None:
                cancels.setdefault(cancel + len(schedule), []).append(req)

        schedule.setdefault(arrival, []).append(submit)
    run_by_hand(engine, schedule, cancels)
    for ids, params, req, was_cancelled in handles:
        done = req.wait(0)
        expected = alone(gen, ids, params)
        if was_cancelled and done.finish_reason == "cancelled":
            assert done.ids == expected[:len(done.ids)]  # a prefix of what it would get
        else:
            assert done.ids == expected, (len(ids), params)
            assert done.text == gen.tokenizer.decode(expected, skip_special_tokens=True)
            if params.sampling.greedy:
                assert done.ids == hf_greedy(reference, ids, params.max_new_tokens)
    stats = engine.stats()
    assert stats.busy_slots == stats.waiting == 0
    engine.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_gets_its_lone_tokens_tiny(tiny: TextGenerator, tiny_reference,
                                                 data) -> None:
    check_schedule(tiny, data.draw(workloads(tiny.manifest.dims.n_positions)), tiny_reference)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_gets_its_lone_tokens_odd(odd: TextGenerator, odd_reference,
                                                data) -> None:
    check_schedule(odd, data.draw(workloads(odd.manifest.dims.n_positions)), odd_reference)


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_joining_requests_match_transformers_greedy(which: str,
                                                    request: pytest.FixtureRequest) -> None:
    gen: TextGenerator = request.getfixturevalue(which)
    reference = request.getfixturevalue(f"{which}_reference")
    n_pos = gen.manifest.dims.n_positions
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 50257, n)] for n in (1, 9, n_pos - 24, 0, 33)]
    engine = Engine(gen, slots=2, prefill_chunk=7, prefill_budget=None)
    reqs: list = []
    params = GenerationParams(max_new_tokens=20, sampling=GREEDY)
    # Staggered: each prompt joins while the previous ones decode.
    schedule = {3 * k: [lambda p=p: reqs.append(engine.submit(p, params))]
                for k, p in enumerate(prompts)}
    run_by_hand(engine, schedule)
    for p, req in zip(prompts, reqs, strict=True):
        assert req.result().ids == hf_greedy(reference, p, 20)


def test_int4_variant_runs_on_the_engine(tiny_engine_dir: Path) -> None:
    gen = TextGenerator.load(tiny_engine_dir, device="cpu", precision="int4", threads=1)
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(0, 50257, n)] for n in (3, 50, 120)]
    params = GenerationParams(max_new_tokens=12, sampling=SAMPLED[0], seed=4)
    with Engine(gen, slots=2, prefill_chunk=16) as engine:
        reqs = [engine.submit(p, params) for p in prompts]
        got = [r.result(timeout=60).ids for r in reqs]
    assert got == [alone(gen, p, params) for p in prompts]


# ------------------------------------------------------------------ events


def test_events_carry_text_logprob_and_candidates(tiny: TextGenerator, tiny_reference) -> None:
    import torch

    ids = tiny.encode("東京は日本の首都です 😀 café")
    params = GenerationParams(max_new_tokens=16, seed=3, top_n=4)
    with Engine(tiny, slots=2) as engine:
        events = list(engine.submit(ids, params).events(timeout=30))
    tokens, done = events[:-1], events[-1]
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(done, DoneEvent)
    assert [e.index for e in tokens] == list(range(len(tokens)))
    new = [e.token_id for e in tokens]
    assert done.ids == new and done.completion_tokens == len(new) == 16
    assert done.prompt_tokens == len(ids) and done.finish_reason == "length"
    assert "".join(e.text for e in tokens) == done.text \
        == tiny.tokenizer.decode(new, skip_special_tokens=True)
    assert not any("\ufffd" in e.text for e in tokens) or "\ufffd" in done.text
    with torch.no_grad():
        logits = tiny_reference(torch.tensor([ids + new])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()  # [seq, vocab]
    for k, e in enumerate(tokens):
        row = logp[len(ids) + k - 1]
        assert e.logprob == pytest.approx(row[e.token_id], abs=1e-4)
        expected = np.argsort(-row, kind="stable")[:4]
        assert [c.id for c in e.top] == expected.tolist()
        np.testing.assert_allclose([c.prob for c in e.top], np.exp(row[expected]), atol=1e-5)
    assert done.timings.ttft_ms > 0 and done.timings.decode_tokens_per_s > 0


def test_stop_string_is_held_back_then_cut(tiny: TextGenerator) -> None:
    ids = tiny.encode("Paris will")
    free = StepGenerator(tiny, GenerationParams(max_new_tokens=30, sampling=GREEDY))
    free.append_tokens(ids)
    while not free.is_done():
        free.generate_next_token()
    full = free.seq.text
    stop = full[10:13]
    at = full.find(stop)
    params = GenerationParams(max_new_tokens=30, sampling=GREEDY, stop=(stop,))
    with Engine(tiny) as engine:
        events = list(engine.submit(ids, params).events(timeout=30))
    done = events[-1]
    assert done.finish_reason == "stop" and done.text == full[:at]
    pieces = [e.text for e in events[:-1]]
    assert "".join(pieces) == done.text and not any(stop in p for p in pieces)


async def _collect(engine: Engine, prompts: list[list[int]], params: GenerationParams) -> list:
    async def one(p: list[int]) -> list:
        return [ev async for ev in engine.submit(p, params).aevents()]

    return await asyncio.gather(*(one(p) for p in prompts))


def test_async_events(tiny: TextGenerator) -> None:
    prompts = [tiny.encode(t) for t in ("a", "The quick brown fox", "日本")]
    params = GenerationParams(max_new_tokens=10, seed=1)
    with Engine(tiny, slots=2) as engine:
        got = asyncio.run(_collect(engine, prompts, params))
    for p, events in zip(prompts, got, strict=True):
        assert [e.token_id for e in events[:-1]] == alone(tiny, p, params)
        assert isinstance(events[-1], DoneEvent)


# ------------------------------------------------------------------ refusals and failures


BAD = [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=250), "max_new_tokens"),
    (dict(sampling=SamplingSettings(top_k=0)), "top_k"),
    (dict(sampling=SamplingSettings(top_p=0.0)), "top_p"),
    (dict(sampling=SamplingSettings(temperature=-1.0)), "temperature"),
    (dict(seed=-3), "seed"),
    (dict(top_n=-1), "top_n"),
    (dict(stop=("",)), "stop"),
    (dict(stop=("x", 3)), "stop"),
    (dict(stop=None), "stop"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_settings_refused_at_submission(tiny: TextGenerator, kwargs: dict, name: str) -> None:
    engine = Engine(tiny, slots=1)
    with pytest.raises(ValueError, match=name):
        engine.submit(list(range(10)), GenerationParams(**kwargs))
    assert engine.stats().submitted == 0 and engine.stats().waiting == 0
    engine.close()


def test_bad_prompts_refused_at_submission(tiny: TextGenerator) -> None:
    engine = Engine(tiny, slots=1, max_len=64)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 50257])
    with pytest.raises(ValueError, match="token ids"):
        engine.submit("not ids")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len=64"):
        engine.submit([1] * 65, GenerationParams(max_new_tokens=1))
    with pytest.raises(ValueError, match=r"allowed range is \[0, 54\]"):
        engine.submit([1] * 10, GenerationParams(max_new_tokens=55))
    with pytest.raises(ValueError, match="params"):
        engine.submit([1], dict(max_new_tokens=3))  # type: ignore[arg-type]
    assert engine.stats().submitted == 0
    engine.close()
    with pytest.raises(ValueError, match="slots"):
        Engine(tiny, slots=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_len"):
        Engine(tiny, max_len=10_000)


def test_concat_variant_is_refused_with_the_reason(tiny_engine_dir: Path) -> None:
    gen = TextGenerator.load(tiny_engine_dir, device="cpu", precision="fp32", threads=1)
    with pytest.raises(Gpt2OnnxError, match="static batches"):
        Engine(gen)
    assert not gen.uses_engine  # generate() runs it as static batches, as before
    params = GenerationParams(max_new_tokens=8, sampling=GREEDY)
    ids = gen.encode("Paris will")
    assert gen.generate_ids([ids], max_new_tokens=8, greedy=True)[0].ids == alone(gen, ids, params)


def test_a_failing_request_does_not_disturb_the_others(tiny: TextGenerator) -> None:
    rng = np.random.default_rng(9)
    prompts = [[int(t) for t in rng.integers(0, 50257, n)] for n in (4, 30, 11)]
    params = GenerationParams(max_new_tokens=12, seed=5)
    engine = Engine(tiny, slots=3, prefill_chunk=4)
    reqs = [engine.submit(p, params) for p in prompts]
    seq = reqs[1].seq
    real_accept = seq.accept

    def failing(logits: np.ndarray):  # the 4th token of request 1 fails (as NaN logits would)
        if len(seq.ids) == 3:
            raise ValueError("logits contain nan or +inf")
        return real_accept(logits)

    seq.accept = failing  # type: ignore[method-assign]
    late = {6: [lambda: reqs.append(engine.submit(prompts[1], params))]}
    run_by_hand(engine, late)
    done = reqs[1].wait(0)
    assert done.finish_reason == "error" and "nan" in (done.error or "")
    assert done.ids == alone(tiny, prompts[1], params)[:3]
    with pytest.raises(GenerationError, match="nan"):
        reqs[1].result()
    for req, p in zip([reqs[0], reqs[2], reqs[3]], [prompts[0], prompts[2], prompts[1]],
                      strict=True):
        assert req.result().ids == alone(tiny, p, params)
    assert engine.stats().errors == 1


def test_cancel_frees_the_slot_for_a_waiting_request(tiny: TextGenerator) -> None:
    params = GenerationParams(max_new_tokens=200, sampling=GREEDY)
    engine = Engine(tiny, slots=1)
    first = engine.submit([1, 2, 3], params)
    second = engine.submit([4, 5], GenerationParams(max_new_tokens=5, sampling=GREEDY))
    for _ in range(4):
        engine.step()
    assert engine.stats().busy_slots == 1 and engine.stats().waiting == 1
    produced = len(first.seq.ids)
    first.cancel()
    engine.step()  # the cancelled one leaves, the waiting one is admitted and prefilled
    done = first.wait(0)
    assert done.finish_reason == "cancelled" and len(done.ids) == produced >= 4
    assert done.ids == alone(tiny, [1, 2, 3], params)[:produced]
    assert engine.stats().busy_slots == 1 and len(second.seq.ids) >= 1
    run_by_hand(engine, {})
    assert second.result().ids == alone(tiny, [4, 5], second.params)
    # A request cancelled while it waits never takes a slot.
    r = engine.submit([7], params)
    r.cancel()
    assert not engine.step() and r.wait(0).finish_reason == "cancelled" and r.wait(0).ids == []


def test_queue_full_and_closed(tiny: TextGenerator) -> None:
    engine = Engine(tiny, slots=1, max_queue=2)
    params = GenerationParams(max_new_tokens=3, sampling=GREEDY)
    reqs = [engine.submit([i + 1], params) for i in range(3)]  # one for the slot, two wait
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit([9], params)
    assert engine.stats().rejected == 1
    engine.start()
    engine.close(grace=30)
    assert [r.wait(0).finish_reason for r in reqs] == ["length"] * 3
    with pytest.raises(EngineClosedError):
        engine.submit([1], params)


def test_close_with_no_grace_cancels_what_runs(tiny: TextGenerator) -> None:
    engine = Engine(tiny, slots=2).start()
    reqs = [engine.submit([i + 1] * 5, GenerationParams(max_new_tokens=240)) for i in range(4)]
    next(iter(reqs[0].events(timeout=30)))  # running
    engine.close(grace=0)
    reasons = [r.wait(5).finish_reason for r in reqs]
    assert "cancelled" in reasons and set(reasons) <= {"cancelled", "length", "eos"}
    assert engine.stats().busy_slots == 0 and engine.stats().waiting == 0


def test_sixteen_threads_get_their_own_results(tiny: TextGenerator) -> None:
    rng = np.random.default_rng(16)
    jobs = [([int(t) for t in rng.integers(0, 50257, int(rng.integers(0, 80)))],
             GenerationParams(max_new_tokens=10, sampling=SAMPLED[i % 3] if i % 2 else GREEDY,
                              seed=i)) for i in range(16)]
    expected = [alone(tiny, ids, p) for ids, p in jobs]
    barrier = threading.Barrier(16)
    with Engine(tiny, slots=4, prefill_chunk=8) as engine:
        def worker(job) -> list[int]:
            barrier.wait()
            return engine.submit(*job).result(timeout=60).ids

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(worker, jobs))
    assert got == expected


# ------------------------------------------------------------------ the front ends


def test_generate_of_a_list_is_one_static_batch(tiny: TextGenerator, tiny_reference) -> None:
    """A list of prompts that starts together runs as one static batch (faster than the engine
    for it today), not through the engine; every row still equals transformers' greedy."""
    prompts = ["Paris will", "", "日本語のテキスト", "a b c d e f", "x" * 30, "Hi", "The", "1 2"]
    engine = tiny.engine()
    steps_before = engine.stats().steps
    results = tiny.generate(prompts, greedy=True, max_new_tokens=16)
    assert engine.stats().steps == steps_before
    for p, r in zip(prompts, results, strict=True):
        assert r.ids == hf_greedy(tiny_reference, tiny.encode(p), 16)
    streamed = "".join(tiny.stream(prompts[2], greedy=True, max_new_tokens=16))
    assert streamed == results[2].text
    assert engine.stats().steps > steps_before  # a stream (one prompt) runs on the engine


def test_generate_from_threads_on_one_generator(tiny: TextGenerator) -> None:
    prompts = ["Paris will", "London was", "日本", "Once upon a time"] * 2
    expected = [tiny.generate(p, seed=i, max_new_tokens=12).ids for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: tiny.generate(a[1], seed=a[0], max_new_tokens=12).ids,
                            enumerate(prompts)))
    assert got == expected


def test_abandoned_stream_cancels_its_request(tiny: TextGenerator) -> None:
    pieces = tiny.stream("Paris will", greedy=True, max_new_tokens=200)
    next(pieces)
    pieces.close()  # the consumer stops: its slot is freed
    engine = tiny.engine()
    for _ in range(100):
        if engine.stats().busy_slots == 0:
            break
        threading.Event().wait(0.02)
    assert engine.stats().busy_slots == 0


def test_step_generator_by_hand(tiny: TextGenerator, tiny_reference) -> None:
    import torch

    ids = tiny.encode("Paris will")
    g = StepGenerator(tiny, GenerationParams(max_new_tokens=6, sampling=GREEDY))
    g.append_tokens(ids)
    with torch.no_grad():
        ref = tiny_reference(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(g.get_logits(), ref, atol=1e-4, rtol=0)
    first = [g.generate_next_token().token_id for _ in range(3)]
    g.append_tokens(tiny.encode(" in the"))  # context from elsewhere joins mid-way
    rest = []
    while not g.is_done():
        rest.append(g.generate_next_token().token_id)
    context = ids + first + tiny.encode(" in the")
    assert first == hf_greedy(tiny_reference, ids, 3)
    assert rest == hf_greedy(tiny_reference, context, 3)
    assert g.tokens == context + rest
    with pytest.raises(ValueError, match="done"):
        g.generate_next_token()


def test_prefill_chunks_adapt_to_the_decode_budget(tiny: TextGenerator,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = tiny.decoder.prefill_slot

    def recording(cache, slot, ids, start):
        sizes.append(len(ids))
        return real(cache, slot, ids, start)

    monkeypatch.setattr(tiny.decoder, "prefill_slot", recording)
    # The runners must outlive the join whatever chunk sizes the timings give (cancelled below).
    params = GenerationParams(max_new_tokens=tiny.manifest.dims.n_positions - 8, sampling=GREEDY)
    engine = Engine(tiny, slots=3, prefill_chunk=32, prefill_budget=0.8)
    runners = [engine.submit([5, 6, 7], params), engine.submit([8], params)]
    for _ in range(5):
        engine.step()
    sizes.clear()
    joiner_ids = list(range(1000, 1200))
    joiner = engine.submit(joiner_ids, GenerationParams(max_new_tokens=4, sampling=GREEDY))
    while not joiner.done:
        engine.step()
    assert sum(sizes) == 200 and max(sizes) <= 32 and sizes[0] == 2
    assert len(set(sizes)) > 1  # the size moved with the measured times
    assert joiner.result().ids == alone(tiny, joiner_ids, joiner.params)
    for r in runners:
        r.cancel()
    run_by_hand(engine, {})
    assert [r.wait(0).finish_reason for r in runners] == ["cancelled"] * 2


@pytest.mark.gpu
def test_engine_on_cuda_matches_cpu(tiny_engine_dir: Path, tiny: TextGenerator) -> None:
    """The slot buffers live on the device, bound by address as on CPU (the prepared GPU check
    runs this; skipped by default)."""
    gpu = TextGenerator.load(tiny_engine_dir, device="cuda", precision="fp32-fused")
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, 50257, n)] for n in (1, 40, 200)]
    params = GenerationParams(max_new_tokens=24, sampling=GREEDY)
    with Engine(gpu, slots=2, prefill_chunk=16) as engine:
        got = [engine.submit(p, params).result(timeout=120).ids for p in prompts]
    assert got == [alone(tiny, p, params) for p in prompts]


def test_many_engine_generations_do_not_grow_rss(tiny: TextGenerator) -> None:
    import gc
    import os

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    prompts = ["Paris will", "The", "日本", "x" * 40]

    def one(i: int) -> None:
        if i % 10 == 0:
            tiny.generate(prompts, max_new_tokens=2, seed=i, show_top=2)
        elif i % 3 == 0:
            "".join(tiny.stream(prompts[i % 4], max_new_tokens=2, seed=i))
        else:
            tiny.generate(prompts[i % 4], max_new_tokens=2, greedy=True, stop=["\n"])

    for i in range(50):
        one(i)
    gc.collect()
    before = rss()
    for i in range(300):
        one(i)
    gc.collect()
    assert (rss() - before) / before < 0.05


def test_static_batches_on_request_give_the_same_events(tiny: TextGenerator) -> None:
    """engine_slots = 0: every call runs its own static batch (the behaviour before the engine,
    kept for comparison); the same tokens and events as on the engine."""
    static = TextGenerator(tiny.manifest, tiny.tokenizer, tiny.decoder, tiny.device,
                           tiny.model_dir)
    static.engine_slots = 0
    assert tiny.uses_engine and not static.uses_engine
    ids = tiny.encode("Once upon a time")
    params = GenerationParams(max_new_tokens=12, seed=2, top_n=3, stop=("\n\n\n",))
    on_engine = list(tiny.stream_events(ids, params))
    on_static = list(static.stream_events(ids, params))
    assert [(e.token_id, e.text, [c.id for c in e.top]) for e in on_engine[:-1]] == \
        [(e.token_id, e.text, [c.id for c in e.top]) for e in on_static[:-1]]
    for a, b in zip(on_engine[:-1], on_static[:-1], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    done_e, done_s = on_engine[-1], on_static[-1]
    assert (done_e.text, done_e.ids, done_e.finish_reason) == \
        (done_s.text, done_s.ids, done_s.finish_reason)
    assert static.generate_ids([ids], max_new_tokens=12, seed=2)[0].ids == \
        tiny.generate_ids([ids], max_new_tokens=12, seed=2)[0].ids
    with pytest.raises(ValueError, match="max_new_tokens"):
        static.stream_events(ids, GenerationParams(max_new_tokens=-1))
