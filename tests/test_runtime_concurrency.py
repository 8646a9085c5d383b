"""The runtime under load and at its edges: concurrent callers, long runs, the n_positions
edge, and Ctrl-C in the CLI.

One loaded TextGenerator shared by 8 threads must give each caller exactly what it gets alone;
1,000 generations must not grow the process; generating to exactly n_positions must match
transformers' greedy tokens, one more must be refused; Ctrl-C during `gpt2-onnx generate` must
keep what was streamed and exit with 130.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupt_streamed_generate

from gpt2_onnx.runtime.generator import TextGenerator

N_POSITIONS = 256  # the tiny preset
CLI = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


# ------------------------------------------------------------------------- concurrency

JOBS = [
    ("Paris will", dict(greedy=True)),
    ("The quick brown fox", dict(greedy=True, repetition_penalty=1.3)),
    ("", dict(greedy=True)),
    ("London was", dict(seed=1, top_k=20)),
    ("London was", dict(seed=2, top_p=0.9, temperature=0.8)),
    ("Once upon a time", dict(seed=3, top_k=None, temperature=1.5)),
    ("日本語のテキスト", dict(seed=4, repetition_penalty=1.2)),
    ("a b c d e f", dict(seed=5, top_k=5, top_p=0.5)),
]


def run_job(tiny_gen: TextGenerator, job: tuple[str, dict], rounds: int) -> list[tuple]:
    prompt, kwargs = job
    out = []
    for _ in range(rounds):
        res = tiny_gen.generate(prompt, max_new_tokens=8, **kwargs)
        streamed = "".join(tiny_gen.stream(prompt, max_new_tokens=8, **kwargs))
        batch = tiny_gen.generate([prompt, "x"], max_new_tokens=8, **kwargs)[0]
        out.append((res.ids, res.text, streamed, batch.ids))
    return out


def test_eight_threads_get_what_each_gets_alone(tiny_gen: TextGenerator) -> None:
    alone = [run_job(tiny_gen, job, 1)[0] for job in JOBS]
    for ids, text, streamed, batch_ids in alone:  # the sequential reference is consistent
        assert streamed == text and batch_ids == ids
    barrier = threading.Barrier(len(JOBS))

    def worker(job: tuple[str, dict]) -> list[tuple]:
        barrier.wait()
        return run_job(tiny_gen, job, 2)

    with ThreadPoolExecutor(max_workers=len(JOBS)) as pool:
        together = list(pool.map(worker, JOBS))
    for job, expected, got in zip(JOBS, alone, together, strict=True):
        assert got == [expected] * 2, job


# ------------------------------------------------------------------------- long runs


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_thousand_generations_do_not_grow_rss(tiny_gen: TextGenerator) -> None:
    prompts = ["Paris will", "The", "日本", "x" * 40]

    def one(i: int) -> None:  # every public path; few tokens each, so 1,000 runs are quick
        if i % 10 == 0:
            tiny_gen.generate(prompts, max_new_tokens=2, seed=i, show_top=2)
        elif i % 3 == 0:
            "".join(tiny_gen.stream(prompts[i % 4], max_new_tokens=2, seed=i))
        elif i % 3 == 1:
            tiny_gen.generate(prompts[i % 4], max_new_tokens=2, greedy=True, stop=["\n"])
        else:
            tiny_gen.generate_ids([[i % 50257, 11]], max_new_tokens=1, seed=i)

    for i in range(50):  # warm-up: onnxruntime's arenas and caches reach their size
        one(i)
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    for i in range(1000):
        one(i)
    gc.collect()
    after = rss_bytes()
    growth = (after - before) / before
    assert growth < 0.05, f"RSS grew {growth:.1%} ({before / 1e6:.1f} -> {after / 1e6:.1f} MB) " \
        f"over 1000 generations in {time.perf_counter() - start:.1f} s"


# ------------------------------------------------------------------------- the n_positions edge


def test_generate_to_exactly_n_positions_matches_transformers(tiny_gen: TextGenerator,
                                                              tiny_reference) -> None:
    import torch

    prompt = "Paris will be the place where " * 40
    prompt_ids = tiny_gen.encode(prompt)[:200]
    prompt = tiny_gen.decode(prompt_ids)
    assert tiny_gen.encode(prompt) == prompt_ids
    room = N_POSITIONS - len(prompt_ids)  # 56 new tokens fill the position table exactly
    res = tiny_gen.generate_ids([prompt_ids], max_new_tokens=room, greedy=True)[0]
    # The reference: transformers' own greedy loop with its KV cache, to the same total length.
    with torch.no_grad():
        ref = tiny_reference.generate(torch.tensor([prompt_ids]), max_length=N_POSITIONS,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref[0, len(prompt_ids):].tolist()
    assert len(ref_new) == room
    if res.finish_reason == "eos":  # tiny random weights may draw EOS; compare up to there
        ref_new = ref_new[:len(res.ids)]
    assert res.ids == ref_new
    assert len(prompt_ids) + len(res.ids) <= N_POSITIONS
    with pytest.raises(ValueError, match=r"n_positions=256: allowed range is \[0, "
                                         f"{room}\\]"):
        tiny_gen.generate_ids([prompt_ids], max_new_tokens=room + 1, greedy=True)
    with pytest.raises(ValueError, match="n_positions"):
        tiny_gen.generate(prompt, max_new_tokens=room + 1)
    with pytest.raises(ValueError, match="n_positions"):
        list(tiny_gen.stream(prompt, max_new_tokens=room + 1))


def test_prompt_of_exactly_n_positions(tiny_gen: TextGenerator) -> None:
    full = list(np.arange(N_POSITIONS) % 1000 + 100)
    assert tiny_gen.generate_ids([full], max_new_tokens=0)[0].ids == []
    with pytest.raises(ValueError, match="n_positions"):
        tiny_gen.generate_ids([full], max_new_tokens=1)
    with pytest.raises(ValueError, match="n_positions"):
        tiny_gen.generate_ids([[*full, 7]], max_new_tokens=0)
    # One short of the table: exactly one token fits (the last position the table holds).
    res = tiny_gen.generate_ids([full[:-1]], max_new_tokens=1, greedy=True)[0]
    assert len(res.ids) == 1


# ------------------------------------------------------------------------- Ctrl-C in the CLI


def test_ctrl_c_during_generate_keeps_the_streamed_text(tiny_gen: TextGenerator,
                                                        tiny_dir: Path) -> None:
    text = tiny_gen.generate("Paris will", max_new_tokens=200, greedy=True).text
    interrupt_streamed_generate([sys.executable, "-c", CLI], tiny_dir, text, signal.SIGINT, 130)
