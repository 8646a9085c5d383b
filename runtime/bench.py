"""Measure one model directory with the runtime alone, so users can size deployment machines.

Torch-free (onnxruntime, numpy): what `gpt2-onnx bench MODEL_DIR` runs, and what the peer benchmark
(bench/run_bench.py) runs for our variants. Every figure comes from `TextGenerator.generate_ids`
on synthetic, seeded prompt ids with greedy decoding:

- decode tokens/s, batch 1, at each context (= prompt length before decoding): new tokens after
  the first / decode time, prefill excluded (the generator's own Timings);
- time to first token of a `prompt_tokens` prompt (the prefill forward);
- batch throughput: decode tokens of all rows / decode time, `batch` rows of a short prompt;
- load time (`TextGenerator.load`), and the process's resident memory before load, after load
  and at its peak (VmHWM: the whole process, Python and onnxruntime included).
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.manifest import Manifest, Variant
from gpt2_onnx.runtime.session import physical_cores

PROMPT_SEED = 0  # synthetic prompts: same seed, same ids, for us and every peer
WARMUP_TOKENS = 2  # one short generation after load, so allocation is not timed


def synthetic_prompt(length: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[int]:
    """`length` deterministic token ids in [0, vocab_size - 2] (never the EOS id, vocab - 1)."""
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size - 1, size=length).tolist()


def default_contexts(n_positions: int) -> tuple[int, ...]:
    """Decode contexts of the figures, from the model's length: a short prompt, a quarter of the
    context and ~88 % of it (8, 256, 900 for GPT-2's 1024 positions)."""
    return tuple(dict.fromkeys((min(8, n_positions // 4), n_positions // 4,
                                n_positions * 225 // 256)))


def clamp_context(context: int, new_tokens: int, n_positions: int) -> int:
    """The longest prompt <= `context` that leaves room for `new_tokens` within n_positions."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    return max(1, min(context, n_positions - new_tokens))


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process now ("rss") and at its peak so far ("peak").

    Reads /proc/self/status (VmRSS, VmHWM); elsewhere falls back to getrusage's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # kB
        if len(fields) == 2:
            return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, kB on Linux
    return {"rss": peak, "peak": peak}


def variant_bytes(manifest: Manifest, variant: Variant) -> int:
    """Bytes of a variant's files on disk (graph + external data), from the manifest."""
    return sum(manifest.files[f].size for f in (variant.graph, *variant.data)
               if f in manifest.files)


def warm_up(gen: TextGenerator) -> None:
    """One tiny generation: first-run allocations and lazy initialisation are not timed."""
    prompt = synthetic_prompt(4, gen.manifest.dims.vocab_size, seed=PROMPT_SEED + 1)
    gen.generate_ids([prompt], max_new_tokens=WARMUP_TOKENS, greedy=True)


def measure_decode(gen: TextGenerator, context: int, new_tokens: int) -> dict[str, Any]:
    """Batch 1, greedy: decode tokens/s after a `context`-token prompt (prefill excluded)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")
    prompt = synthetic_prompt(context, gen.manifest.dims.vocab_size)
    res = gen.generate_ids([prompt], max_new_tokens=new_tokens, greedy=True)[0]
    return {"context": context, "new_tokens": len(res.ids),
            "tokens_per_s": res.timings.decode_tokens_per_s,
            "ttft_ms": res.timings.prefill_ms, "decode_ms": res.timings.decode_ms}


def measure_ttft(gen: TextGenerator, prompt_tokens: int) -> dict[str, Any]:
    """Time to first token (the prefill forward) of a `prompt_tokens`-token prompt, batch 1."""
    prompt = synthetic_prompt(prompt_tokens, gen.manifest.dims.vocab_size)
    res = gen.generate_ids([prompt], max_new_tokens=1, greedy=True)[0]
    return {"prompt_tokens": prompt_tokens, "ms": res.timings.prefill_ms}


def measure_batch(gen: TextGenerator, batch: int, context: int,
                  new_tokens: int) -> dict[str, Any]:
    """`batch` rows of `context`-token prompts (distinct ids): decode tokens/s over all rows."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    vocab = gen.manifest.dims.vocab_size
    prompts = [synthetic_prompt(context, vocab, seed=PROMPT_SEED + r) for r in range(batch)]
    t0 = time.perf_counter()
    results = gen.generate_ids(prompts, max_new_tokens=new_tokens, greedy=True)
    wall = time.perf_counter() - t0
    # From the first row's first token to the last row's last: a static batch's shared decode
    # time; on the engine, rows join one by one (their prompts load between decode steps).
    decode_s = wall - results[0].timings.ttft_ms / 1e3
    decoded = sum(max(len(r.ids) - 1, 0) for r in results)
    return {"batch": batch, "context": context, "new_tokens": new_tokens,
            "tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
            "ttft_ms": results[0].timings.prefill_ms}


def bench_model(
    model_dir: str | Path,
    precision: str | None = None,
    threads: int | None = None,
    contexts: Sequence[int] | None = None,
    new_tokens: int = 32,
    batch: int = 8,
    prompt_tokens: int = 512,
    *,
    device: str = "auto",
    batch_context: int | None = None,
) -> dict[str, Any]:
    """Load one variant of `model_dir` and measure it (see the module docstring).

    contexts: decode prompt lengths [default_contexts(n_positions)]. Contexts longer than the
    model allows are clamped to n_positions - new_tokens and measured
    once (`requested` lists the contexts each row stands for). batch_context: prompt length of
    the batch rows (default: the first context), so batch and batch-1 figures compare directly.
    device: "auto", "cpu" or "cuda" (as TextGenerator.load). Returns a JSON-ready dict; every
    time in ms or s as its key says, memory in bytes.
    """
    if contexts is not None and not contexts:
        raise ValueError("contexts: give at least one prompt length")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")
    mem_start = rss_bytes()
    t0 = time.perf_counter()
    gen = TextGenerator.load(model_dir, device=device, precision=precision, threads=threads)
    load_s = time.perf_counter() - t0
    mem_loaded = rss_bytes()
    dims = gen.manifest.dims
    contexts = tuple(contexts or default_contexts(dims.n_positions))
    warm_up(gen)

    decode: dict[int, dict[str, Any]] = {}
    for c in contexts:
        used = clamp_context(c, new_tokens, dims.n_positions)
        if used not in decode:
            decode[used] = {"requested": [], **measure_decode(gen, used, new_tokens)}
        decode[used]["requested"].append(c)
    ttft = measure_ttft(gen, clamp_context(prompt_tokens, 1, dims.n_positions))
    b_ctx = clamp_context(batch_context or contexts[0], new_tokens, dims.n_positions)
    batched = measure_batch(gen, batch, b_ctx, new_tokens)
    mem_end = rss_bytes()

    import onnxruntime as ort  # loaded by TextGenerator.load already; only its version here

    variant = gen.decoder.variant
    return {
        "model_dir": str(model_dir),
        "name": gen.manifest.name,
        "precision": variant.precision,
        "kv_layout": variant.io.kv_layout,
        "device": str(gen.device),
        "threads": threads or physical_cores(),  # the session's intra-op threads
        "weight_bytes": variant_bytes(gen.manifest, variant),
        "load_s": load_s,
        "decode": list(decode.values()),
        "ttft": ttft,
        "batch": batched,
        "memory": {"rss_before_load": mem_start["rss"], "rss_after_load": mem_loaded["rss"],
                   "peak_rss": mem_end["peak"]},
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) pairs of a `bench_model` result, for a two-column table."""
    mb = 1 << 20
    rows = [("model", f"{result['name']} / {result['precision']} "
                      f"({result['weight_bytes'] / mb:.0f} MiB, kv {result['kv_layout']})"),
            ("device, threads", f"{result['device']}, {result['threads']}"),
            ("load", f"{result['load_s']:.2f} s")]
    for d in result["decode"]:
        rows.append((f"decode, context {d['context']}",
                     f"{d['tokens_per_s']:.2f} tok/s ({d['new_tokens']} tokens, batch 1)"))
    t = result["ttft"]
    rows.append((f"time to first token, {t['prompt_tokens']}-token prompt", f"{t['ms']:.0f} ms"))
    b = result["batch"]
    rows.append((f"batch {b['batch']} throughput, context {b['context']}",
                 f"{b['tokens_per_s']:.2f} tok/s (all rows)"))
    m = result["memory"]
    rows.append(("memory (RSS)", f"{m['rss_after_load'] / mb:.0f} MiB after load, "
                                 f"{m['peak_rss'] / mb:.0f} MiB peak"))
    return rows
